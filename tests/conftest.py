"""Shared pytest fixtures."""

import lzma
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import DATA, GENE_RUN_TRACKS, GENE_RUN_TYPES


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


def tiny_enformer(seed: int = 0, channels: int = 24, heads: dict | None = None, target_length: int = 896,
                  pooling: str = "attention", conv_filters: list | None = None, doubled: bool = True,
                  random_statistics: bool = False):
    """A small random Enformer (2 attention heads, 1 transformer layer) in eval mode: the one factory
    for the tests' tiny models (also the ``tiny_enformer`` fixture).

    ``conv_filters`` default: C/2, C/2, 3C/4, 3C/4, C, C. ``doubled``: weight matrices x2, so that
    single-base variants move the predictions well above float32 noise. ``random_statistics``: batch
    norm running statistics and the biases drawn at random instead of torch's 0/1/0, so that every
    term of the arithmetic takes part (an identity batch norm would hide a mistake in it)."""
    import torch

    from enformer_vep.model import Enformer, EnformerConfig

    torch.manual_seed(seed)
    filters = conv_filters or [channels // 2] * 2 + [3 * channels // 4] * 2 + [channels] * 2
    model = Enformer(EnformerConfig(channels=channels, num_heads=2, num_transformer_layers=1, pooling_type=pooling,
                                    conv_filters=filters, target_length=target_length,
                                    heads=heads or {"human": 6}))
    with torch.no_grad():  # one pass in state-dict order: the draws, hence the weights, depend on the seed only
        for name, tensor in model.state_dict().items():
            if random_statistics and name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif random_statistics and (name.endswith("running_mean") or name.endswith(".bias")):
                tensor.normal_(0, 0.1)
            elif doubled and name.endswith("weight") and tensor.ndim > 1:
                tensor.mul_(2.0)
    return model.eval()


@pytest.fixture(name="tiny_enformer", scope="session")
def tiny_enformer_factory():
    """:func:`tiny_enformer`, for test modules (which should not import conftest)."""
    return tiny_enformer


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """The device a test runs on: the CPU, then the CUDA device (gpu-marked, so deselected where none
    is visible). ``ENFORMER_VEP_TEST_DEVICE`` names the CUDA device (default ``cuda``); ``cpu`` runs
    the gpu-marked tests on the CPU, a dry run of their code before spending GPU time."""
    import torch

    return torch.device("cpu" if request.param == "cpu" else os.environ.get("ENFORMER_VEP_TEST_DEVICE", "cuda"))


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu)])
def cuda_device(request):
    """The CUDA device alone, for checks that exist only there (gpu-marked: deselected without one)."""
    import torch

    return torch.device(os.environ.get("ENFORMER_VEP_TEST_DEVICE", "cuda"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module of tiny models: on a busy 2-core machine two threads contend and
    run them many times slower (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fast_model(tmp_path_factory) -> Path:
    """A very small random Enformer (12 channels, max pooling, the released 5313-track human head)
    saved as our .safetensors: cheap enough for end-to-end runs in subprocesses."""
    from enformer_vep.weights import save_native

    model = tiny_enformer(seed=5, channels=12, pooling="max", conv_filters=[6, 6, 6, 6, 8, 12], heads={"human": 5313})
    path = tmp_path_factory.mktemp("fast_model") / "fast.safetensors"
    save_native(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def gene_run(tmp_path_factory, fast_model) -> Path:
    """A finished ``enformer-score`` run of the 13 GIAB variants in chr1:840,000-851,000 with the GENCODE
    slice (``--genes``, genes of ``GENE_RUN_TYPES`` only), SAD and SAR over ``GENE_RUN_TRACKS``, and
    ``annotated.vcf.gz`` (``--vcf-out``) beside it."""
    from click.testing import CliRunner

    from enformer_vep.cli import cli

    giab = DATA / "grch38_chr1_giab_hg002"
    root, genes = tmp_path_factory.mktemp("gene_run"), DATA / "annotation" / "gencode.chr1_1-900000.gtf.gz"
    result = CliRunner().invoke(cli, [str(giab / "input.vcf.gz"), "--fasta", str(giab / "reference.fa"), "--model",
                                      str(fast_model), "--genes", str(genes), "--gene-types", ",".join(GENE_RUN_TYPES),
                                      "--tracks", ",".join(map(str, GENE_RUN_TRACKS)), "--stats", "SAD,SAR",
                                      "--region", "chr1:840000-851000", "--device", "cpu", "--no-progress",
                                      "-o", str(root / "run"), "--vcf-out", str(root / "annotated.vcf.gz")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "input.chr1.genes.h5" in result.output
    return root / "run"


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
    config.addinivalue_line("markers", "gpu: runs on a CUDA device (the device fixture's cuda param); `pytest -m gpu`")


def pytest_collection_modifyitems(config, items):
    """GPU tests are deselected (not skipped) where they cannot run: no CUDA device, and no
    ENFORMER_VEP_TEST_DEVICE=cpu asking for a dry run on the CPU."""
    import torch

    if os.environ.get("ENFORMER_VEP_TEST_DEVICE", "cuda").startswith("cuda") and not torch.cuda.is_available():
        gpu = [item for item in items if item.get_closest_marker("gpu")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]
