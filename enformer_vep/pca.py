"""Principal components of variant scores over tracks, as tabix-indexed tables (`enformer-score pca`).

The official Enformer release publishes the top 20 principal components of its variants' SAD
scores. :func:`fit_pca` finds them in one pass over a run's chromosome files, by the method whose
cost fits the shape of the ``[n, T]`` matrix of n variants and T tracks:

- ``"covariance"`` (n > T): the per-track sum and ``X^T X`` accumulated in float64 over row blocks,
  then the eigenvectors of the ``[T, T]`` covariance. Memory: one row block and the ``[T, T]``
  matrix (226 MB for the 5313 human tracks), whatever the number of variants.
- ``"gram"`` (n <= T): the centred rows gathered in float64 (no more memory than the ``[T, T]``
  matrix) and the eigenvectors of their ``[n, n]`` Gram matrix ``Xc Xc^T``, carried over to the
  tracks as ``Xc^T U``. 100 variants x 5313 tracks: an eigendecomposition of 100 x 100 instead
  of 5313 x 5313.

Both give the same components (each signed so that its largest loading is positive).
:func:`write_pc_tables` writes each variant's coordinates on them, ``OUT/PREFIX.CHROM.pc.tsv.gz``
(bgzip + ``.tbi``). Progress: a tqdm bar on stderr (on a terminal) or a log line every 30 s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from .atomic import atomic_write
from .errors import InputError
from .output import ROW_FIELDS
from .rundir import DONE, verify_done
from .tabix import bgzip_and_index
from .text import from_bytes, to_bytes

log = logging.getLogger("enformer_vep")

BLOCK_BYTES = 1 << 26  # float64 bytes of one row block, whatever the track count
VALUE_FORMAT = "%.6g"
TRANSFORM_NAME = "pca.npz"
TABLE_COLUMNS = ("#CHROM", "POS", "ID", "REF", "ALT")
METHODS = ("auto", "covariance", "gram")
RUN_RECORD = "run.json"  # written by every enformer-score run, shard and merge (rundir.RunDirectory)
LOG_EVERY = 30.0  # seconds between progress log lines when there is no bar


def _block_rows(tracks: int) -> int:
    # whole 64-row HDF5 chunks, so that no chunk is decompressed twice
    return max(64, BLOCK_BYTES // (8 * max(tracks, 1)) // 64 * 64)


@dataclasses.dataclass
class PcaTransform:
    """Principal components of the statistic ``stat`` over the tracks ``target_ids`` [T]:
    ``mean`` [T], ``components`` [k, T] (unit rows by decreasing variance, each with its
    largest-|loading| entry positive), ``explained_variance`` [k] (covariance eigenvalues, divisor
    rows - 1) and ``explained_variance_ratio`` [k] (share of the total variance); fitted on ``rows``
    variants. All arrays float64."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    target_ids: list[str]
    stat: str = "SAD"
    rows: int = 0

    def apply(self, X) -> np.ndarray:
        """Coordinates ``[n, k]`` float64 of the rows of ``X`` [n, T]: ``(X - mean) @ components.T``."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.mean):
            raise InputError(f"the PCA transform takes {len(self.mean)} tracks, not an array of shape {X.shape}")
        return (X - self.mean) @ self.components.T

    def check_tracks(self, target_ids: Sequence[str], source: str | Path) -> None:
        """Refuse scores of other tracks than those the transform was fitted on."""
        if list(target_ids) != self.target_ids:
            differ = next((i for i, (a, b) in enumerate(zip(target_ids, self.target_ids, strict=False)) if a != b),
                          min(len(target_ids), len(self.target_ids)))
            raise InputError(f"{source} scores other tracks than the PCA transform was fitted on "
                             f"({len(target_ids)} vs {len(self.target_ids)} tracks, "
                             f"first difference at track {differ})")

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (no pickles) atomically: temporary name, fsync, rename."""
        path = Path(path)
        atomic_write(path, lambda f: np.savez(
            f, mean=self.mean, components=self.components, explained_variance=self.explained_variance,
            explained_variance_ratio=self.explained_variance_ratio, target_ids=np.array(self.target_ids, dtype=str),
            stat=np.array(self.stat), rows=np.int64(self.rows)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PcaTransform:
        """Read a file written by :meth:`save`; InputError when it is missing or is not one."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no PCA transform file {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                transform = cls(z["mean"], z["components"], z["explained_variance"], z["explained_variance_ratio"],
                                z["target_ids"].tolist(), str(z["stat"]), int(z["rows"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile):
            raise InputError(f"{path} is not a PCA transform written by `enformer-score pca` "
                             f"(unreadable or truncated)") from None
        k, tracks = transform.components.shape if transform.components.ndim == 2 else (-1, -1)
        if not (transform.mean.shape == (tracks,) == (len(transform.target_ids),)
                and transform.explained_variance.shape == transform.explained_variance_ratio.shape == (k,)):
            raise InputError(f"{path} is not a PCA transform written by `enformer-score pca` (inconsistent shapes)")
        return transform


def scored_files(scores_dir: str | Path) -> dict[Path, int]:
    """The chromosome files of a finished scoring run (or shard, or merge) with their row counts, from
    its ``done.json``, each checked against its SHA-256 there. A directory without ``run.json`` is no
    enformer-score output; one with it but without ``done.json`` is unfinished."""
    directory = Path(scores_dir)
    if not directory.is_dir():
        raise InputError(f"{directory} is not a directory")
    if not (directory / RUN_RECORD).is_file():
        raise InputError(f"{directory} is not an enformer-score output directory (no {RUN_RECORD}): "
                         f"give the -o directory of an enformer-score run, shard or merge")
    done = verify_done(directory)
    try:
        files = {directory / name: int(entry["rows"]) for name, entry in done["files"].items() if "chrom" in entry}
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{directory / DONE} is unreadable: rerun its enformer-score command") from None
    if not files:
        raise InputError(f"{directory} holds no scored variants (its {DONE} lists no .h5 file)")
    return files


class _Progress:
    """Rows done: a tqdm bar on stderr when ``enabled`` (None: when stderr is a terminal); otherwise,
    unless ``enabled`` is False, a log line every :data:`LOG_EVERY` seconds."""

    def __init__(self, enabled: bool | None, total: int, desc: str):
        self.bar = tqdm(total=total, unit="variant", desc=desc, file=sys.stderr,
                        disable=not (sys.stderr.isatty() if enabled is None else enabled))
        self.log = self.bar.disable and enabled is not False
        self.desc, self.total, self.count = desc, total, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.count += n
        self.bar.update(n)
        now = time.monotonic()
        if self.log and now - self.last >= LOG_EVERY:
            self.last = now
            log.info("%s: %d of %d variants (%.0f/s)", self.desc, self.count, self.total,
                     self.count / (now - self.start))

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _statistics(f: h5py.File) -> list[str]:
    return [k for k, v in f.items() if isinstance(v, h5py.Dataset) and v.ndim == 2 and not k.endswith("_pct")]


def _describe(paths: Sequence[Path], stat: str) -> tuple[list[int], list[str]]:
    """Rows of each file and their common target_ids; InputError for a file that cannot be used."""
    sizes, ids, first = [], None, None
    for path in paths:
        try:
            with h5py.File(path, "r") as f:
                if stat not in f:
                    raise InputError(f"{path} has no {stat} statistic (choose one it has: "
                                     f"{', '.join(_statistics(f)) or 'none'})")
                if "target_ids" not in f or any(field not in f for field in ROW_FIELDS):
                    raise InputError(f"{path} is not an enformer-score output file (it lacks target_ids or row fields)")
                shape, file_ids = f[stat].shape, [t.decode() for t in f["target_ids"][:]]
        except OSError as error:
            raise InputError(f"cannot read {path} as HDF5: {error}") from None
        if len(shape) != 2 or shape[1] != len(file_ids):
            raise InputError(f"{path}: {stat} has shape {shape}, not [rows, {len(file_ids)} tracks]")
        if ids is None:
            ids, first = file_ids, path
        elif file_ids != ids:
            raise InputError(f"{path} and {first} score different tracks (their target_ids differ)")
        sizes.append(shape[0])
    return sizes, ids


def _row_blocks(path: Path, stat: str, block_rows: int,
                fields: Sequence[str] = ()) -> Iterator[tuple[int, np.ndarray, dict]]:
    """(first row, statistic [n, T] float64, {field: [n]}) for consecutive blocks of ``block_rows`` rows."""
    with h5py.File(path, "r") as f:
        data = f[stat]
        for start in range(0, data.shape[0], block_rows):
            yield (start, data[start:start + block_rows].astype(np.float64),
                   {name: f[name][start:start + block_rows] for name in fields})


def choose_method(rows: int, tracks: int) -> str:
    """The cheaper exact method for ``rows`` variants x ``tracks`` tracks (see the module notes):
    ``"gram"`` when ``rows <= tracks``, else ``"covariance"``. Both keep memory under one
    ``[tracks, tracks]`` float64 matrix."""
    return "gram" if rows <= tracks else "covariance"


def fit_pca(h5_paths: Iterable[str | Path], components: int = 20, stat: str = "SAD",
            max_rows: int | None = None, *, method: str = "auto", progress: bool | None = None) -> PcaTransform:
    """Principal components of ``stat`` [rows, T] over the rows of all ``h5_paths`` (chromosome files).

    ``max_rows``: fit on that many rows only, evenly spaced over all the files' rows in order
    (global rows ``i * total // max_rows``), so every chromosome contributes. ``method``:
    ``"auto"`` (:func:`choose_method`), ``"covariance"`` or ``"gram"``; the results agree to
    rounding. ``progress``: a bar over the rows read (None: on a terminal; log lines otherwise).
    """
    paths = [Path(p) for p in h5_paths]
    if not paths:
        raise InputError("no score files to fit principal components on")
    if method not in METHODS:
        raise InputError(f"unknown PCA method {method!r}: choose one of {', '.join(METHODS)}")
    sizes, ids = _describe(paths, stat)
    total, tracks = sum(sizes), len(ids)
    rows = total if max_rows is None else min(total, max_rows)
    if rows < 2:
        raise InputError(f"principal components need at least 2 variants; {rows} given")
    if not 1 <= components <= min(rows - 1, tracks):
        raise InputError(f"the number of components must be between 1 and {min(rows - 1, tracks)} "
                         f"(variants - 1 = {rows - 1}, tracks = {tracks}), not {components}")
    if method == "auto":
        method = choose_method(rows, tracks)
    log.info("pca: fitting %d components of %s on %d variants x %d tracks (%d files) from the %s", components, stat,
             rows, tracks, len(paths), f"{rows} x {rows} Gram matrix" if method == "gram"
             else f"{tracks} x {tracks} covariance")
    began = time.monotonic()
    keep = None if rows == total else np.arange(rows, dtype=np.int64) * total // rows
    blocks = _selected_blocks(paths, sizes, stat, tracks, keep, progress)
    fit = _fit_gram if method == "gram" else _fit_covariance
    mean, values, vectors, total_variance = fit(blocks, rows, tracks, components, stat)
    largest = np.abs(vectors).argmax(1)
    vectors *= np.sign(vectors[np.arange(components), largest])[:, None]
    ratio = values / total_variance
    log.info("pca: fitted in %.1f s; PC0..PC%d explain %.1f%% of the variance", time.monotonic() - began,
             components - 1, 100 * ratio.sum())
    return PcaTransform(mean, vectors, values, ratio, ids, stat, rows)


def _selected_blocks(paths: Sequence[Path], sizes: Sequence[int], stat: str, tracks: int, keep: np.ndarray | None,
                     progress: bool | None) -> Iterator[np.ndarray]:
    """The kept rows (``keep``: global row numbers; None: all) of every file, as float64 blocks."""
    offset = 0
    with _Progress(progress, sum(sizes), f"pca: reading {stat}") as bar:
        for path, size in zip(paths, sizes, strict=True):
            for start, block, _ in _row_blocks(path, stat, _block_rows(tracks)):
                bar.update(len(block))
                if keep is not None:
                    lo, hi = np.searchsorted(keep, [offset + start, offset + start + len(block)])
                    block = block[keep[lo:hi] - offset - start]
                if len(block):
                    yield block
            offset += size


def _undefined(stat: str) -> InputError:
    return InputError(f"the {stat} values hold NaN or infinity: principal components are undefined")


def _constant(stat: str) -> InputError:
    return InputError(f"{stat} is the same for every variant: there are no principal components")


def _fit_covariance(blocks: Iterable[np.ndarray], rows: int, tracks: int, components: int,
                    stat: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, top eigenvalues [k], eigenvectors [k, T], total variance) of the covariance, accumulated
    over the blocks in O(T^2) memory."""
    shift, sums, gram = None, np.zeros(tracks), np.zeros((tracks, tracks))
    for block in blocks:
        if shift is None:
            # sums of squares about a point near the mean: no cancellation when |mean| >> spread
            shift = block.mean(0)
        block -= shift
        sums += block.sum(0)
        gram += block.T @ block
    centre = sums / rows
    covariance = (gram - rows * np.outer(centre, centre)) / (rows - 1)
    if not np.isfinite(covariance).all():
        raise _undefined(stat)
    total_variance = np.trace(covariance)
    if total_variance <= 0:
        raise _constant(stat)
    log.info("pca: eigendecomposition of the %d x %d covariance", tracks, tracks)
    values, vectors = np.linalg.eigh(covariance)  # ascending
    return shift + centre, values[::-1][:components], vectors[:, ::-1][:, :components].T.copy(), total_variance


def _fit_gram(blocks: Iterable[np.ndarray], rows: int, tracks: int, components: int,
              stat: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The same from the ``[n, n]`` Gram matrix of the centred rows: if ``Xc Xc^T = U diag(w) U^T``,
    the covariance ``Xc^T Xc / (n - 1)`` has the eigenvalues ``w / (n - 1)`` with the eigenvectors
    ``Xc^T U / sqrt(w)`` (made orthonormal by a QR factorisation, which also gives unit vectors where
    ``w`` is 0)."""
    X, filled = np.empty((rows, tracks)), 0
    for block in blocks:
        X[filled:filled + len(block)] = block
        filled += len(block)
    assert filled == rows, (filled, rows)
    mean = X.mean(0)
    X -= mean
    gram = X @ X.T
    if not np.isfinite(gram).all():
        raise _undefined(stat)
    total_variance = np.trace(gram) / (rows - 1)
    if total_variance <= 0:
        raise _constant(stat)
    log.info("pca: eigendecomposition of the %d x %d Gram matrix", rows, rows)
    values, U = np.linalg.eigh(gram)  # ascending
    values, U = values[::-1][:components], U[:, ::-1][:, :components]
    q, r = np.linalg.qr(X.T @ U)  # [T, k]: columns of norm sqrt(w), orthogonal
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)
    return mean, values / (rows - 1), q.T.copy(), total_variance


@contextlib.contextmanager
def _output_directory(out_dir: str | Path) -> Iterator[Path]:
    """``out_dir``, created (with missing parents) for writing; when the block fails, the folders made
    here are removed again as long as they are empty, so a failed call leaves no empty output folder
    behind. A folder that existed before is never removed, nor one that holds any file."""
    out = Path(out_dir)
    made, folder = [], out
    while not os.path.lexists(folder) and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot create output directory {out}: {error.strerror or error}") from None
        yield out
    except BaseException:
        for folder in made:  # deepest first
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:
                break
        raise


def _check_output(out_dir: str | Path, names: Iterable[str], overwrite: bool) -> None:
    """Refuse an output path that is not a folder, and (without ``overwrite``) files there that this call
    would replace: before any work, so that a long fit is not lost to it."""
    out = Path(out_dir)
    if os.path.lexists(out) and not out.is_dir():
        raise InputError(f"output directory {out} exists and is not a directory")
    existing = [name for name in names if os.path.lexists(out / name)]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise InputError(f"{out} already holds {shown}: add --overwrite to replace them, "
                         f"or choose another output directory")


def _table_name(path: Path) -> str:
    return (path.name[:-3] if path.name.endswith(".h5") else path.name) + ".pc.tsv.gz"


def write_pc_tables(scores: str | Path | Iterable[str | Path], transform: PcaTransform,
                    out_dir: str | Path, *, overwrite: bool = False, progress: bool | None = None) -> list[Path]:
    """For each chromosome file ``PREFIX.CHROM.h5`` of ``scores`` (a finished run's directory, checked
    as in :func:`scored_files`, or the files themselves), ``out_dir/PREFIX.CHROM.pc.tsv.gz`` with its
    ``.tbi``: columns ``#CHROM POS ID REF ALT PC0 .. PC{k-1}`` (values ``%.6g``), one line per row in
    file order (VCF order), stably sorted by position where the file is not. ID is the VCF ID, ``.``
    where the VCF had none. Tables already there are refused unless ``overwrite``; ``out_dir`` is
    created only to write them. ``progress`` as in :func:`fit_pca`. Returns the tables."""
    if isinstance(scores, (str, os.PathLike)):
        paths = list(scored_files(scores)) if Path(scores).is_dir() else [Path(scores)]
    else:
        paths = [Path(p) for p in scores]
    sizes, ids = _describe(paths, transform.stat)
    transform.check_tracks(ids, paths[0])
    names = [_table_name(p) for p in paths]
    if len(set(names)) < len(names):
        raise InputError("two score files have the same name: their tables would overwrite each other")
    _check_output(out_dir, [n + s for n in names for s in ("", ".tbi")], overwrite)
    log.info("pca: writing %d tables of PC0..PC%d for %d variants", len(paths), len(transform.components) - 1,
             sum(sizes))
    with _output_directory(out_dir) as out, _Progress(progress, sum(sizes), "pca: writing tables") as bar:
        return [_write_table(path, transform, out / name, bar) for path, name in zip(paths, names, strict=True)]


def _write_table(path: Path, transform: PcaTransform, dest: Path, bar: _Progress) -> Path:
    """One table: lines are written in file order to a plain temporary file (one streaming pass);
    only if the positions are out of order is a sorted copy made from the line offsets. A scoring run
    stores ``CHROM:POS`` as the ID of a record whose ID is missing (``.``): that form, for the row's
    own contig and position, is written back as ``.``."""
    k = len(transform.components)
    line = "%s\t%d\t%s\t%s\t%s" + ("\t" + VALUE_FORMAT) * k + "\n"
    plain = dest.with_name(f"{dest.name}.{os.getpid()}.plain.tmp")
    ordered = dest.with_name(f"{dest.name}.{os.getpid()}.sorted.tmp")
    keys, starts, contigs = [], [], {}
    try:
        with open(plain, "wb") as f:
            f.write(("\t".join(TABLE_COLUMNS + tuple(f"PC{i}" for i in range(k))) + "\n").encode())
            for _, block, rows in _row_blocks(path, transform.stat, _block_rows(len(transform.mean)), ROW_FIELDS):
                text = [[from_bytes(v) for v in rows[name]] for name in ("chr", "snp", "ref", "alt")]
                pos = rows["pos"].astype(np.int64)
                coords = transform.apply(block).tolist()
                lines = [to_bytes(line % (c, p, "." if i == f"{c}:{p}" else i, r, a, *values))
                         for c, p, i, r, a, values in zip(text[0], pos.tolist(), *text[1:], coords, strict=True)]
                # tabix wants each contig's lines together: contigs keep their order of first appearance
                codes = np.array([contigs.setdefault(c, len(contigs)) for c in text[0]], dtype=np.int64)
                keys.append(codes << 32 | pos)
                starts.append(f.tell() + np.cumsum([0] + [len(b) for b in lines[:-1]], dtype=np.int64))
                f.writelines(lines)
                bar.update(len(lines))
            end = f.tell()
        keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        if (np.diff(keys) < 0).any():
            starts = np.concatenate(starts).tolist()
            stops = starts[1:] + [end]
            with open(plain, "rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as lines, \
                    open(ordered, "wb") as dst:
                dst.write(lines[:starts[0]])
                for row in np.argsort(keys, kind="stable").tolist():
                    dst.write(lines[starts[row]:stops[row]])
            os.replace(ordered, plain)
        return bgzip_and_index(plain, dest, seq_col=0, start_col=1, end_col=1)
    finally:
        plain.unlink(missing_ok=True)
        ordered.unlink(missing_ok=True)


def run_pca(scores_dir: str | Path, out_dir: str | Path, *, components: int | None = None, stat: str | None = None,
            transform_path: str | Path | None = None, max_rows: int | None = None, overwrite: bool = False,
            progress: bool | None = None) -> dict:
    """The ``enformer-score pca SCORES_DIR -o OUT`` job. Without ``transform_path``: fit ``components``
    (default 20) principal components of ``stat`` (default SAD) on every variant of the finished run
    SCORES_DIR (or ``max_rows`` of them) and save them as ``OUT/pca.npz``; with it: load that fitted
    transform (its statistic; its first ``components``, default all) instead. Then write the tables
    (:func:`write_pc_tables`). Every check (inputs, and without ``overwrite`` that OUT holds none of
    the files this call writes) comes before the fit; OUT is created only to write into, and removed
    again if it was made here and nothing could be written. ``progress`` as in :func:`fit_pca`.
    Returns a summary: ``rows``, ``files``, ``components``, ``stat``, ``explained_variance_ratio``,
    ``transform`` (its path) and ``fitted``."""
    files, fitted = scored_files(scores_dir), transform_path is None
    if fitted:
        stat = stat or "SAD"
        components = 20 if components is None else components
    else:
        if max_rows is not None:
            raise InputError("max_rows chooses the variants to fit on: it cannot go with a fitted transform")
        transform = PcaTransform.load(transform_path)
        if stat is not None and stat != transform.stat:
            raise InputError(f"{transform_path} holds principal components of {transform.stat}, not of {stat}")
        if components is not None:
            if not 1 <= components <= len(transform.components):
                raise InputError(f"{transform_path} holds {len(transform.components)} components, "
                                 f"so between 1 and that many can be used, not {components}")
            transform = dataclasses.replace(
                transform, components=transform.components[:components],
                explained_variance=transform.explained_variance[:components],
                explained_variance_ratio=transform.explained_variance_ratio[:components])
    names = [n + s for n in map(_table_name, files) for s in ("", ".tbi")]
    _check_output(out_dir, [TRANSFORM_NAME] * fitted + names, overwrite)
    if fitted:
        transform = fit_pca(files, components, stat, max_rows, progress=progress)
    with _output_directory(out_dir) as out:
        if fitted:
            transform_path = transform.save(out / TRANSFORM_NAME)
        tables = write_pc_tables(list(files), transform, out, overwrite=True, progress=progress)
    return {"rows": sum(files.values()), "files": [str(t) for t in tables], "components": len(transform.components),
            "stat": transform.stat, "explained_variance_ratio": transform.explained_variance_ratio.tolist(),
            "transform": str(transform_path), "fitted": fitted}
