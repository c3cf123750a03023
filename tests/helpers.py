"""Paths and comparisons shared by the tests."""
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


def relative_error(ours, official) -> float:
    """max|ours - official| / max|official|: the fixture README's tolerance measure."""
    ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
    return float(np.abs(ours - official).max() / np.abs(official).max())


def load_fixture_weights() -> dict:
    """The official_small fixture's weights by official object path; stored bf16-packed, which is
    lossless because every fixture value is bf16-representable (see tests/data/README.md)."""
    packed = np.load(DATA / "official_small" / "weights_bf16.npz")
    return {key.replace(".", "/"): (packed[key].astype(np.uint32) << 16).view(np.float32) for key in packed}


def cuda_only(device, what: str) -> None:
    """Skip a check that exists only on CUDA (on the ``device`` fixture's cpu param, or its dry run)."""
    if device.type != "cuda":
        pytest.skip(f"{what} needs CUDA (here on {device})")
