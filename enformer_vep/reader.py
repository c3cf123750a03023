"""Finished runs as pandas DataFrames or AnnData objects: :func:`read_scores` (variant files) and
:func:`read_gene_scores` (genes files, ``--genes``), reading only the rows of a region and the columns
of the tracks asked, a block of rows at a time.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from .errors import InputError
from .output import GENE_FIELDS, ROW_FIELDS
from .targets import Targets, select_tracks
from .text import from_bytes
from .variants import CONTIG_END, parse_region, resolve_contig

BLOCK_ROWS = 4096
VARIANT_INDEX = ("chr", "pos", "ref", "alt", "snp")
GENE_INDEX = ("gene_id", "gene_name", "gene_type", "strand", "tss_distance", "n_tss")


def read_scores(path: str | Path, stat: str | Sequence[str] = "SAD", tracks=None, region: str | None = None, *,
                as_anndata: bool = False):
    """Variant scores of a finished run as a table.

    Parameters
    ----------
    path : str or Path
        A run directory (its variant files, in the order its ``done.json`` lists them) or one
        ``PREFIX.CHROM.h5`` file.
    stat : str or sequence of str
        The statistic (``SAD``, ``SAR``...); several only with ``as_anndata``.
    tracks : None, str, or sequence of int or str
        None: every track; a ``--tracks`` spec (``"0-9,15"``, or a regular expression searched in
        the track descriptions); column indices of the file; or track identifiers (``target_ids``).
    region : str, optional
        ``CHR``, ``CHR:START-END`` or ``CHR:POS`` (1-based, inclusive, on the VCF's positions; ``chr1``
        and ``1`` name the same contig): only these rows are read.
    as_anndata : bool
        Return an ``anndata.AnnData`` (needs ``pip install 'enformer-vep[anndata]'``): variants in
        ``obs`` (``chr, pos, ref, alt, snp``), tracks in ``var`` (index = identifier, ``description``),
        one layer per statistic and ``X`` = the first.

    Returns
    -------
    pandas.DataFrame or anndata.AnnData
        DataFrame: ``[variant alleles, tracks]`` float32, rows in file order indexed by
        ``(chr, pos, ref, alt, snp)`` (``pos`` uint32, the others str), columns = track identifiers.

    Raises
    ------
    InputError
        Not a finished run or a scores file; an unknown statistic, track or contig.
    """
    files = _files(path, "chrom")
    return _read(files, _stats(stat, as_anndata), tracks, region, as_anndata, genes=False)


def read_gene_scores(path: str | Path, stat: str | Sequence[str] = "logSED", tracks=None, region: str | None = None,
                     *, as_anndata: bool = False):
    """Gene scores (``--genes``) of a finished run as a table: as :func:`read_scores`, one row per (allele,
    gene) pair, indexed by the allele's ``(chr, pos, ref, alt, snp)`` then ``gene_id, gene_name, gene_type,
    strand, tss_distance, n_tss`` (in ``obs`` with ``as_anndata``); statistics ``SED``, ``logSED``.
    ``path``: a run directory or one ``PREFIX.CHROM.genes.h5`` (its variant file beside it)."""
    files = _files(path, "genes_of")
    return _read(files, _stats(stat, as_anndata), tracks, region, as_anndata, genes=True)


def _stats(stat: str | Sequence[str], as_anndata: bool) -> list[str]:
    stats = [stat] if isinstance(stat, str) else list(stat)
    if not stats or (len(stats) > 1 and not as_anndata):
        raise InputError("read one statistic into a DataFrame (several need as_anndata=True)")
    return stats


def _files(path: str | Path, kind: str) -> list[Path]:
    """The files of a run directory's ``done.json`` of ``kind`` (``chrom``: variant files; ``genes_of``:
    genes files), or the one file given."""
    path = Path(path)
    if path.is_file():
        return [path]
    done = path / "done.json"
    if not done.is_file():
        raise InputError(f"{path} is not a finished enformer-score run (no done.json) nor a scores file")
    try:
        entries = json.loads(done.read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{done} is unreadable ({error}): rerun its enformer-score command") from None
    files = [path / name for name, entry in entries.items() if kind in entry]
    if not files and kind == "genes_of":
        raise InputError(f"{path} holds no gene scores: run enformer-score with --genes")
    return files


def _read(files: list[Path], stats: list[str], tracks, region: str | None, as_anndata: bool, genes: bool):
    import pandas as pd

    span = None if region is None else parse_region(region)
    index_parts, value_parts, targets, chosen, contigs = [], {s: [] for s in stats}, None, None, set()
    for path in files:
        variants = path.with_name(path.name[:-len(".genes.h5")] + ".h5") if genes else path
        with h5py.File(path, "r") as f, h5py.File(variants, "r") as v:
            missing = [s for s in stats if s not in f]
            if missing:
                raise InputError(f"{path} has no {missing[0]}; it holds "
                                 f"{', '.join(k for k in f if f[k].ndim == 2 and k.isalpha()) or 'no statistic'}")
            here = Targets(_strings(f["target_ids"][:]), _strings(f["target_labels"][:]))
            if targets is None:
                targets, chosen = here, _columns(tracks, here)
            elif here.ids != targets.ids:
                raise InputError(f"{path} holds other tracks than {files[0]}")
            allele_rows = _region_rows(v, span)
            if allele_rows is None:
                contigs.update(from_bytes(c) for c in np.unique(v["chr"][:]))
                continue
            all_si = f["si"][:] if genes else None
            rows = np.flatnonzero(np.isin(all_si, allele_rows)) if genes else allele_rows
            si = all_si[rows] if genes else rows
            index = {name: v[name][:][si] if name == "pos" else _strings(v[name][:][si]) for name in ROW_FIELDS}
            if genes:
                index |= {name: _strings(f[name][:][rows]) for name in GENE_FIELDS}
                index |= {"tss_distance": f["tss_distance"][:][rows], "n_tss": f["n_tss"][:][rows]}
            index_parts.append(index)
            for name in stats:
                value_parts[name].append(_block_read(f[name], rows, chosen))
    if targets is None:
        raise InputError("no scores file to read")
    if span is not None and not index_parts:
        raise InputError(f"region {region}: contig {span[0]} is not among the run's ({', '.join(sorted(contigs))})")
    names = VARIANT_INDEX + (GENE_INDEX if genes else ())
    columns = {name: np.concatenate([part[name] for part in index_parts]) if index_parts else np.empty(0)
               for name in names}
    values = {name: np.concatenate(parts) if parts else np.empty((0, len(chosen)), np.float32)
              for name, parts in value_parts.items()}
    ids = [targets.ids[i] for i in chosen]
    if as_anndata:
        try:
            import anndata
        except ImportError:
            raise InputError("as_anndata needs the anndata package: pip install 'enformer-vep[anndata]'") from None
        obs = pd.DataFrame(columns, index=[str(i) for i in range(len(columns["pos"]))])
        var = pd.DataFrame({"description": [targets.labels[i] for i in chosen]}, index=ids)
        return anndata.AnnData(X=values[stats[0]], obs=obs, var=var, layers=values)
    index = pd.MultiIndex.from_arrays([columns[name] for name in names], names=list(names))
    return pd.DataFrame(values[stats[0]], index=index, columns=pd.Index(ids, name="track"))


def _strings(values: np.ndarray) -> np.ndarray:
    return np.array([from_bytes(v) for v in values], dtype=object)


def _columns(tracks, targets: Targets) -> np.ndarray:
    """Column indices of ``tracks`` (see :func:`read_scores`)."""
    if tracks is None or isinstance(tracks, str):
        return select_tracks(tracks, targets)
    chosen = list(tracks)
    if all(isinstance(t, (int, np.integer)) for t in chosen):
        bad = [t for t in chosen if not 0 <= t < len(targets)]
        if bad:
            raise InputError(f"track column {bad[0]} is not among 0..{len(targets) - 1}")
        return np.array(chosen, dtype=np.int64)
    where = {identifier: i for i, identifier in enumerate(targets.ids)}
    unknown = [t for t in chosen if t not in where]
    if unknown:
        raise InputError(f"track {unknown[0]!r} is not among the file's target_ids")
    return np.array([where[t] for t in chosen], dtype=np.int64)


def _region_rows(f: h5py.File, span: tuple[str, int, int] | None) -> np.ndarray | None:
    """Rows of a variant file in ``span`` (all without one); None when its contig is another."""
    n = len(f["pos"])
    if span is None:
        return np.arange(n)
    chrom, start, end = span
    contigs = {from_bytes(c) for c in np.unique(f["chr"][:])} if n else set()
    name = resolve_contig(chrom, contigs)
    if name is None:
        return None
    positions = f["pos"][:].astype(np.int64)
    inside = (_strings(f["chr"][:]) == name) & (positions >= start) & (positions <= min(end, CONTIG_END))
    return np.flatnonzero(inside)


def _block_read(dataset: h5py.Dataset, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``dataset[rows][:, columns]`` as float32, reading the rows' span a block at a time."""
    out = np.empty((len(rows), len(columns)), np.float32)
    done = 0
    while done < len(rows):
        lo = rows[done]
        hi = min(lo + BLOCK_ROWS, dataset.shape[0])
        take = rows[done:np.searchsorted(rows, hi)]
        out[done:done + len(take)] = dataset[lo:hi][take - lo][:, columns]
        done += len(take)
    return out


