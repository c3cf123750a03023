"""Paths, comparisons and test dependencies shared by the tests."""
import importlib
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


class _Missing:
    """Stands in for a test dependency that is not installed: using it fails the test, naming the extra."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute):
        pytest.fail(f"the test dependency {self.name} is not installed: pip install -e '.[test]'", pytrace=False)


def from_test_extra(name: str):
    """Module ``name`` of the ``test`` extra (enformer-pytorch, pyBigWig, pyfaidx, PyYAML...), or a stand-in
    whose use fails the test with the command that installs it: a clear failure, not a collection error."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return _Missing(name)


class InMemoryContig:
    """A genome of in-memory contigs, all with the same bases ``codes`` (uint8 ASCII): ``fetch`` as
    ``Genome.fetch``, N outside the sequence."""

    def __init__(self, codes: np.ndarray):
        self.codes = codes

    def fetch(self, chrom, start, end):
        out = np.full(end - start, ord("N"), np.uint8)
        lo, hi = max(start, 0), min(end, len(self.codes))
        if lo < hi:
            out[lo - start:hi - start] = self.codes[lo:hi]
        return out


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


# The tracks of conftest's ``gene_run``: ten DNASE tracks and one CAGE track of the released table.
GENE_RUN_TRACKS = list(range(10)) + [4675]
# The gene types conftest's ``gene_run`` keeps (its windows also hold pseudogenes, left out).
GENE_RUN_TYPES = ("lincRNA", "processed_transcript")
