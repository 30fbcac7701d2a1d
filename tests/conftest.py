"""Shared test helpers: small synthetic graphs and the location of ../shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QFREWRITE_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with a clear reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"fixture {p} is absent (set QFREWRITE_SHARED or place the shared folder beside the repo)")
    return p


@pytest.fixture
def rng():
    return np.random.default_rng(0)
