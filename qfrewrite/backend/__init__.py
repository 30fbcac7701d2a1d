"""Execution backends: the IR lowered to TensorFlow ops (for running, calibrating and emitting)."""
