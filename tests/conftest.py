"""Shared pytest fixtures."""

import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import DATA


@pytest.fixture(scope="session")
def official_bundle_dir(tmp_path_factory) -> Path:
    """A directory with ``variables/variables.index`` and ``variables/variables.data-00000-of-00001``:
    the official_small SavedModel's variables as written by TensorFlow (stored xz-compressed)."""
    source = DATA / "official_small"
    variables = tmp_path_factory.mktemp("official_small") / "variables"
    variables.mkdir()
    shutil.copyfile(source / "variables.index", variables / "variables.index")
    data = "variables.data-00000-of-00001"
    with lzma.open(source / (data + ".xz")) as src, open(variables / data, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return variables.parent


@pytest.fixture(scope="session")
def official_inputs() -> np.ndarray:
    """The fixture's one-hot input ``[2, 196608, 4]`` float32 (random ACGT with runs of N)."""
    return np.load(DATA / "official_small" / "inputs.npz")["onehot"]


@pytest.fixture(scope="session")
def official_outputs() -> dict:
    """Official outputs: ``human``/``mouse`` (every 8th/4th track, indices in ``*_tracks``), ``trunk``,
    ``grad`` and ``grad_target``."""
    with np.load(DATA / "official_small" / "outputs.npz") as outputs:
        return dict(outputs)
