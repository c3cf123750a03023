"""Batched reference/alternative inference and the variant-effect statistics (SPEC §5).

A scorer model is anything with ``predict_tracks(x [B, L, 4], head, tracks) -> [B, bins, T]``
(:class:`enformer_vep.model.Enformer` has it); tests use tiny hand-derivable models.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .windows import ONE_HOT_TABLE, reverse_complement

FLOAT16_MAX = 65504.0

# Formulas over the output bins of one track; written into the output files.
STATISTICS = {
    "SAD": "sum_bins(alt) - sum_bins(ref)",
    "SAR": "sum_bins(log2(alt + 1) - log2(ref + 1))",
    "SADR": "log2(sum_bins(alt) + 1) - log2(sum_bins(ref) + 1)",
    "SAX": "(alt - ref) at the bin of max |alt - ref|",
    "D1": "sum_bins(|alt - ref|)",
    "D2": "sqrt(sum_bins((alt - ref)^2))",
}


def parse_statistics(text: str) -> list[str]:
    names = [s.strip().upper() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STATISTICS]
    if unknown or not names:
        raise ValueError(f"unknown statistic(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(STATISTICS)}")
    return list(dict.fromkeys(names))


def statistics(ref: torch.Tensor, alt: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-track statistics ``[B, T]`` float32 from predictions ``ref, alt: [B, bins, T]``."""
    ref, alt = ref.float(), alt.float()
    diff = alt - ref
    out = {}
    for name in names:
        if name == "SAD":  # summing the differences avoids cancelling two large float32 sums
            out[name] = diff.sum(1)
        elif name == "SAR":  # log2(alt + 1) - log2(ref + 1), without cancelling two close logs
            out[name] = (torch.log1p(diff / (ref + 1)) / math.log(2)).sum(1)
        elif name == "SADR":
            out[name] = torch.log1p(diff.sum(1) / (ref.sum(1) + 1)) / math.log(2)
        elif name == "SAX":
            peak = diff.abs().argmax(dim=1, keepdim=True)  # [B, 1, T]
            out[name] = diff.gather(1, peak)[:, 0]
        elif name == "D1":
            out[name] = diff.abs().sum(1)
        elif name == "D2":
            out[name] = diff.square().sum(1).sqrt()
    return out


def to_float16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Clip to the float16 range (basenji 2020 wrote inf) and count the clipped values."""
    clipped = int(np.count_nonzero(np.abs(values) > FLOAT16_MAX))
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), clipped


def shifted(codes: np.ndarray, shift: int) -> np.ndarray:
    """Windows ``[B, L]`` moved ``shift`` bp to the right (left if negative), N-filled."""
    if shift == 0:
        return codes
    out = np.full_like(codes, ord("N"))
    if shift > 0:
        out[:, shift:] = codes[:, :-shift]
    else:
        out[:, :shift] = codes[:, -shift:]
    return out


class VariantScorer:
    """Scores batches of (reference, alternative) windows.

    Predictions are averaged over ``shifts`` and, with ``rc``, over the reverse complement
    (its bins flipped back) before the statistics are taken; ``batch_size`` is the number of
    sequences per forward pass.
    """

    def __init__(self, model, *, head: str = "human", tracks: np.ndarray | None = None,
                 stats: Sequence[str] = ("SAD", "SAR"), rc: bool = False, shifts: Sequence[int] = (0,),
                 device: str | torch.device = "cpu", batch_size: int = 4):
        self.model, self.head, self.stats = model, head, list(stats)
        self.rc, self.shifts, self.batch_size = rc, list(shifts), batch_size
        self.device = torch.device(device)
        self.tracks = None if tracks is None else torch.as_tensor(tracks, dtype=torch.long, device=self.device)
        self._one_hot = torch.from_numpy(ONE_HOT_TABLE).to(self.device)  # encoded on the device

    def _predict(self, codes: np.ndarray) -> torch.Tensor:
        """Mean prediction ``[N, bins, T]`` over shifts and strands for windows ``[N, L]`` (uint8 ASCII)."""
        variants = [(shifted(codes, s), False) for s in self.shifts]
        if self.rc:
            variants += [(reverse_complement(v), True) for v, _ in variants]
        total = None
        for seqs, reverse in variants:
            for start in range(0, len(seqs), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(seqs[start:start + self.batch_size])).to(self.device)
                pred = self.model.predict_tracks(self._one_hot[batch.long()], self.head, self.tracks).float()
                if reverse:
                    pred = pred.flip(1)
                if total is None:
                    total = torch.zeros((len(codes),) + tuple(pred.shape[1:]), device=self.device)
                total[start:start + len(batch)] += pred
        return total / len(variants)

    def score(self, ref: np.ndarray, alt: np.ndarray) -> dict[str, np.ndarray]:
        """Statistics ``{name: [B, T] float32}`` for windows ``ref, alt: [B, L]`` uint8."""
        preds = self._predict(np.concatenate([ref, alt]))
        n = len(ref)
        return {k: v.cpu().numpy() for k, v in statistics(preds[:n], preds[n:], self.stats).items()}
