"""``enformer-score merge``: the output directories of ``--shard K/N`` runs, combined into the files
one run would have written (same rows in VCF order, same bytes; percentiles from all rows)."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py

from .errors import InputError
from .output import GENE_FIELDS, GENE_NUMBERS, ROW_FIELDS, genes_file
from .rundir import RunDirectory, verify_done
from .targets import Targets
from .text import from_bytes
from .vcf_out import write_annotated_vcf

PIECE_ROWS = 4096


class H5Source:
    """Rows of one shard's chromosome file, for :func:`output.write_scores`."""

    def __init__(self, path: Path, stats: Sequence[str]):
        self.path, self.stats = path, stats
        with h5py.File(path, "r") as f:
            self.size = len(f["pos"])
            self.widths = {field: f[field].dtype.itemsize for field in ("snp", "chr", "ref", "alt")}
            self.clipped = {name: int(f[name].attrs["clipped"]) for name in stats}

    def pieces(self) -> Iterator[dict]:
        with h5py.File(self.path, "r") as f:
            for start in range(0, self.size, PIECE_ROWS):
                yield {name: f[name][start:start + PIECE_ROWS] for name in (*ROW_FIELDS, *self.stats)}


class GeneH5Source:
    """(allele, gene) rows of one shard's genes file, for :func:`output.write_gene_scores` (``si`` is
    already counted from the shard file's first row)."""

    def __init__(self, path: Path, stats: Sequence[str]):
        self.path, self.stats = path, stats
        with h5py.File(path, "r") as f:
            self.size = len(f["si"])
            self.widths = {field: f[field].dtype.itemsize for field in GENE_FIELDS}
            self.clipped = {name: int(f[name].attrs["clipped"]) for name in stats}

    def pieces(self) -> Iterator[dict]:
        with h5py.File(self.path, "r") as f:
            for start in range(0, self.size, PIECE_ROWS):
                yield {name: f[name][start:start + PIECE_ROWS] for name in (*GENE_NUMBERS, *GENE_FIELDS, *self.stats)}


class _Shard:
    def __init__(self, directory: str):
        self.dir = Path(directory)
        run = self.dir / "run.json"
        if not run.is_file():
            raise InputError(f"{self.dir} is not an enformer-score output directory (no run.json)")
        self.fingerprint = json.loads(run.read_text())
        if "shard" not in self.fingerprint:
            raise InputError(f"{self.dir} was not run with --shard: there is nothing to merge it with")
        self.k, self.n = (int(v) for v in self.fingerprint["shard"].split("/"))
        self.name = f"shard {self.k}/{self.n} ({self.dir})"
        self.done = verify_done(self.dir, self.name)


def merge_runs(shard_dirs: Sequence[str], out_dir: str, *, overwrite: bool = False,
               vcf_out: str | None = None) -> dict:
    """Merge the output directories of ``--shard K/N`` runs into the files one run would write.

    Parameters
    ----------
    shard_dirs : sequence of str
        Every shard 1..N of one run (same VCF, FASTA, model and options), each once and finished.
    out_dir : str
        Output directory; rerunning after an interruption rebuilds what is unfinished.
    overwrite : bool
        Replace a different earlier result in ``out_dir``.
    vcf_out : str, optional
        Also write the run's VCF annotated with the merged scores (bgzip + tabix; docs/spec.md §6.5).

    Returns
    -------
    dict
        The merged run's completion record (``done.json``): files with rows and SHA-256, summary.

    Raises
    ------
    InputError
        A directory that is not a shard, unfinished or altered (checksum), shards of different runs,
        a missing or repeated K, or a different N.
    """
    done = _merge(shard_dirs, out_dir, overwrite)
    if vcf_out:
        fingerprint = json.loads((Path(out_dir) / "run.json").read_text())
        files = {e["chrom"]: Path(out_dir) / name for name, e in done["files"].items() if "chrom" in e}
        write_annotated_vcf(fingerprint["vcf"], files, vcf_out, regions=fingerprint["options"]["regions"],
                            chroms=fingerprint["options"]["chroms"])
    return done


