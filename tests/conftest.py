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


@pytest.fixture(scope="session")
def fast_model(tmp_path_factory) -> Path:
    """A very small random Enformer (12 channels, max pooling, the released 5313-track human head)
    saved as our .safetensors: cheap enough for end-to-end runs in subprocesses."""
    import torch

    from enformer_vep.model import Enformer, EnformerConfig
    from enformer_vep.weights import save_native

    torch.manual_seed(5)
    model = Enformer(EnformerConfig(channels=12, num_heads=2, num_transformer_layers=1, pooling_type="max",
                                    conv_filters=[6, 6, 6, 6, 8, 12], heads={"human": 5313}))
    with torch.no_grad():  # larger weights: single-base effects well above float32 noise
        for name, tensor in model.state_dict().items():
            if name.endswith("weight") and tensor.ndim > 1:
                tensor.mul_(2.0)
    path = tmp_path_factory.mktemp("fast_model") / "fast.safetensors"
    save_native({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


@pytest.fixture(scope="session")
def two_contig_vcf(tmp_path_factory) -> Path:
    """``two_contigs.vcf`` (plain), ``.vcf.gz`` + ``.tbi`` and ``.bcf`` + ``.csi`` in one directory: the
    first 30 GIAB records on chr1, then 7 records on chr2 (not in the chr1-only FASTA: skipped rows)."""
    import pysam
    import pysam.bcftools

    source = DATA / "grch38_chr1_giab_hg002" / "input.vcf"
    lines = source.read_text().splitlines(keepends=True)
    header = [line for line in lines if line.startswith("#")]
    body = [line for line in lines if not line.startswith("#")][:30]
    body += [f"chr2\t{1000 * (i + 1)}\tc2_{i}\tA\tG\t50\tPASS\t.\tGT\t0/1\n" for i in range(7)]
    directory = tmp_path_factory.mktemp("two_contigs")
    vcf = directory / "two_contigs.vcf"
    vcf.write_text("".join(header + body))
    pysam.tabix_compress(str(vcf), str(vcf) + ".gz")
    pysam.tabix_index(str(vcf) + ".gz", preset="vcf")
    bcf = directory / "two_contigs.bcf"
    pysam.bcftools.view("-Ob", "-o", str(bcf), str(vcf) + ".gz", catch_stdout=False)
    pysam.bcftools.index(str(bcf))
    return vcf


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA device (tests/test_cuda.py); `pytest -m gpu`")


def pytest_collection_modifyitems(config, items):
    """GPU tests are deselected (not skipped) where they cannot run: no CUDA device, and no
    ENFORMER_VEP_TEST_DEVICE=cpu asking for a dry run on the CPU."""
    import os

    import torch

    if os.environ.get("ENFORMER_VEP_TEST_DEVICE", "cuda").startswith("cuda") and not torch.cuda.is_available():
        gpu = [item for item in items if item.get_closest_marker("gpu")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]
