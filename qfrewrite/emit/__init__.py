"""Emitters: TFLite flatbuffers (float or fully int8), ONNX (float or QDQ), Keras models."""