def top_variants(path: str | Path, n: int = 20, *, stat: str = "SAD", family: str | None = None,
                 per_variant: int = 3):
    """The ``n`` variant alleles of a finished run with the largest ``|stat|`` over the tracks (of the assay
    ``family`` only: CAGE, DNASE, CHIP, ATAC..., the track description before ':'), strongest first, each
    with its ``per_variant`` strongest tracks. Reads a block of rows at a time (memory ~ n rows).

    Returns
    -------
    pandas.DataFrame
        Columns ``rank, chr, pos, ref, alt, snp, <stat>`` (signed, at the strongest track), ``track``,
        ``description``, then ``track_2, <stat>_2``... for the next strongest.

    Raises
    ------
    InputError
        Not a finished run, an unknown statistic or family.
    """
    import pandas as pd

    from .vcf_out import assay_families

    best: list[tuple[float, int, int]] = []  # (strength, file, row)
    targets, columns = None, None
    files = _files(path, "chrom")
    for k, file in enumerate(files):
        with h5py.File(file, "r") as f:
            if stat not in f:
                raise InputError(f"{file} has no {stat}")
            if targets is None:
                targets = Targets(_strings(f["target_ids"][:]), _strings(f["target_labels"][:]))
                families = assay_families(targets.labels)
                if family is not None and family.upper() not in families:
                    raise InputError(f"no {family} tracks in the run; its families: {', '.join(families)}")
                columns = families[family.upper()] if family is not None else np.arange(len(targets))
            for start in range(0, len(f["pos"]), BLOCK_ROWS):
                strength = np.abs(f[stat][start:start + BLOCK_ROWS][:, columns].astype(np.float32)).max(axis=1)
                keep = np.argsort(-strength, kind="stable")[:n]
                best += [(float(strength[i]), k, start + int(i)) for i in keep]
            best = sorted(best, key=lambda item: (-item[0], item[1], item[2]))[:n]
    if targets is None:
        raise InputError(f"{path} holds no scored variants")
    rows = []
    for rank, (_, k, row) in enumerate(best, 1):
        with h5py.File(files[k], "r") as f:
            values = f[stat][row][columns].astype(np.float32)
            record = {"rank": rank} | {name: from_bytes(f[name][row]) if name != "pos" else int(f["pos"][row])
                                       for name in ("chr", "pos", "ref", "alt", "snp")}
        order = np.argsort(-np.abs(values), kind="stable")[:per_variant]
        for j, column in enumerate(order):
            suffix = "" if j == 0 else f"_{j + 1}"
            record[stat + suffix] = float(values[column])
            record["track" + suffix] = targets.ids[columns[column]]
            if j == 0:
                record["description"] = targets.labels[columns[column]]
        rows.append(record)
    return pd.DataFrame(rows)