def _merge(shard_dirs: Sequence[str], out_dir: str, overwrite: bool) -> dict:
    if not shard_dirs:
        raise InputError("merge needs the shards' output directories")
    shards = [_Shard(d) for d in shard_dirs]
    out = Path(out_dir)
    for shard in shards:
        if out.resolve() == shard.dir.resolve():
            raise InputError(f"the merged output must go to another directory than {shard.dir}")
    _check_same_run(shards)
    shards.sort(key=lambda s: s.k)
    common = {k: v for k, v in shards[0].fingerprint.items() if k != "shard"}
    options = common["options"]
    run = RunDirectory(out, options["prefix"], common, overwrite=overwrite)
    done = run.completed()
    if done is not None:
        return done
    stats = options["stats"]
    chroms: dict[str, list[Path]] = {}  # chromosome -> its file in each shard that has it, in shard order
    for shard in shards:
        for name, entry in shard.done["files"].items():
            if "chrom" in entry:
                chroms.setdefault(entry["chrom"], []).append(shard.dir / name)
    attrs, gene_attrs, targets = {}, None, Targets([], [])
    if chroms:  # every shard file holds the same attributes and tracks (one run): take them from one
        first = next(iter(chroms.values()))[0]
        with h5py.File(first, "r") as f:
            attrs = {k: v for k, v in f.attrs.items() if k != "run_fingerprint"}
            targets = Targets([t.decode() for t in f["target_ids"][:]], [t.decode() for t in f["target_labels"][:]])
    gene_stats, genes = (list(options["gene_stats"]), {}) if options.get("genes") else (None, None)
    if genes is not None:
        for chrom, paths in chroms.items():
            genes[chrom] = [GeneH5Source(genes_file(p), gene_stats) for p in paths]
        if chroms:
            with h5py.File(genes_file(first), "r") as f:
                gene_attrs = {k: v for k, v in f.attrs.items() if k != "run_fingerprint"}
    return run.publish({chrom: [H5Source(p, stats) for p in paths] for chrom, paths in chroms.items()},
                       [_skipped_lines(s.dir / "skipped.tsv") for s in shards], targets, stats, attrs,
                       percentiles=options["percentiles"],
                       extra={"shard": None, "merged_from": [str(s.dir.resolve()) for s in shards]},
                       ref_mismatch_scored=sum(s.done["summary"]["ref_mismatch_scored"] for s in shards),
                       genes=genes, gene_stats=gene_stats, gene_attrs=gene_attrs)



def _skipped_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(record, line) of a shard's skipped.tsv, whose last column is the record number."""
    with open(path, "rb") as f:
        next(f)
        for raw in f:
            line = from_bytes(raw.rstrip(b"\n"))
            yield int(line.rsplit("\t", 1)[1]), line


def _check_same_run(shards: list[_Shard]) -> None:
    """One run's shards, each once, none missing, together covering every block exactly once."""
    first = shards[0]
    for shard in shards[1:]:
        changed = sorted(k for k in set(first.fingerprint) | set(shard.fingerprint)
                         if k != "shard" and first.fingerprint.get(k) != shard.fingerprint.get(k))
        if changed:
            raise InputError(f"{shard.name} and {first.name} come from different runs (they differ in "
                             f"{', '.join(changed)})")
        if shard.n != first.n:
            raise InputError(f"{shard.name} and {first.name} split the VCF differently ({shard.n} vs {first.n} "
                             f"shards)")
        if shard.done.get("layout_sha256") != first.done.get("layout_sha256"):
            raise InputError(f"{shard.name} and {first.name} counted different VCF records")
    seen: dict[int, _Shard] = {}
    for shard in shards:
        if shard.k in seen:
            raise InputError(f"shard {shard.k}/{shard.n} is given twice: {seen[shard.k].dir} and {shard.dir}")
        seen[shard.k] = shard
    missing = [f"{k}/{first.n}" for k in range(1, first.n + 1) if k not in seen]
    if missing:
        raise InputError(f"missing shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} of {first.n}")
    size = first.done["checkpoint_every"]
    expected = sorted([c, b] for c, n in first.done["layout"] for b in range((n + size - 1) // size))
    covered = sorted(block for shard in shards for block in shard.done["blocks"])
    if covered != expected:
        raise InputError("the shards' blocks do not cover the VCF exactly once; rerun the shards with --overwrite")
