"""Enformer (Avsec et al. 2021) in PyTorch, numerically faithful to DeepMind's Sonnet code.

Architecture and traps: docs/spec.md §1 and §9. Tensors follow the official axis order
``[batch, length, channels]`` at the interfaces; the convolutional stages work on
``[batch, channels, length]`` internally because that is what ``nn.Conv1d`` wants.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEQUENCE_LENGTH = 196_608
HUB_SEQUENCE_LENGTH = 393_216  # the TF-Hub module's input; only its centre is used
TARGET_LENGTH = 896
BIN_SIZE = 128


def exponential_linspace_int(start: int, end: int, num: int, divisible_by: int = 1) -> list[int]:
    """The conv tower's filter counts, rounded like the official code (``np.round``)."""
    base = math.exp(math.log(end / start) / (num - 1))
    return [int(np.round(start * base**i / divisible_by) * divisible_by) for i in range(num)]


@dataclasses.dataclass
class EnformerConfig:
    """Hyper-parameters; the defaults are the released model, unset fields are derived.

    Attributes
    ----------
    channels : int
        Transformer width C (1536); the stem has C/2, the conv tower ends with C.
    num_heads, key_size, value_size : int
        Attention heads (8), key size (64), value size (C / heads).
    num_transformer_layers : int
        11 in the released model.
    pooling_type : str
        ``attention`` (softmax pooling, the released model) or ``max``.
    heads : dict of str to int
        Output heads and their tracks (``{"human": 5313, "mouse": 1643}``).
    num_relative_position_features : int
        Relative-position features (C / heads; divisible by 6).
    conv_filters : list of int
        The conv tower's six filter counts (derived from C as the official code does).
    target_length : int
        Output bins kept after the crop (896).
    """

    channels: int = 1536
    num_heads: int = 8
    num_transformer_layers: int = 11
    pooling_type: str = "attention"
    heads: dict[str, int] = dataclasses.field(default_factory=lambda: {"human": 5313, "mouse": 1643})
    key_size: int = 64
    value_size: int | None = None
    num_relative_position_features: int | None = None
    conv_filters: list[int] | None = None
    target_length: int = TARGET_LENGTH

    def __post_init__(self):
        if self.pooling_type not in ("attention", "max"):
            raise ValueError(f"pooling_type must be 'attention' or 'max', not {self.pooling_type!r}")
        if self.value_size is None:
            self.value_size = self.channels // self.num_heads
        if self.num_relative_position_features is None:
            self.num_relative_position_features = self.channels // self.num_heads
        if self.num_relative_position_features % 6:
            raise ValueError("num_relative_position_features must be divisible by 6 "
                             "(3 feature functions x symmetric/antisymmetric)")
        if self.conv_filters is None:
            self.conv_filters = exponential_linspace_int(self.channels // 2, self.channels, 6, divisible_by=128)
        self.conv_filters = [int(f) for f in self.conv_filters]
        self.heads = {str(k): int(v) for k, v in self.heads.items()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The official sigmoid approximation; torch's exact or tanh GELU differ (docs/spec.md §1.2, §9.2)."""
    return x * torch.sigmoid(1.702 * x)


class ConvBlock(nn.Module):
    """Pre-activation block: BatchNorm -> GELU -> Conv1d(width, SAME). ``[B, C_in, L] -> [B, C_out, L]``."""

    def __init__(self, in_channels: int, out_channels: int, width: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_channels, eps=1e-5, momentum=0.1)
        self.conv = nn.Conv1d(in_channels, out_channels, width, padding=width // 2)

    def forward(self, x):
        return self.conv(gelu(self.norm(x)))


class SoftmaxPool(nn.Module):
    """Per-channel softmax-weighted pooling over windows of 2. ``[B, C, L] -> [B, C, L/2]``.

    ``logits`` holds the official ``_logit_linear/w`` (``[C, C]``, no bias) as a 1x1 convolution.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.logits = nn.Conv1d(channels, channels, 1, bias=False)
        with torch.no_grad():  # the official initialisation: 2 x identity
            self.logits.weight.copy_(2.0 * torch.eye(channels)[:, :, None])

    def forward(self, x):
        b, c, length = x.shape
        if length % 2:
            raise ValueError(f"softmax pooling needs an even length, got {length}")
        pairs = x.view(b, c, length // 2, 2)
        first, second = pairs[..., 0], pairs[..., 1]
        # A softmax over two logits is sigmoid(l0 - l1), and the logits are linear without bias,
        # so l0 - l1 = W (x0 - x1): half the matrix products of the official form, same result.
        delta = first - second
        return second + delta * torch.sigmoid(self.logits(delta))


def make_pool(channels: int, pooling_type: str) -> nn.Module:
    return SoftmaxPool(channels) if pooling_type == "attention" else nn.MaxPool1d(2)


class DownsampleBlock(nn.Module):
    """``conv`` ; Residual(pointwise ConvBlock) ; pool(2): the stem and each conv-tower block."""

    def __init__(self, conv: nn.Module, channels: int, pooling_type: str):
        super().__init__()
        self.conv = conv
        self.pointwise = ConvBlock(channels, channels, 1)
        self.pool = make_pool(channels, pooling_type)

    def forward(self, x):
        x = self.conv(x)
        return self.pool(x + self.pointwise(x))


# --- relative positional features (docs/spec.md §1.3) -------------------------------------------------

def _official_gamma_tables() -> dict[str, np.ndarray]:
    """The official float32 gamma basis, ``gamma_n{basis}_T{T}``: ``[T, basis]`` for |d| = 0..T-1."""
    with resources.files("enformer_vep").joinpath("data/tf_gamma.npz").open("rb") as f:
        with np.load(f) as tables:
            return dict(tables)


@functools.cache
def _gamma_table(num_basis: int, seq_len: int) -> np.ndarray | None:
    return _official_gamma_tables().get(f"gamma_n{num_basis}_T{seq_len}")


def _gamma_features(abs_d: torch.Tensor, num_basis: int, seq_len: int) -> torch.Tensor:
    """Gamma-pdf basis ``[P, num_basis]``, each function divided by its own max over positions.

    The official code computes this in float32, where lgamma/xlogy cancel badly; for the
    released sizes we use its exact float32 values (shipped tables), elsewhere the same
    float32 formula.
    """
    table = _gamma_table(num_basis, seq_len)
    if table is not None:
        return torch.from_numpy(table)[abs_d.long()]
    x = abs_d.float()[:, None]
    stddev = seq_len / (2 * num_basis)
    mean = torch.linspace(seq_len / num_basis, seq_len, num_basis, dtype=torch.float32)[None, :]
    concentration = (mean / stddev) ** 2
    rate = mean / stddev**2
    log_unnormalized = torch.xlogy(concentration - 1.0, x) - rate * x
    log_normalization = torch.lgamma(concentration) - concentration * torch.log(rate)
    probabilities = torch.exp(log_unnormalized - log_normalization) + 1e-8
    return probabilities / probabilities.amax(dim=0, keepdim=True)


@torch.compiler.disable  # a cached table: nothing for torch.compile to trace
@functools.lru_cache(maxsize=16)
@torch.inference_mode(False)  # a cached inference tensor could not be used by autograd later
def relative_position_features(seq_len: int, num_features: int) -> torch.Tensor:
    """Features of distances ``d = -(T-1)..T-1``: ``[2T-1, num_features]`` float32 (CPU, cached).

    Layout: [exponential | central_mask | gamma] of |d|, then the same times sign(d).
    """
    num_basis = num_features // 6
    d = torch.arange(-(seq_len - 1), seq_len, dtype=torch.float32)
    abs_d = d.abs()
    max_range = torch.log(torch.tensor(float(seq_len))) / torch.log(torch.tensor(2.0))
    half_life = torch.pow(2.0, torch.linspace(3.0, float(max_range), num_basis))
    exponential = torch.exp(-torch.log(torch.tensor(2.0)) / half_life[None, :] * abs_d[:, None])
    widths = torch.pow(2.0, torch.arange(1, num_basis + 1, dtype=torch.float32)) - 1
    central_mask = (widths[None, :] > abs_d[:, None]).float()
    symmetric = torch.cat([exponential, central_mask, _gamma_features(abs_d, num_basis, seq_len)], dim=-1)
    return torch.cat([symmetric, torch.sign(d)[:, None] * symmetric], dim=-1)


def relative_shift(x: torch.Tensor) -> torch.Tensor:
    """Transformer-XL shift ``[B, H, T, 2T-1] -> [B, H, T, T]``: entry (i, j) takes distance j - i.

    Column ``n`` of ``x`` holds distance ``n - (T-1)``, so entry (i, j) is column ``j - i + T - 1``:
    row i of the result starts ``T-1-i`` elements into row i of ``x``, a strided view (no copy;
    the official pad-reshape-slice form copies the ``[B, H, T, 2T-1]`` logits twice).
    """
    b, h, t, n = x.shape
    x = x.contiguous()
    return x.as_strided((b, h, t, t), (h * t * n, t * n, n - 1, 1), x.storage_offset() + t - 1)


class MultiHeadAttention(nn.Module):
    """Relative-position multi-head attention. ``[B, T, C] -> [B, T, C]``."""

    def __init__(self, cfg: EnformerConfig, attention_dropout: float = 0.05, positional_dropout: float = 0.01):
        super().__init__()
        h, k, v = cfg.num_heads, cfg.key_size, cfg.value_size
        self.num_heads, self.key_size = h, k
        self.to_q = nn.Linear(cfg.channels, h * k, bias=False)
        self.to_k = nn.Linear(cfg.channels, h * k, bias=False)
        self.to_v = nn.Linear(cfg.channels, h * v, bias=False)
        self.to_rel_k = nn.Linear(cfg.num_relative_position_features, h * k, bias=False)
        self.r_w_bias = nn.Parameter(torch.zeros(1, h, 1, k))
        self.r_r_bias = nn.Parameter(torch.zeros(1, h, 1, k))
        self.to_out = nn.Linear(h * v, cfg.channels)
        self.attention_dropout = attention_dropout  # on the softmax weights, in training only
        self.positional_dropout = nn.Dropout(positional_dropout)

    def _split_heads(self, x):  # [B, T, H*D] -> [B, H, T, D]
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)

    def forward(self, x):
        b, t, _ = x.shape
        # the biases are added after the scaling and are not scaled themselves (docs/spec.md §1.4, §9.5)
        q = self._split_heads(self.to_q(x)) * self.key_size**-0.5
        k = self._split_heads(self.to_k(x))
        v = self._split_heads(self.to_v(x))
        features = relative_position_features(t, self.to_rel_k.in_features)
        features = self.positional_dropout(features.to(device=x.device, dtype=x.dtype))
        r_k = self.to_rel_k(features).view(2 * t - 1, self.num_heads, -1).transpose(0, 1)  # [H, 2T-1, K]
        relative = relative_shift(torch.einsum("bhik,hnk->bhin", q + self.r_r_bias, r_k))  # [B, H, T, T]
        content = torch.einsum("bhik,bhjk->bhij", q + self.r_w_bias, k)
        # not F.scaled_dot_product_attention: on an H200 its float32 kernel took 1.6x the time of these
        # TF32 matmuls, and its bf16 kernel faulted on the strided relative logits (misaligned address)
        weights = F.dropout((content + relative).softmax(dim=-1), self.attention_dropout, self.training)
        out = torch.einsum("bhij,bhjv->bhiv", weights, v)
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    """Residual(LayerNorm ; MHA ; Dropout) ; Residual(LayerNorm ; Linear ; Dropout ; ReLU ; Linear ; Dropout)."""

    def __init__(self, cfg: EnformerConfig, dropout: float = 0.4):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.channels, eps=1e-5)
        self.attention = MultiHeadAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.channels, eps=1e-5)
        self.mlp_in = nn.Linear(cfg.channels, 2 * cfg.channels)
        self.mlp_out = nn.Linear(2 * cfg.channels, cfg.channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.dropout(self.attention(self.attn_norm(x)))
        hidden = F.relu(self.dropout(self.mlp_in(self.mlp_norm(x))))
        return x + self.dropout(self.mlp_out(hidden))


class Enformer(nn.Module):
    """Enformer (Avsec et al. 2021), numerically faithful to DeepMind's Sonnet code (docs/spec.md §1).

    Parameters
    ----------
    config : EnformerConfig, optional
        Hyper-parameters; default the released model (251,221,292 trainable parameters).
    **overrides
        ``EnformerConfig`` fields, when ``config`` is not given.

    Notes
    -----
    ``forward(x)`` takes a one-hot batch ``x: [B, L, 4]`` float (A, C, G, T; N all zeros) and
    returns ``{head: [B, target_length, tracks]}`` (softplus; 896 bins of 128 bp for the released
    model). L may be 393,216 (the TF-Hub contract: the central 196,608 bp are used), 196,608,
    131,072, or any multiple of 128 that leaves at least ``target_length`` bins; another length
    raises ``ValueError``. ``predict`` is ``forward`` in inference mode; ``trunk``,
    ``predict_tracks``, ``convolve``, ``attend`` and ``embed`` expose its stages.
    """

    def __init__(self, config: EnformerConfig | None = None, **overrides):
        super().__init__()
        cfg = config if config is not None else EnformerConfig(**overrides)
        self.config = cfg
        half = cfg.channels // 2
        self.stem = DownsampleBlock(nn.Conv1d(4, half, 15, padding=7), half, cfg.pooling_type)
        tower_in = [half] + cfg.conv_filters[:-1]
        self.conv_tower = nn.ModuleList(
            DownsampleBlock(ConvBlock(c_in, c_out, 5), c_out, cfg.pooling_type)
            for c_in, c_out in zip(tower_in, cfg.conv_filters, strict=True))
        if cfg.conv_filters[-1] != cfg.channels:
            raise ValueError(f"the conv tower ends with {cfg.conv_filters[-1]} channels, "
                             f"the transformer needs {cfg.channels}")
        self.transformer = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_transformer_layers))
        self.final = ConvBlock(cfg.channels, 2 * cfg.channels, 1)
        self.final_dropout = nn.Dropout(0.05)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * cfg.channels, n) for name, n in cfg.heads.items()})

    def crop_input(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``[B, L, 4]`` and keep the central 196,608 bp of a 393,216-bp input."""
        if x.ndim != 3 or x.shape[-1] != 4:
            raise ValueError(f"expected a one-hot batch [batch, length, 4], got shape {tuple(x.shape)}")
        length = x.shape[1]
        if length == HUB_SEQUENCE_LENGTH:
            start = (HUB_SEQUENCE_LENGTH - SEQUENCE_LENGTH) // 2
            return x[:, start:start + SEQUENCE_LENGTH]
        if length % BIN_SIZE or length // BIN_SIZE < self.config.target_length:
            raise ValueError(f"input length {length} must be a multiple of {BIN_SIZE} giving at least "
                             f"{self.config.target_length} bins (196,608 or 393,216 for the released model)")
        return x

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and conv tower: one-hot ``[B, L, 4] -> [B, L/128, C]``."""
        return self._conv_stages(self.crop_input(x))

    def _conv_stages(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and conv tower on any length that is a multiple of 128: ``[B, L, 4] -> [B, L/128, C]``."""
        x = x.to(self.stem.conv.weight.dtype).transpose(1, 2)
        x = self.stem(x)
        for block in self.conv_tower:
            x = block(x)
        return x.transpose(1, 2)

    def affected_bins(self, first: int, last: int) -> tuple[int, int]:
        """Conv-tower output positions (128-bp bins) that input positions ``first..last`` can change.

        Each convolution widens the interval by its radius and each pooling halves it; the
        pointwise blocks and batch norm act per position.
        """
        first, last = first - self.stem.conv.kernel_size[0] // 2, last + self.stem.conv.kernel_size[0] // 2
        first, last = first // 2, last // 2
        for block in self.conv_tower:
            radius = block.conv.conv.kernel_size[0] // 2
            first, last = (first - radius) // 2, (last + radius) // 2
        return first, last

    @functools.cached_property
    def _patch_margin(self) -> int:
        """Bins next to a patch's edges that its zero padding can spoil (patches start on a bin)."""
        start, end = 100 * BIN_SIZE, 110 * BIN_SIZE
        left = self.affected_bins(start - 1, start - 1)[1] - 100 + 1
        right = 110 - self.affected_bins(end, end)[0]
        return max(left, right, 0)

    def convolve_changed(self, reference: torch.Tensor, x: torch.Tensor,
                         changed: list[tuple[int, int] | None]) -> torch.Tensor:
        """Conv-tower output ``[B, T, C]`` of inputs ``x`` (``[B, L, 4]``, L = 128 T) that equal the
        inputs of ``reference`` (their conv-tower output) except at positions ``changed[i]``
        (inclusive; None = identical). Only the bins a change can reach are recomputed
        (:meth:`recompute_bins`): exact up to float rounding.
        """
        spans = [(i, *self.affected_bins(*c)) for i, c in enumerate(changed) if c is not None]
        return self.recompute_bins(reference.clone(), x, spans)

    def recompute_bins(self, conv: torch.Tensor, x: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        """Overwrite bins ``first..last`` (inclusive, clipped to ``[0, T)``) of row ``i`` of ``conv``
        (``[B, T, C]``, in place; returned) for each ``(i, first, last)`` of ``spans`` with their
        conv-tower output computed from inputs ``x`` (``[B, L, 4]``, L = 128 T).

        Each span runs on a patch of input widened by :attr:`_patch_margin` bins on each side, so
        that the patch's zero padding cannot reach it; a patch is cut at the input's ends, where
        the padding is the input's own: exact up to float rounding wherever the span lies.
        """
        margin, bins = self._patch_margin, conv.shape[1]
        # patches of one width run together; a row's result never depends on the other rows
        by_width: dict[int, list[tuple[int, int, int, int]]] = {}
        for i, first, last in spans:
            first, last = max(first, 0), min(last, bins - 1)
            if first <= last:
                start, stop = max(first - margin, 0), min(last + 1 + margin, bins)
                by_width.setdefault(stop - start, []).append((i, start, first, last))
        for width, patches in by_width.items():
            inputs = torch.stack([x[i, start * BIN_SIZE:(start + width) * BIN_SIZE] for i, start, _, _ in patches])
            recomputed = self._conv_stages(inputs)
            for row, (i, start, first, last) in enumerate(patches):
                conv[i, first:last + 1] = recomputed[row, first - start:last + 1 - start]
        return conv

    def head_tracks(self, embedding: torch.Tensor, head: str, tracks: torch.Tensor | None = None) -> torch.Tensor:
        """Head ``head`` on the trunk's embedding, columns ``tracks`` only: ``[B, 896, 2C] -> [B, 896, T]``."""
        linear = self.heads[head]
        weight, bias = linear.weight, linear.bias
        if tracks is not None:
            weight, bias = weight[tracks], bias[tracks]
        return F.softplus(F.linear(embedding, weight, bias))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer layers ``[B, T, C] -> [B, T, C]`` (no final LayerNorm)."""
        for block in self.transformer:
            x = block(x)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Crop to the central ``target_length`` bins and project: ``[B, T, C] -> [B, 896, 2C]``."""
        trim = (x.shape[1] - self.config.target_length) // 2
        x = x[:, trim:trim + self.config.target_length]
        x = self.final(x.transpose(1, 2)).transpose(1, 2)
        return gelu(self.final_dropout(x))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot ``[B, L, 4]`` -> embedding ``[B, 896, 2C]`` (the official ``model.trunk``)."""
        return self.embed(self.attend(self.convolve(x)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.trunk(x)
        return {name: F.softplus(head(embedding)) for name, head in self.heads.items()}

    @torch.inference_mode()
    def predict_tracks(self, x: torch.Tensor, head: str, tracks: torch.Tensor | None = None) -> torch.Tensor:
        """Head ``head`` for the columns ``tracks`` only (all when None): ``[B, L, 4] -> [B, 896, T]``."""
        if self.training:
            raise RuntimeError("predict_tracks() needs eval mode: call model.eval() first")
        return self.head_tracks(self.trunk(x), head, tracks)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward`` in eval mode without autograd (13.7 GB otherwise for one full pass)."""
        if self.training:
            raise RuntimeError("predict() needs eval mode: call model.eval() first")
        return self(x)
