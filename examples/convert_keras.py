"""Convert a Keras MobileNet (.h5/.keras file or a model object) to a fully int8 TFLite file.

    python examples/convert_keras.py [MODEL.h5] [IMAGE_DIR] [--out OUT.tflite] [--limit N]

Defaults: the bundled Keras MobileNet V1 0.25 and its bundled photos.
"""
import argparse
import logging

import qfrewrite
from qfrewrite import recipes
from qfrewrite.images import ImageFolder
from qfrewrite.tflite_inspect import assert_fully_integer
from qfrewrite.demo.run import DEMO_IMAGES, DEMO_MODEL

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default=str(DEMO_MODEL))
ap.add_argument("images", nargs="?", default=str(DEMO_IMAGES))
ap.add_argument("--out", default="mobilenet_int8.tflite")
ap.add_argument("--limit", type=int, default=None)
args = ap.parse_args()
logging.basicConfig(level=logging.WARNING)

data = ImageFolder(args.images, preprocess="inception", limit=args.limit)   # x / 127.5 - 1
result = qfrewrite.rewrite(args.model, passes=recipes.dfq(weights="per_channel"), data=data)
print(result.report)
size = len(result.to_tflite(args.out))
info = assert_fully_integer(args.out)
print(f"wrote {args.out}: {size} bytes, ops {info.op_counts()}")
