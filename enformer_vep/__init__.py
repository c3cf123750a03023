"""enformer-vep: score genetic variants with a faithful PyTorch port of DeepMind's Enformer.

The names below are the public API (README, "Python API"). They are imported on first use, so
that ``import enformer_vep`` and ``enformer-score --help`` stay fast and do not load torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Enformer": "model", "EnformerConfig": "model",
    "load_model": "weights",
    "ScoreOptions": "pipeline", "score_vcf": "pipeline",
    "merge_runs": "merge",
    "VariantScorer": "scoring",
    "read_variants": "variants",
    "read_scores": "reader", "read_gene_scores": "reader", "top_variants": "reader",
    "EnformerVepError": "errors", "InputError": "errors", "WeightsError": "errors", "DownloadError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'enformer_vep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
