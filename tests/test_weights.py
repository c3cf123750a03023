"""Every weight source loads the official model; bad weights end in a clear error."""
import functools
import http.server
import io
import json
import os
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch
from bundle_writer import object_graph, tree_nodes, write_bundle
from click.testing import CliRunner
from helpers import DATA, from_test_extra, relative_error
from safetensors import safe_open
from safetensors.torch import save_file, save_model

from enformer_vep import WeightsError, load_model
from enformer_vep.cli import cli
from enformer_vep.download import UnreachableError
from enformer_vep.errors import DownloadError
from enformer_vep.tensor_bundle import TensorBundle
from enformer_vep.weights import default_model_source, read_state, save_native

enformer_pytorch = from_test_extra("enformer_pytorch")
modeling_enformer = from_test_extra("enformer_pytorch.modeling_enformer")

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENFORMER_VEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture(scope="module")
def official_state(official_bundle_dir):
    return read_state(official_bundle_dir)


def assert_same_state(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def state_of(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_savedmodel_directory_matches_official_outputs(official_bundle_dir, official_inputs, official_outputs):
    model = load_model(official_bundle_dir, device="cpu")
    assert not model.training
    out = model.predict(torch.from_numpy(official_inputs))
    for head in ("human", "mouse"):
        got = out[head].numpy()[:, :, official_outputs[f"{head}_tracks"]]
        # float32 in TensorFlow's orders against torch's: measured 1.4e-6 of the largest output
        assert relative_error(got, official_outputs[head]) <= 1e-5, head


def test_sonnet_checkpoint_prefix(tmp_path, official_bundle_dir, official_state):
    """A checkpoint written like `tf.train.Checkpoint(module=model)`: keys `module/...`, its own
    object graph, plus tensors outside the model (save counter, an optimizer slot) to ignore."""
    official = TensorBundle(official_bundle_dir / "variables" / "variables")
    tensors = {}
    for path, key in official.object_paths().items():
        tensors["module/" + path.removeprefix("model/") + SUFFIX] = official.read(key)
    tensors["save_counter" + SUFFIX] = np.array(1, np.int64)
    tensors["optimizer/m/_trunk/_layers/0/_layers/0/w" + SUFFIX] = np.zeros(3, np.float32)
    paths = {key.removesuffix(SUFFIX): key for key in tensors}
    tensors["_CHECKPOINTABLE_OBJECT_GRAPH"] = np.array(object_graph(tree_nodes(paths)), dtype=object)
    prefix = tmp_path / "enformer-fine-tuned-human-1"
    write_bundle(prefix, tensors)
    assert_same_state(read_state(prefix), official_state)
    assert_same_state(state_of(load_model(str(prefix) + ".index")), official_state)


def test_native_conversion_round_trip_through_the_cli(tmp_path, official_bundle_dir, official_state):
    dest = tmp_path / "model.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(official_bundle_dir), str(dest)])
    assert result.exit_code == 0, result.output
    assert "channels 384, 2 transformer layers, 8 attention heads" in result.output
    with safe_open(str(dest), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "enformer-vep"
    assert json.loads(metadata["config"])["conv_filters"] == [256, 256, 256, 256, 384, 384]
    assert_same_state(state_of(load_model(dest)), official_state)
    assert not list(tmp_path.glob("*.partial"))


def _tar_gz(source_dir, archive, extra=()):
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(source_dir / "variables", arcname="enformer_1/variables")
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.fixture(scope="module")
def official_archive(tmp_path_factory, official_bundle_dir):
    return _tar_gz(official_bundle_dir, tmp_path_factory.mktemp("archive") / "enformer_1.tar.gz")


def test_savedmodel_archive(official_archive, official_state):
    assert_same_state(state_of(load_model(official_archive)), official_state)


class _CountingServer:
    """Serves one directory on 127.0.0.1 and counts GET requests."""

    def __init__(self, directory):
        self.requests = 0
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_url_is_downloaded_converted_once_and_reused(official_archive, official_state, monkeypatch):
    server = _CountingServer(official_archive.parent)
    try:
        url = f"{server.url}/{official_archive.name}"
        monkeypatch.setenv("ENFORMER_VEP_MODEL", url)
        assert_same_state(state_of(load_model()), official_state)  # the default source
        assert server.requests == 1
        assert_same_state(state_of(load_model(url)), official_state)
        assert server.requests == 1  # converted once, reused without the network
    finally:
        server.close()


def test_unreachable_default_model_says_how_to_pass_a_local_copy(monkeypatch):
    url = "http://127.0.0.1:9/enformer.tar.gz"  # discard port: refused
    monkeypatch.setenv("ENFORMER_VEP_MODEL", url)
    with pytest.raises(UnreachableError, match="--model PATH") as exc:
        load_model()
    assert isinstance(exc.value, DownloadError)  # what callers catch
    message = str(exc.value)
    assert message.startswith(f"$ENFORMER_VEP_MODEL={url}: cannot download {url}: 127.0.0.1 could not be reached")
    assert "offline?" in message and ".part" not in message and "resume" not in message


# --- a source from $ENFORMER_VEP_MODEL: errors say where the path came from ----------------------

GIAB = DATA / "grch38_chr1_giab_hg002"


def cli_error(args):
    """The one `Error:` line the command printed, last (exit status 1)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if "Error" in line] == lines[-1:], result.output
    assert lines[-1].startswith("Error: "), result.output
    return lines[-1]


@pytest.mark.parametrize("command", ["score", "predict"])
def test_bad_model_from_the_environment_is_named_as_such(tmp_path, monkeypatch, command):
    """`score` passes `default_model_source()` on to load_model; `predict` lets load_model read it."""
    missing = tmp_path / "nowhere" / "enformer.safetensors"
    monkeypatch.setenv("ENFORMER_VEP_MODEL", str(missing))
    args = {"score": [GIAB / "input.vcf.gz", "--fasta", GIAB / "reference.fa", "-o", tmp_path / "out",
                      "--no-progress", "--device", "cpu"],
            "predict": ["predict", "chr1:100000-100127", "--fasta", GIAB / "reference.fa", "-o", tmp_path / "p.h5",
                        "--device", "cpu"]}[command]
    message = cli_error(args)
    assert message == f"Error: $ENFORMER_VEP_MODEL={missing}: no such file, directory or checkpoint prefix"
    # the same path given with --model is the user's own: no mention of the variable
    message = cli_error([*args, "--model", missing])
    assert message == f"Error: {missing}: no such file, directory or checkpoint prefix"


def test_unreadable_model_from_the_environment(tmp_path, monkeypatch):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    monkeypatch.setenv("ENFORMER_VEP_MODEL", str(bogus))
    assert isinstance(default_model_source(), str) and default_model_source() == str(bogus)
    with pytest.raises(WeightsError, match=f"^\\$ENFORMER_VEP_MODEL={bogus}: not a readable safetensors file"):
        load_model()
    with pytest.raises(WeightsError, match=f"^{bogus}: not a readable safetensors file"):
        load_model(str(bogus))
    monkeypatch.delenv("ENFORMER_VEP_MODEL")
    assert default_model_source().startswith("https://")


# --- permissions: a lab-shared model and cache stay readable ----------------------------------

@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return os.stat(path).st_mode & 0o777


def test_converted_weights_respect_the_umask(tmp_path, tiny_enformer, umask):
    state = state_of(tiny_enformer(channels=12))
    dest = tmp_path / "lab" / "model.safetensors"
    save_native(state, dest)
    assert (mode(dest.parent), mode(dest)) == (0o777 & ~umask, 0o666 & ~umask)
    # rewriting an existing file keeps its mode, as open(..., "w") does
    dest.chmod(0o640)
    save_native(state, dest)
    assert mode(dest) == 0o640
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.safetensors"]


def test_url_cache_respects_the_umask(tmp_path, tiny_enformer, monkeypatch, umask):
    served = tmp_path / "served"
    served.mkdir()
    state = state_of(tiny_enformer(channels=12))
    save_native(state, served / "tiny.safetensors")
    monkeypatch.setenv("ENFORMER_VEP_CACHE", str(tmp_path / "shared" / "cache"))
    server = _CountingServer(served)
    try:
        assert_same_state(state_of(load_model(f"{server.url}/tiny.safetensors")), state)
    finally:
        server.close()
    cache = tmp_path / "shared" / "cache"
    (downloaded,) = (cache / "downloads").iterdir()
    (converted,) = (cache / "converted").iterdir()
    dirs = [tmp_path / "shared", cache, cache / "downloads", cache / "converted"]
    assert {d.name: mode(d) for d in dirs} == {d.name: 0o777 & ~umask for d in dirs}
    assert (mode(downloaded), mode(converted)) == (0o666 & ~umask, 0o666 & ~umask)


# --- enformer-pytorch checkpoints: they load and give that package's outputs ------------------

@pytest.fixture(scope="module")
def their_model():
    """A small random enformer-pytorch model whose positional features are the official ones.

    Its `use_tf_gamma` option swaps in a TF gamma table (for 192 features at T = 1536, hence
    channels / heads = 384 / 2); that package's table is not the 2022 official one, so it is
    replaced by the official float32 values, the only intended difference between the two ports.
    """
    official = np.load(DATA / "positional_features.npz")["F192_T1536"][:, 64:96]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_enformer, "TF_GAMMAS", torch.from_numpy(official.copy()))
        torch.manual_seed(7)
        model = enformer_pytorch.Enformer.from_hparams(dim=384, depth=2, heads=2, use_tf_gamma=True,
                                                       output_heads={"human": 11, "mouse": 5})
        with torch.no_grad():  # random everything, including batch-norm statistics and zero-initialised layers
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point():  # N(0, 1/fan_in) keeps activations of order 1
                    scale = 1.0 / np.sqrt(np.prod(tensor.shape[1:])) if tensor.ndim > 1 else 0.1
                    tensor.copy_(torch.randn_like(tensor) * scale)
                    if name.endswith("running_var"):
                        tensor.abs_().add_(0.5)
        yield model.eval()


@pytest.fixture(scope="module")
def sequence():
    rng = np.random.default_rng(3)
    onehot = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 196_608)]
    onehot[1000:1500] = 0  # a run of N
    return torch.from_numpy(onehot[None])


def _their_outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("form", ["pytorch_model.bin", "model.safetensors"])
def test_enformer_pytorch_checkpoint_gives_its_outputs(tmp_path, their_model, sequence, form):
    if form == "pytorch_model.bin":
        (tmp_path / "config.json").write_text(json.dumps(their_model.config.to_dict()))
        torch.save(their_model.state_dict(), tmp_path / form)
    else:  # safetensors keeps one name of each shared tensor (`_trunk.N.*` or the named module)
        (tmp_path / "config.json").write_text(json.dumps(their_model.config.to_dict()))
        save_model(their_model, str(tmp_path / form))
    assert (tmp_path / form).is_file()
    ours = load_model(tmp_path)
    assert ours.config.channels == 384 and ours.config.num_heads == 2 and ours.config.num_transformer_layers == 2
    theirs = _their_outputs(their_model, sequence)
    got = ours.predict(sequence)
    for head in ("human", "mouse"):  # float32 in the two ports' orders: measured 7.8e-8 of the largest output
        assert relative_error(got[head].numpy(), theirs[head].numpy()) <= 5e-7, head


# --- bad weights -----------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(tmp_path, official_bundle_dir):
    copy = tmp_path / "savedmodel"
    shutil.copytree(official_bundle_dir, copy)
    return copy


def test_truncated_data_file(bundle_copy):
    data = bundle_copy / "variables" / "variables.data-00000-of-00001"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(WeightsError, match="truncated|past the end"):
        load_model(bundle_copy)


def test_crc_mismatch_names_the_tensor(bundle_copy):
    raw = bundle_copy / "variables" / "variables.data-00000-of-00001"
    with open(raw, "r+b") as f:  # flip one bit in the middle of the data file
        f.seek(raw.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(WeightsError, match=r"CRC.*model/_"):
        load_model(bundle_copy)


def _native(tmp_path, state):
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path), metadata={"format": "enformer-vep"})
    return path


def test_missing_tensor(tmp_path, official_state):
    state = dict(official_state)
    del state["transformer.1.attention.to_v.weight"]
    with pytest.raises(WeightsError, match="missing.*to_v"):
        load_model(_native(tmp_path, state))


def test_shape_mismatch(tmp_path, official_state):
    state = dict(official_state)
    state["final.conv.bias"] = torch.zeros(5)
    with pytest.raises(WeightsError, match="final.conv.bias.*shape"):
        load_model(_native(tmp_path, state))


def test_archive_member_escaping_the_target_is_refused(tmp_path, official_bundle_dir):
    archive = _tar_gz(official_bundle_dir, tmp_path / "evil.tar.gz", extra=[("../escaped.txt", b"pwned")])
    with pytest.raises(WeightsError, match="unsafe member"):
        load_model(archive)
    assert not list(tmp_path.rglob("escaped.txt"))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_execute_code_is_refused_and_never_runs(tmp_path):
    exploit = _Exploit()
    exploit.marker = tmp_path / "executed"
    model_dir = tmp_path / "enformer-pytorch"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    torch.save({"stem.0.weight": exploit}, model_dir / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="refused or unreadable"):
        load_model(model_dir)
    assert not exploit.marker.exists()


def test_cli_reports_bad_weights_in_one_line_and_writes_nothing(tmp_path):
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"not a checkpoint")
    dest = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(bogus), str(dest)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert not dest.exists()


def test_unknown_source(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights format"):
        load_model(tmp_path / "weights.h5")
