"""Load Enformer weights from every form users hold them in, without TensorFlow.

Sources (docs/spec.md §2), all mapped onto :class:`enformer_vep.model.Enformer`:

- our native ``.safetensors`` (configuration in its metadata);
- the Sonnet checkpoint ``enformer-fine-tuned-human-1`` (a tensor-bundle prefix);
- a TF-Hub / Kaggle SavedModel directory, or its ``.tar.gz``;
- an enformer-pytorch checkpoint (directory with ``config.json`` + ``pytorch_model.bin`` or
  ``model.safetensors``);
- an http(s) URL to any of the files above, downloaded once into the cache.

The configuration is always inferred from the tensors.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .atomic import atomic_path, sha256_file
from .download import UnreachableError, cache_dir, extract_savedmodel, fetch
from .errors import DownloadError, EnformerVepError, WeightsError
from .model import Enformer, EnformerConfig
from .tensor_bundle import TensorBundle

# The official TF-Hub Enformer (now served by Kaggle) as a compressed SavedModel.
DEFAULT_MODEL_URL = "https://www.kaggle.com/api/v1/models/deepmind/enformer/tensorFlow2/enformer/1/download"
NATIVE_FORMAT = "enformer-vep"

Transform = Callable[[np.ndarray], np.ndarray]


def _conv(w):  # Sonnet Conv1D [width, in, out] -> torch [out, in, width]
    return w.transpose(2, 1, 0)


def _linear(w):  # Sonnet Linear [in, out] -> torch [out, in]
    return w.T


def _pool(w):  # [in, out] logits matrix -> 1x1 conv [out, in, 1]
    return w.T[:, :, None]


def _bn_stat(w):  # [1, 1, C] -> [C]
    return w.reshape(-1)


def _same(w):
    return w


_BN_LEAVES = {"scale": ("weight", _same), "offset": ("bias", _same),
              "moving_mean/average": ("running_mean", _bn_stat),
              "moving_variance/average": ("running_var", _bn_stat)}
_BN = "(scale|offset|moving_mean/average|moving_variance/average)"
_TOWER = r"_trunk/_layers/1/_layers/(\d+)"
_LAYER = r"_trunk/_layers/2/_layers/(\d+)/_layers"

# (official object path below the Enformer module, our parameter name, kind)
_OFFICIAL_RULES = [
    (r"_trunk/_layers/0/_layers/0/(w|b)", r"stem.conv.\1", "conv"),
    (r"_trunk/_layers/0/_layers/1/_module/_layers/0/" + _BN, r"stem.pointwise.norm.\1", "bn"),
    (r"_trunk/_layers/0/_layers/1/_module/_layers/2/(w|b)", r"stem.pointwise.conv.\1", "conv"),
    (r"_trunk/_layers/0/_layers/2/_logit_linear/(w)", r"stem.pool.logits.\1", "pool"),
    (_TOWER + r"/_layers/0/_layers/0/" + _BN, r"conv_tower.\1.conv.norm.\2", "bn"),
    (_TOWER + r"/_layers/0/_layers/2/(w|b)", r"conv_tower.\1.conv.conv.\2", "conv"),
    (_TOWER + r"/_layers/1/_module/_layers/0/" + _BN, r"conv_tower.\1.pointwise.norm.\2", "bn"),
    (_TOWER + r"/_layers/1/_module/_layers/2/(w|b)", r"conv_tower.\1.pointwise.conv.\2", "conv"),
    (_TOWER + r"/_layers/2/_logit_linear/(w)", r"conv_tower.\1.pool.logits.\2", "pool"),
    (_LAYER + r"/0/_module/_layers/0/(scale|offset)", r"transformer.\1.attn_norm.\2", "ln"),
    (_LAYER + r"/0/_module/_layers/1/_(q|k|v)_layer/(w)", r"transformer.\1.attention.to_\2.\3", "linear"),
    (_LAYER + r"/0/_module/_layers/1/_r_k_layer/(w)", r"transformer.\1.attention.to_rel_k.\2", "linear"),
    (_LAYER + r"/0/_module/_layers/1/_embedding_layer/(w|b)", r"transformer.\1.attention.to_out.\2", "linear"),
    (_LAYER + r"/0/_module/_layers/1/_(r_w_bias|r_r_bias)", r"transformer.\1.attention.\2", "same"),
    (_LAYER + r"/1/_module/_layers/0/(scale|offset)", r"transformer.\1.mlp_norm.\2", "ln"),
    (_LAYER + r"/1/_module/_layers/1/(w|b)", r"transformer.\1.mlp_in.\2", "linear"),
    (_LAYER + r"/1/_module/_layers/4/(w|b)", r"transformer.\1.mlp_out.\2", "linear"),
    (r"_trunk/_layers/4/_layers/0/_layers/0/" + _BN, r"final.norm.\1", "bn"),
    (r"_trunk/_layers/4/_layers/0/_layers/2/(w|b)", r"final.conv.\1", "conv"),
    (r"_heads/([^/]+)/_layers/0/(w|b)", r"heads.\1.\2", "linear"),
]
# Exponential-moving-average internals: only the debiased `average` is the statistic (docs/spec.md §2.3, §9.6).
_OFFICIAL_IGNORED = re.compile(r".*/moving_(mean|variance)/(_hidden|_counter)")
_KINDS: dict[str, Transform] = {"conv": _conv, "linear": _linear, "pool": _pool, "same": _same}


def _official_name(path: str) -> tuple[str, Transform] | None:
    """Map an official object path (``_trunk/...`` or ``_heads/...``) to (our name, transform)."""
    for pattern, template, kind in _OFFICIAL_RULES:
        match = re.fullmatch(pattern, path)
        if match is None:
            continue
        name = match.expand(template)
        if kind in ("bn", "ln"):
            leaf = match.groups()[-1]
            new_leaf, transform = _BN_LEAVES[leaf]
            return name[: -len(leaf)] + new_leaf, transform
        name = re.sub(r"\.w$", ".weight", re.sub(r"\.b$", ".bias", name))
        return name, _same if name.endswith(".bias") else _KINDS[kind]
    return None


def convert_official(tensors: Mapping[str, Callable[[], np.ndarray]]) -> dict[str, torch.Tensor]:
    """Official tensors, keyed by object path (any prefix before ``_trunk/``/``_heads/``), to our names.

    ``tensors`` maps paths to zero-argument readers so that only needed tensors are read.
    Paths outside the Enformer module (optimizer slots, save counters) are ignored.
    """
    state: dict[str, torch.Tensor] = {}
    for path, read in tensors.items():
        match = re.search(r"(?:^|/)((?:_trunk|_heads)/.*)$", path)
        if match is None or _OFFICIAL_IGNORED.fullmatch(match.group(1)):
            continue
        mapped = _official_name(match.group(1))
        if mapped is None:
            raise WeightsError(f"unexpected tensor {path!r}: not part of the Enformer architecture")
        name, transform = mapped
        if name in state:
            continue  # the same variable reached through a second object path
        state[name] = torch.from_numpy(np.ascontiguousarray(transform(read()))).float()
    return state


# enformer-pytorch names (`lucidrains/enformer-pytorch`); `_trunk.N` aliases the named modules.
_PT_ALIASES = [(r"_trunk\.1\.", "stem."), (r"_trunk\.2\.", "conv_tower."),
               (r"_trunk\.4\.", "transformer."), (r"_trunk\.6\.", "final_pointwise.")]
_PT_RULES = [
    (r"stem\.0\.(.+)", r"stem.conv.\1"),
    (r"stem\.1\.fn\.0\.(.+)", r"stem.pointwise.norm.\1"),
    (r"stem\.1\.fn\.2\.(.+)", r"stem.pointwise.conv.\1"),
    (r"stem\.2\.to_attn_logits\.weight", r"stem.pool.logits.weight"),
    (r"conv_tower\.(\d+)\.0\.0\.(.+)", r"conv_tower.\1.conv.norm.\2"),
    (r"conv_tower\.(\d+)\.0\.2\.(.+)", r"conv_tower.\1.conv.conv.\2"),
    (r"conv_tower\.(\d+)\.1\.fn\.0\.(.+)", r"conv_tower.\1.pointwise.norm.\2"),
    (r"conv_tower\.(\d+)\.1\.fn\.2\.(.+)", r"conv_tower.\1.pointwise.conv.\2"),
    (r"conv_tower\.(\d+)\.2\.to_attn_logits\.weight", r"conv_tower.\1.pool.logits.weight"),
    (r"transformer\.(\d+)\.0\.fn\.0\.(.+)", r"transformer.\1.attn_norm.\2"),
    (r"transformer\.(\d+)\.0\.fn\.1\.(to_q|to_k|to_v|to_out|to_rel_k)\.(.+)", r"transformer.\1.attention.\2.\3"),
    (r"transformer\.(\d+)\.0\.fn\.1\.rel_content_bias", r"transformer.\1.attention.r_w_bias"),
    (r"transformer\.(\d+)\.0\.fn\.1\.rel_pos_bias", r"transformer.\1.attention.r_r_bias"),
    (r"transformer\.(\d+)\.1\.fn\.0\.(.+)", r"transformer.\1.mlp_norm.\2"),
    (r"transformer\.(\d+)\.1\.fn\.1\.(.+)", r"transformer.\1.mlp_in.\2"),
    (r"transformer\.(\d+)\.1\.fn\.4\.(.+)", r"transformer.\1.mlp_out.\2"),
    (r"final_pointwise\.1\.0\.(.+)", r"final.norm.\1"),
    (r"final_pointwise\.1\.2\.(.+)", r"final.conv.\1"),
    (r"_heads\.([^.]+)\.0\.(.+)", r"heads.\1.\2"),
]


def convert_enformer_pytorch(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An enformer-pytorch state dict to our names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for alias, name in _PT_ALIASES:
            key = re.sub("^" + alias, name, key)
        for pattern, template in _PT_RULES:
            match = re.fullmatch(pattern, key)
            if match:
                name = match.expand(template)
                if name.endswith("pool.logits.weight"):  # Conv2d [C, C, 1, 1] -> Conv1d [C, C, 1]
                    value = value[..., 0]
                out.setdefault(name, value.detach().float().contiguous())
                break
        else:
            raise WeightsError(f"unexpected tensor {key!r} in the enformer-pytorch checkpoint")
    return out


def infer_config(state: Mapping[str, torch.Tensor]) -> EnformerConfig:
    """Derive the architecture from our-named tensors (never asked of the user)."""
    try:
        channels = 2 * state["stem.conv.weight"].shape[0]
        tower = sorted({int(m.group(1)) for k in state if (m := re.match(r"conv_tower\.(\d+)\.", k))})
        layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer\.(\d+)\.", k))})
        heads = {m.group(1): state[k].shape[0] for k in state if (m := re.fullmatch(r"heads\.([^.]+)\.bias", k))}
        config = dict(channels=channels, num_transformer_layers=len(layers), heads=heads,
                      conv_filters=[state[f"conv_tower.{i}.conv.conv.weight"].shape[0] for i in tower],
                      pooling_type="attention" if "stem.pool.logits.weight" in state else "max")
        if layers:
            _, num_heads, _, key_size = state["transformer.0.attention.r_w_bias"].shape
            config.update(num_heads=num_heads, key_size=key_size,
                          value_size=state["transformer.0.attention.to_v.weight"].shape[0] // num_heads,
                          num_relative_position_features=state["transformer.0.attention.to_rel_k.weight"].shape[1])
        else:
            config.update(channels=state["final.conv.weight"].shape[1])
        if tower != list(range(len(tower))) or layers != list(range(len(layers))):
            raise WeightsError("conv tower or transformer layers are not numbered 0..n-1")
        return EnformerConfig(**config)
    except KeyError as missing:
        raise WeightsError(f"missing tensor {missing.args[0]!r}: these are not complete Enformer weights") from None
    except ValueError as error:
        raise WeightsError(f"inconsistent weights: {error}") from None


def build_model(state: Mapping[str, torch.Tensor]) -> Enformer:
    """An eval-mode model holding ``state``; any missing, extra or misshapen tensor is an error."""
    model = Enformer(infer_config(state))
    # num_batches_tracked only counts training steps; no source holds it
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise WeightsError(f"weights do not fit the architecture: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise WeightsError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                               f"the architecture needs {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


# --- readers -------------------------------------------------------------------------------

def read_bundle(prefix: str | Path) -> dict[str, torch.Tensor]:
    """A TF tensor bundle (Sonnet checkpoint or SavedModel ``variables/variables``) to our names."""
    bundle = TensorBundle(prefix)
    paths = bundle.object_paths()
    if paths is None:  # no object graph: keys are object paths themselves
        paths = {re.sub(r"/\.ATTRIBUTES/VARIABLE_VALUE$", "", key): key for key in bundle.keys()}
    return convert_official({path: (lambda key=key: bundle.read(key)) for path, key in paths.items()})


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format") == NATIVE_FORMAT:
        return state
    return convert_enformer_pytorch(state)


def _read_pytorch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:  # weights_only: a pickle that would run code is refused, never executed
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad pickles
        raise WeightsError(f"{path}: refused or unreadable PyTorch checkpoint "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return convert_enformer_pytorch(state)


def read_state(source: str | Path) -> dict[str, torch.Tensor]:
    """Our-named float32 tensors from a local file or directory of any supported form."""
    path = Path(source)
    bundle_index = Path(str(path) + ".index")
    if path.is_dir():
        if (path / "variables" / "variables.index").is_file():
            return read_bundle(path / "variables" / "variables")
        for name, reader in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_pytorch_bin)):
            if (path / name).is_file():
                return reader(path / name)
        raise WeightsError(f"{path}: no variables/variables.index (SavedModel), model.safetensors "
                           f"or pytorch_model.bin (enformer-pytorch) inside")
    if bundle_index.is_file() or path.suffix == ".index":
        return read_bundle(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file, directory or checkpoint prefix")
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return read_bundle(_extracted(path) / "variables" / "variables")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _read_pytorch_bin(path)
    raise WeightsError(f"{path}: unknown weights format (expected .safetensors, a SavedModel directory "
                       f"or .tar.gz, a Sonnet checkpoint prefix, or an enformer-pytorch checkpoint)")


def _extracted(archive: Path) -> Path:
    """The SavedModel inside ``archive``, extracted once into the cache (keyed by content)."""
    target = cache_dir() / "savedmodels" / sha256_file(archive)[:16]
    if (target / "variables" / "variables.index").is_file():
        return target
    return extract_savedmodel(archive, target)


# --- native format -------------------------------------------------------------------------

def save_native(state: Mapping[str, torch.Tensor], dest: str | Path, source: str = "") -> Path:
    """Write our native ``.safetensors`` (atomically: a temporary name, then rename). Batch norm's
    ``num_batches_tracked`` counters (torch bookkeeping, not weights) are left out, so a model's
    ``state_dict()`` can be passed as it is."""
    from safetensors.torch import save_file
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    config = infer_config(state)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": NATIVE_FORMAT, "config": json.dumps(config.to_dict()),
                "enformer_vep_version": __version__, "source": str(source)}
    with atomic_path(dest) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return dest


def convert(source: str | Path, dest: str | Path) -> EnformerConfig:
    """Convert any supported source (or URL) to our native ``.safetensors`` at ``dest``."""
    state = read_state(_local(str(source)))
    config = build_model(state).config  # refuse to write weights that do not make a model
    save_native(state, dest, source=str(source))
    return config


_LOCAL_COPY = ("pass a local copy instead: --model PATH or ENFORMER_VEP_MODEL=PATH (a .safetensors file, "
               "a SavedModel directory or .tar.gz, a Sonnet checkpoint prefix, or an enformer-pytorch directory)")


def _local(source: str) -> Path:
    """A local path for ``source``; URLs are downloaded (resumably) into the cache."""
    if not re.match(r"https?://", source):
        return Path(source)
    try:
        return fetch(source)
    except UnreachableError as error:
        raise UnreachableError(f"{error} -- offline? {_LOCAL_COPY}") from None
    except DownloadError as error:
        raise DownloadError(f"{error} -- or {_LOCAL_COPY}") from None


def _cached_conversion(url: str) -> Path:
    """Download ``url`` once, convert once, and reuse the native file afterwards."""
    converted = cache_dir() / "converted" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".safetensors")
    if not converted.is_file():
        convert(url, converted)
    return converted


def source_digest(source: str | Path) -> str:
    """SHA-256 identifying the weights of ``source``: of the file, of every file of a directory
    or checkpoint prefix (names included), or of the converted file a URL was cached as."""
    with _naming_origin(source):
        return _source_digest(str(source))


def _source_digest(source: str) -> str:
    path = _cached_conversion(source) if re.match(r"https?://", source) else Path(source)
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
        sorted(path.parent.glob(glob.escape(path.name) + ".*"))
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(path) if path.is_dir() else file.name
        digest.update(str(name).encode() + bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


class _FromEnvironment(str):
    """A model source read from ``$ENFORMER_VEP_MODEL``: errors about it say where it came from,
    also when a caller passes it on explicitly (``load_model(default_model_source())``)."""


def default_model_source() -> str:
    """``$ENFORMER_VEP_MODEL``, else :data:`DEFAULT_MODEL_URL`."""
    value = os.environ.get("ENFORMER_VEP_MODEL")
    return _FromEnvironment(value) if value else DEFAULT_MODEL_URL


@contextlib.contextmanager
def _naming_origin(source: object) -> Iterator[None]:
    """Prefix errors about a source taken from ``$ENFORMER_VEP_MODEL`` with ``$ENFORMER_VEP_MODEL=VALUE: ``:
    a user who never typed the path must learn where it came from. Library errors keep their type; an
    OSError on a file of the source (permissions...) becomes a WeightsError; other OSErrors (a full
    disk while converting into the cache) are not the variable's fault and pass unchanged."""
    if not isinstance(source, _FromEnvironment):
        yield
        return
    value = str(source)
    try:
        yield
    except EnformerVepError as error:
        raise type(error)(_from_environment(value, str(error))) from error
    except OSError as error:
        inside = isinstance(error.filename, (str, os.PathLike)) and not re.match(r"https?://", value) and \
            os.path.abspath(error.filename).startswith(os.path.abspath(value))  # its files, prefix.index...
        if not inside or error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise WeightsError(_from_environment(value, f"{error.filename}: {error.strerror or error}")) from error


