"""How far one set of model outputs is from another, in framework-free numpy.

* :func:`power_ratio_db`: ``10 log10(signal / noise)`` of two powers, ``inf`` when there is no noise;
* :func:`sqnr_db`: ``10 log10(sum(ref**2) / sum((ref - out)**2))``, ``inf`` when identical;
* :func:`output_drift`: that SQNR over several outputs, their largest absolute difference and the top-1 agreement
  of the first output (the pass manager's drift of a non-exact pass, and ``evaluate``'s comparison to a reference).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

__all__ = ["power_ratio_db", "sqnr_db", "output_drift"]


def power_ratio_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB, the signal floored at 1e-30; ``inf`` when ``noise <= 0`` (no error, or
    round-off below zero of an error computed in closed form)."""
    return float("inf") if noise <= 0 else float(10.0 * np.log10(max(float(signal), 1e-30) / float(noise)))


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    """``10 log10(sum(ref**2) / sum((ref - out)**2))`` (inf when identical)."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(output, np.float64)) ** 2))
    return power_ratio_db(float(np.sum(ref ** 2)), noise)


def output_drift(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> Dict[str, float]:
    """SQNR in dB of ``outputs`` against ``reference`` (inf when identical), max abs diff and top-1 agreement."""
    ref = np.concatenate([np.asarray(r, np.float64).ravel() for r in reference])
    out = np.concatenate([np.asarray(o, np.float64).ravel() for o in outputs])
    agree = float(np.mean(np.argmax(reference[0].reshape(len(reference[0]), -1), -1)
                          == np.argmax(outputs[0].reshape(len(outputs[0]), -1), -1)))
    return {"sqnr_db": sqnr_db(ref, out), "max_abs_diff": float(np.max(np.abs(ref - out))) if ref.size else 0.0,
            "top1_agreement": agree}
