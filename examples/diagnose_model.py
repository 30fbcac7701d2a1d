"""Diagnose why a model quantizes badly, as a table, JSON and a plot.

    python examples/diagnose_model.py [MODEL] [--json diag.json] [--plot diag.png]
"""
import argparse

from qfrewrite.demo.run import DEMO_MODEL
from qfrewrite.diagnose import diagnose

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default=str(DEMO_MODEL))
ap.add_argument("--json", default=None)
ap.add_argument("--plot", default=None)
args = ap.parse_args()

diagnosis = diagnose(args.model)
print(diagnosis)
worst = diagnosis.ranked()[0]
print(f"worst layer: {worst.name}")
if args.json:
    diagnosis.to_json(args.json)
if args.plot:
    diagnosis.plot(args.plot)