def _from_environment(value: str, message: str) -> str:
    for shown in (value, str(Path(value))):  # a message that starts with the path itself need not repeat it
        if message.startswith(shown + ": "):
            message = message[len(shown) + 2:]
            break
    return f"$ENFORMER_VEP_MODEL={value}: {message}"


def load_model(source: str | Path | None = None, device: str | torch.device = "cpu") -> Enformer:
    """The Enformer in eval mode from weights in any supported form.

    Parameters
    ----------
    source : str or Path, optional
        Our ``.safetensors``; a TF-Hub SavedModel directory or ``.tar.gz``; a Sonnet checkpoint
        prefix; an enformer-pytorch directory; or an http(s) URL to one of these (downloaded once
        into the cache, resumably, converted once). Default: ``$ENFORMER_VEP_MODEL``, else the
        official TF-Hub Enformer (``DEFAULT_MODEL_URL``); errors about a source from the variable
        (also as returned by :func:`default_model_source`) start with ``$ENFORMER_VEP_MODEL=VALUE:``.
    device : str or torch.device
        Where the model lives.

    Returns
    -------
    Enformer
        In eval mode, architecture read from the tensors (docs/spec.md §2 gives the name mapping).

    Raises
    ------
    WeightsError
        Missing, corrupt (CRC), unsafe (pickle code) or mis-shaped weights.
    DownloadError
        A URL that cannot be fetched or fails verification (the message says how to pass a local copy).
    """
    source = default_model_source() if source is None else source
    with _naming_origin(source):
        source = str(source)
        path = _cached_conversion(source) if re.match(r"https?://", source) else Path(source)
        return build_model(read_state(path)).to(device)
