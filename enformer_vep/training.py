"""Training, evaluation and fine-tuning (docs/spec.md §8: the released training notebook).

* :func:`poisson_loss` -- ``mean(pred - target * log(pred + 1e-7))`` (Keras' ``poisson``).
* :func:`train` -- Adam with a linear warm-up, one step per head per global step (human, then
  mouse), optional gradient clipping and bf16 autocast (CUDA), atomic checkpoints from which a
  run resumes exactly (bit-for-bit on CPU).
* :func:`evaluate` -- streaming Pearson r per track over all bins of all sequences.
* :func:`replace_head` / :func:`freeze_trunk` -- fine-tuning on the user's own tracks.

Data: per head, batches ``(x float32 [B, L, 4], y float32 [B, target_length, n_tracks])`` (numpy
arrays or tensors). Give :func:`train` either an iterator or, better, a *factory*: a callable that
returns a fresh iterable of one pass over the data (an epoch). Factories may take keyword
arguments ``epoch`` (0, 1, ...: e.g. to reshuffle) and ``skip`` (batches to leave out at the start,
when resuming); without ``skip`` the batches already consumed are read and discarded on resume.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write
from .errors import InputError
from .model import Enformer
from .targets import require_head

log = logging.getLogger("enformer_vep")

POISSON_EPSILON = 1e-7
CHECKPOINT_FORMAT = "enformer_vep.training/1"

Batch = tuple[Any, Any]
DataSource = Callable[..., Iterable[Batch]] | Iterable[Batch]


# --- loss and schedule ------------------------------------------------------------------------

def poisson_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Poisson negative log-likelihood without the target-only term: ``mean(pred - target * log(pred + 1e-7))``.

    Computed in float32 (or float64 when both inputs are float64) whatever the inputs' dtype.
    """
    dtype = torch.float64 if pred.dtype == target.dtype == torch.float64 else torch.float32
    pred, target = pred.to(dtype), target.to(device=pred.device, dtype=dtype)
    return (pred - target * torch.log(pred + POISSON_EPSILON)).mean()


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of global step ``step`` (0-based): ``min(1, (step + 1) / warmup_steps)``.

    Global step 1 (``step`` 0) gets ``lr / warmup_steps``; from step ``warmup_steps`` on, the full
    rate. (The notebook leaves step 1 at 0 and then uses ``min(1, g / warmup)`` for step g >= 2;
    ours only differs on step 1.)
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@dataclasses.dataclass
class TrainConfig:
    """Options of :func:`train`. ``steps`` counts global steps (one batch per head each)."""

    steps: int = 150_000
    learning_rate: float = 5e-4
    warmup_steps: int = 5_000
    clip_grad_norm: float | None = None  # the notebook defines 0.2 but never applies it
    bf16: bool = False                   # bf16 autocast of the forward pass; CUDA only
    seed: int = 0
    checkpoint_every: int | None = 1_000
    heads: list[str] | None = None       # order of the per-head steps; None: the model's order

    def __post_init__(self):
        if self.steps < 0:
            raise InputError("steps must be >= 0")
        if self.learning_rate <= 0:
            raise InputError("learning_rate must be > 0")
        if self.warmup_steps < 0:
            raise InputError("warmup_steps must be >= 0")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise InputError("clip_grad_norm must be > 0 (or None: no clipping)")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise InputError("checkpoint_every must be > 0 (or None: only at the end)")
        if self.heads is not None:
            self.heads = [str(h) for h in self.heads]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, config: TrainConfig
                   ) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam over the trainable parameters and its warm-up schedule (stepped once per global step)."""
    params = trainable_parameters(model)
    if not params:
        raise InputError("the model has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup))
    return optimizer, scheduler


# --- data streams -----------------------------------------------------------------------------

def _accepts(func: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class _HeadStream:
    """Batches of one head, counting what was consumed (``epoch``, ``position``) so a resumed run
    can continue at the same batch."""

    def __init__(self, head: str, source: DataSource, epoch: int = 0, position: int = 0):
        self.head = head
        self.factory = source if callable(source) and not hasattr(source, "__next__") else None
        if self.factory is None and epoch:
            raise InputError(f"the {head} data is a plain iterator, which cannot restart epoch {epoch}: "
                             "pass a factory (a callable returning a fresh iterable)")
        self.epoch, self.position = epoch, position
        self._iterator = self._open(source)

    def _open(self, source: DataSource | None = None) -> Iterator[Batch]:
        if self.factory is None:
            iterator = iter(source)
            return itertools.islice(iterator, self.position, None) if self.position else iterator
        kwargs = {}
        if _accepts(self.factory, "epoch"):
            kwargs["epoch"] = self.epoch
        skip_here = self.position and _accepts(self.factory, "skip")
        if skip_here:
            kwargs["skip"] = self.position
        iterator = iter(self.factory(**kwargs))
        if self.position and not skip_here:
            iterator = itertools.islice(iterator, self.position, None)
        return iterator

    def __next__(self) -> Batch:
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.factory is None:
                raise
            self.epoch, self.position = self.epoch + 1, 0
            self._iterator = self._open()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise InputError(f"the {self.head} data yielded no batches") from None
        self.position += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def _to_tensor(value, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if not tensor.is_floating_point() or tensor.dtype != torch.float32:
        tensor = tensor.float()
    return tensor.to(device, non_blocking=True)


# --- RNG state --------------------------------------------------------------------------------

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state_to_plain(np.random.get_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_to_plain(state) -> list:
    kind, keys, pos, has_gauss, cached = state
    return [kind, torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)), int(pos),
            int(has_gauss), float(cached)]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` with :func:`torch.save` atomically (a temporary name, fsync, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by :func:`train` (only tensors and plain values: ``weights_only``)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an enformer_vep training checkpoint")
    return state


def save_trained(model: Enformer, dest: str | Path, source: str = "") -> Path:
    """The trained weights as our native ``.safetensors`` (loadable by ``weights.load_model``)."""
    from .weights import save_native
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return save_native(state, dest, source=source)


# --- training ---------------------------------------------------------------------------------

def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, keeping batch norm in eval mode while the trunk is frozen (:func:`freeze_trunk`)."""
    model.train()
    if getattr(model, "trunk_frozen", False):
        for module in _trunk_modules(model):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_step(model: Enformer, optimizer: torch.optim.Optimizer, head: str, batch: Batch,
               config: TrainConfig) -> float:
    """One optimizer step on ``head``'s Poisson loss for ``batch``; returns the loss."""
    device = next(model.parameters()).device
    x, y = (_to_tensor(v, device) for v in batch)
    n_tracks = model.heads[head].out_features
    if y.ndim != 3 or y.shape[-1] != n_tracks or y.shape[0] != x.shape[0]:
        raise InputError(f"{head} targets have shape {tuple(y.shape)}; the head needs "
                         f"[{x.shape[0]}, {model.config.target_length}, {n_tracks}]")
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, config.bf16):
        pred = model.head_tracks(model.trunk(x), head)
    loss = poisson_loss(pred, y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the {head} loss is {loss.item()}")
    loss.backward()
    if config.clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(trainable_parameters(model), config.clip_grad_norm)
    optimizer.step()
    return float(loss.item())


def train(model: Enformer, data: Mapping[str, DataSource], config: TrainConfig,
          checkpoint_path: str | Path | None = None, progress: bool = True,
          resume: bool = True) -> list[dict[str, float]]:
    """Train ``model`` in place for ``config.steps`` global steps; returns the per-step losses
    ``[{head: loss}, ...]`` of the whole run (steps before a resume included).

    Each global step takes one batch per head from ``data[head]`` and makes one Adam step on it,
    heads in ``config.heads`` order (default: the model's, i.e. human then mouse). The learning
    rate warms up linearly over ``config.warmup_steps`` global steps. With ``checkpoint_path``,
    everything a run depends on (weights, optimizer, schedule, step, RNG states, data positions,
    losses) is written there atomically every ``config.checkpoint_every`` steps and at the end; if
    the file exists (and ``resume``), the run continues from it exactly where it stopped.
    """
    if config.bf16 and next(model.parameters()).device.type != "cuda":
        raise InputError("bf16 training needs a CUDA device (--device cuda); on the CPU train without --bf16")
    heads = config.heads if config.heads is not None else [h for h in model.heads if h in data]
    if not heads:
        raise InputError(f"no data for any of the model's heads ({', '.join(model.heads)})")
    for head in heads:
        require_head(head, model.heads)
        if head not in data:
            raise InputError(f"no data for the {head!r} head")

    optimizer, scheduler = make_optimizer(model, config)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    history: list[dict[str, float]] = []
    positions = {head: {"epoch": 0, "position": 0} for head in heads}
    if checkpoint_path is not None and resume and checkpoint_path.exists():
        device = next(model.parameters()).device
        state = load_checkpoint(checkpoint_path, map_location=device)
        if state["heads"] != heads:
            raise InputError(f"{checkpoint_path}: trained heads {state['heads']}, this run has {heads}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = [dict(h) for h in state["history"]]
        positions = state["data"]
        _set_rng_state(state["rng"])
        log.info("resuming from %s at step %d", checkpoint_path, len(history))
    else:
        torch.manual_seed(config.seed)
    start = len(history)
    streams = {head: _HeadStream(head, data[head], **positions[head]) for head in heads}

    def checkpoint():
        save_checkpoint(checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "step": len(history), "heads": heads,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": history,
            "data": {head: stream.state() for head, stream in streams.items()},
            "rng": _rng_state(), "train_config": config.to_dict(),
            "model_config": model.config.to_dict() if hasattr(model.config, "to_dict") else {}})

    from tqdm import tqdm
    was_training = model.training
    set_train_mode(model)
    bar = tqdm(total=config.steps, initial=min(start, config.steps), unit="step", desc="training",
               disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, config.steps):
            losses = {}
            for head in heads:
                try:
                    batch = next(streams[head])
                except StopIteration:
                    log.warning("the %s data ran out after %d steps", head, step)
                    return history
                losses[head] = train_step(model, optimizer, head, batch, config)
            scheduler.step()
            history.append(losses)
            bar.update(1)
            bar.set_postfix({f"{h}_loss": f"{v:.4f}" for h, v in losses.items()}, refresh=False)
            done = step + 1
            if checkpoint_path is not None and (
                    done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                checkpoint()
    finally:
        bar.close()
        if not was_training:
            model.eval()
    return history


# --- evaluation -------------------------------------------------------------------------------

class PearsonAccumulator:
    """Per-column Pearson r of two streams of ``[..., K]`` arrays, merged batch by batch in float64
    (Chan et al.'s pairwise update of means and centred sums: no cancellation of large sums)."""

    def __init__(self, n_columns: int):
        self.n = 0
        self.mean_x = np.zeros(n_columns)
        self.mean_y = np.zeros(n_columns)
        self.m2_x = np.zeros(n_columns)
        self.m2_y = np.zeros(n_columns)
        self.c_xy = np.zeros(n_columns)

    def update(self, x, y) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.mean_x.size)
        y = np.asarray(y, dtype=np.float64).reshape(-1, self.mean_x.size)
        m = x.shape[0]
        if m == 0:
            return
        bx, by = x.mean(0), y.mean(0)
        dx, dy = x - bx, y - by
        n = self.n + m
        ex, ey = bx - self.mean_x, by - self.mean_y
        w = self.n * m / n
        self.m2_x += (dx * dx).sum(0) + ex * ex * w
        self.m2_y += (dy * dy).sum(0) + ey * ey * w
        self.c_xy += (dx * dy).sum(0) + ex * ey * w
        self.mean_x += ex * m / n
        self.mean_y += ey * m / n
        self.n = n

    def pearson(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.c_xy / np.sqrt(self.m2_x * self.m2_y)


@dataclasses.dataclass
class EvalResult:
    """Pearson r of head ``head``'s columns ``tracks`` over ``n_bins`` bins (all sequences)."""

    head: str
    tracks: np.ndarray        # head column indices
    r: np.ndarray             # float64, one per track (NaN where a track is constant)
    n_bins: int
    n_sequences: int
    loss: float               # mean Poisson loss over the evaluated bins and tracks

    @property
    def mean_r(self) -> float:
        """Mean r over the tracks (constant tracks, whose r is undefined, left out)."""
        finite = self.r[np.isfinite(self.r)]
        return float(finite.mean()) if finite.size else float("nan")

    def write_tsv(self, path: str | Path, targets=None) -> Path:
        """Columns ``index identifier description r``; ``targets`` (a :class:`targets.Targets` of the
        whole head) names the tracks, else those columns are empty."""
        path = Path(path)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["index", "identifier", "description", "r"])
            for index, r in zip(self.tracks, self.r, strict=True):
                ident = targets.ids[index] if targets is not None else ""
                label = targets.labels[index] if targets is not None else ""
                writer.writerow([int(index), ident, label, "nan" if math.isnan(r) else f"{r:.6f}"])
        return path


def evaluate(model: Enformer, batches: Iterable[Batch], head: str, tracks: Sequence[int] | None = None,
             *, max_batches: int | None = None, bf16: bool = False, progress: bool = False) -> EvalResult:
    """Pearson r per track between predictions and targets over all bins of all ``batches``.

    ``tracks``: head column indices (None: all); targets may hold all the head's columns (they are
    then selected) or exactly the chosen ones. The model runs in eval mode (restored afterwards).
    """
    require_head(head, model.heads)
    n_head = model.heads[head].out_features
    columns = np.arange(n_head) if tracks is None else np.asarray(tracks, dtype=np.int64).reshape(-1)
    if columns.size == 0 or columns.min() < 0 or columns.max() >= n_head:
        raise InputError(f"tracks must be column indices 0..{n_head - 1} of the {head} head")
    device = next(model.parameters()).device
    index = torch.as_tensor(columns, device=device)
    accumulator = PearsonAccumulator(columns.size)
    loss_sum, loss_count, n_sequences = 0.0, 0, 0
    was_training = model.training
    model.eval()
    from tqdm import tqdm
    try:
        for batch in tqdm(itertools.islice(batches, max_batches), desc="evaluating", unit="batch",
                          disable=not progress):
            x, y = (_to_tensor(v, device) for v in batch)
            if y.shape[-1] == n_head and columns.size != n_head:
                y = y[..., index]
            if y.shape[-1] != columns.size:
                raise InputError(f"targets have {y.shape[-1]} tracks; expected {n_head} or {columns.size}")
            with torch.inference_mode(), _autocast(device, bf16):
                pred = model.predict_tracks(x, head, None if tracks is None else index)
            pred = pred.float()
            if pred.shape != y.shape:
                raise InputError(f"targets have shape {tuple(y.shape)}, predictions {tuple(pred.shape)}")
            loss_sum += float(poisson_loss(pred, y)) * y.numel()
            loss_count += y.numel()
            n_sequences += x.shape[0]
            accumulator.update(pred.cpu().numpy(), y.cpu().numpy())
    finally:
        if was_training:
            model.train()
    if n_sequences == 0:
        raise InputError("no batches to evaluate")
    return EvalResult(head=head, tracks=columns, r=accumulator.pearson(), n_bins=accumulator.n,
                      n_sequences=n_sequences, loss=loss_sum / loss_count)


# --- fine-tuning ------------------------------------------------------------------------------

def replace_head(model: Enformer, name: str, n_tracks: int) -> nn.Linear:
    """Add head ``name`` with ``n_tracks`` outputs, or replace it if it exists, and return it.

    Like the released heads: ``softplus(Linear(2C -> n_tracks))`` on the trunk's embedding, freshly
    initialised (torch's ``nn.Linear`` default), on the model's device and dtype; ``model.config.heads``
    is updated. Other heads are kept (and stay unchanged by training on this one).
    """
    if not name or "." in name or not name.isprintable():
        raise InputError(f"invalid head name {name!r}")
    if n_tracks < 1:
        raise InputError("a head needs at least one track")
    reference = model.final.conv.weight
    in_features = 2 * model.config.channels
    linear = nn.Linear(in_features, int(n_tracks)).to(device=reference.device, dtype=reference.dtype)
    model.heads[name] = linear
    model.config.heads[name] = int(n_tracks)
    return linear


def _trunk_modules(model: nn.Module) -> Iterator[nn.Module]:
    heads = set(model.heads.modules())
    return (m for m in model.modules() if m not in heads)


def freeze_trunk(model: Enformer, frozen: bool = True) -> None:
    """Freeze (or, with ``frozen=False``, unfreeze) everything but the heads: no gradients, and
    batch norm in eval mode (running statistics fixed) under :func:`train`/:func:`set_train_mode`."""
    head_params = {id(p) for p in model.heads.parameters()}
    for p in model.parameters():
        if id(p) not in head_params:
            p.requires_grad_(not frozen)
    model.trunk_frozen = frozen
    for module in _trunk_modules(model):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(model.training and not frozen)



