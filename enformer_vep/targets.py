"""Track metadata (the Basenji ``targets_*.txt`` tables) and ``--tracks`` selection."""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class Targets:
    """Tracks of one output head, in head-column order: ``ids`` = identifier, ``labels`` = description."""

    ids: list[str]
    labels: list[str]

    def __len__(self):
        return len(self.ids)

    def subset(self, indices: np.ndarray) -> Targets:
        return Targets([self.ids[i] for i in indices], [self.labels[i] for i in indices])


def read_targets(path: str | Path) -> Targets:
    """A tab-separated table with ``identifier`` and ``description`` columns; rows align with the
    head's columns by order (the mouse table's ``index`` column starts at 5313: docs/spec.md §5.6)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"identifier", "description"} <= set(rows[0]):
        raise InputError(f"{path}: expected a tab-separated table with 'identifier' and 'description' columns")
    return Targets([r["identifier"] for r in rows], [r["description"] for r in rows])


def packaged_targets(organism: str) -> Targets:
    """The released model's tracks: 5313 human or 1643 mouse."""
    with resources.as_file(resources.files("enformer_vep").joinpath(f"data/targets_{organism}.txt")) as path:
        return read_targets(path)


def require_head(head: str, heads: Iterable[str]) -> None:
    """Raise :class:`InputError` unless the model's ``heads`` (names) include ``head``."""
    heads = list(heads)
    if head not in heads:
        raise InputError(f"the model has no {head!r} head (it has {', '.join(heads)})")


def head_targets(organism: str, heads: dict[str, int], path: str | Path | None = None) -> Targets:
    """The track table of head ``organism`` (``path``, else the released one), checked against the
    head's size in ``heads`` (``{name: tracks}``)."""
    require_head(organism, heads)
    targets = read_targets(path) if path else packaged_targets(organism)
    if len(targets) != heads[organism]:
        raise InputError(f"the model's {organism} head has {heads[organism]} tracks but the track "
                         f"table has {len(targets)}: pass the matching table with --targets")
    return targets


_INDEX_RANGES = re.compile(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*")


def index_ranges(text: str) -> list[tuple[int, int]] | None:
    """``'0-9,15'`` -> ``[(0, 9), (15, 15)]`` (inclusive ranges, as written); None when ``text`` is not
    such a list."""
    if not _INDEX_RANGES.fullmatch(text):
        return None
    ranges = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        ranges.append((int(first), int(last or first)))
    return ranges


def select_tracks(spec: str | None, targets: Targets) -> np.ndarray:
    """Column indices chosen by ``--tracks``: ``None`` = all; ``0-9,15`` = indices and inclusive
    ranges; anything else is a regular expression searched in each description."""
    n = len(targets)
    if spec is None:
        return np.arange(n)
    ranges = index_ranges(spec)
    if ranges is not None:
        for lo, hi in ranges:
            if lo > hi or hi >= n:
                raise InputError(f"--tracks {lo}-{hi}: tracks are numbered 0..{n - 1}")
        return np.array(sorted({i for lo, hi in ranges for i in range(lo, hi + 1)}))
    try:
        pattern = re.compile(spec)
    except re.error as error:
        raise InputError(f"--tracks {spec!r} is neither an index list nor a valid regular expression: "
                         f"{error}") from None
    chosen = [i for i, label in enumerate(targets.labels) if pattern.search(label)]
    if not chosen:
        raise InputError(f"--tracks {spec!r} matches no track description")
    return np.array(chosen)
