"""Convert a torchvision MobileNetV2 exported with torch.onnx.export to int8 TFLite and ONNX (QDQ), and score both.

    python examples/convert_torchvision_onnx.py MODEL.onnx IMAGE_DIR [--calib N] [--eval M]

IMAGE_DIR holds JPEG/PNG files (flat or one folder per class) and optionally labels.tsv for accuracy.
"""
import argparse
import logging

import qfrewrite
from qfrewrite import recipes
from qfrewrite.images import ImageFolder

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("images")
ap.add_argument("--calib", type=int, default=64, help="calibration images (the first N)")
ap.add_argument("--eval", type=int, default=32, help="evaluation images (the N after the calibration ones)")
ap.add_argument("--out", default="mobilenet_v2_int8")
args = ap.parse_args()
logging.basicConfig(level=logging.WARNING)

graph = qfrewrite.load(args.model)              # NCHW ONNX -> NHWC IR
images = ImageFolder(args.images, preprocess="torch", limit=args.calib + args.eval).read(graph)
calib, held = images.subset(slice(0, args.calib)), images.subset(slice(args.calib, None))
result = qfrewrite.rewrite(graph, passes=recipes.plain(weights="per_channel"), data=calib)
result.to_tflite(args.out + ".tflite")
result.to_onnx(args.out + ".onnx")
for name, model in [("float", graph), ("int8 tflite", args.out + ".tflite")]:
    print(f"{name:<12}", qfrewrite.evaluate(model, held, reference=graph))
