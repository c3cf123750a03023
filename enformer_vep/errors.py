"""Exceptions whose message is shown to the user as a one-line error, and the wording they share."""
from __future__ import annotations

from collections.abc import Iterable


class EnformerVepError(Exception):
    """An error the user can act on; the CLI prints its message and exits non-zero."""


class WeightsError(EnformerVepError):
    """Model weights are missing, corrupt, unsafe or do not fit the architecture."""


class DownloadError(EnformerVepError):
    """A model file could not be downloaded or failed verification."""


class InputError(EnformerVepError):
    """A VCF, FASTA, region or option the run cannot use as given."""


def preview(names: Iterable[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, and how many there are when there are more."""
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 file``, ``2 files`` (``words``: an irregular plural), with thousands separated."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"
