"""Paths and comparisons shared by the tests."""
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"


def relative_error(ours, official) -> float:
    """max|ours - official| / max|official|: the fixture README's tolerance measure."""
    ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
    return float(np.abs(ours - official).max() / np.abs(official).max())
