"""Every option of `enformer-score VCF --fasta FA` that README's "Commands" section documents, exercised
through the command (in-process, ``CliRunner``) and checked by value against an expectation computed here
independently of the pipeline: the FASTA read with ``open()``, the 393,216-bp windows cut by string slicing
(docs/spec.md §3.2-3.4), one-hot encoded with numpy, the model called directly (``model(x)[head]``) and the
statistics of README's table computed with numpy in float64 (docs/spec.md §4.1). Never another run of our
own pipeline, except where an option promises equality with one (``--batch-size``).

Runs are few and small (the ``fast_model`` fixture, ``--tracks 0-7``, one to five variants each) and are
shared between checks by module-scoped fixtures; the direct predictions are cached per window.

Tolerances. Files store float16: round-to-nearest keeps 11 significant bits, so a stored value is within
2^-11 of the value relative (plus 2^-25 absolute below the smallest normal number). The expected values
come from a separate float32 pass (another batch composition), whose predictions differ from the
pipeline's by float32 noise; 1e-6 of the predictions involved (about 8 float32 ulps) bounds it, carried
through each formula (``float32_noise``). Measured on this model: single predictions moved by up to 4.8e-7
between batch compositions, and the stored values agree with the expectation within the float16 rounding
alone; the float32 allowance is the worst case (it exceeds the smallest SNV effects, not the larger ones).
"""
import contextlib
import csv
import hashlib
import json
import logging
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pysam
import pytest
import torch
from click.testing import CliRunner
from helpers import DATA

import enformer_vep.pipeline
from enformer_vep.cli import cli
from enformer_vep.model import Enformer
from enformer_vep.weights import load_model, save_native

GIAB = DATA / "grch38_chr1_giab_hg002"
FASTA = GIAB / "reference.fa"
TARGETS_MOUSE = Path(enformer_vep.__file__).parent / "data" / "targets_mouse.txt"
WINDOW, HALF, OFFSET = 393_216, 196_608, 196_607  # window length, its half, REF's first base in it
CONTIG_LENGTH = 860_893
TRACKS = list(range(8))  # --tracks 0-7
ALL_STATS = ("SAD", "SAR", "SADR", "SAX", "D1", "D2")
FLOAT16_MAX = 65_504.0
F16_RELATIVE, F16_ABSOLUTE = 2.0 ** -11, 2.0 ** -25
NOISE = 1e-6  # float32 noise of two separate passes, relative to the predictions involved
LN2 = math.log(2)

# README's table "Output: OUT/PREFIX.CHROM.h5" (the `formula` attribute "repeats the formula"; README writes
# abs(x) where the attribute writes |x|, the same formula)
README_FORMULAS = {
    "SAD": "sum_bins(alt) - sum_bins(ref)",
    "SAR": "sum_bins(log2(alt + 1) - log2(ref + 1))",
    "SADR": "log2(sum_bins(alt) + 1) - log2(sum_bins(ref) + 1)",
    "SAX": "(alt - ref) at the bin of max abs(alt - ref)",
    "D1": "sum_bins(abs(alt - ref))",
    "D2": "sqrt(sum_bins((alt - ref)^2))",
}


def vcf_records(path):
    """(CHROM, POS, ID, REF, ALT, FILTER) of a plain-text VCF, read by hand, in file order."""
    rows = []
    for line in open(path):
        if not line.startswith("#"):
            chrom, pos, vid, ref, alt, _, filt = line.split("\t")[:7]
            rows.append((chrom, int(pos), vid, ref, alt, filt))
    return rows


RECORDS = vcf_records(GIAB / "input.vcf")
BY_POS = {r[1]: r for r in RECORDS}
# the main run's regions: an insertion and two SNVs; an SNV and a 42-bp deletion whose windows run past
# the FASTA's end (N-padded, and the deletion pulls bases from beyond the window)
MAIN_REGIONS = ("chr1:602000-605000", "chr1:839400-839460")
MAIN_POS = [r[1] for r in RECORDS if 602000 <= r[1] <= 605000 or 839400 <= r[1] <= 839460]
INSERTION, SNV = 602113, 604358


# --- the independent computation --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def genome():
    """Contig `1` of reference.fa as one upper-case string, read with open()."""
    lines = FASTA.read_text().split("\n")
    assert lines[0] == ">1"
    sequence = "".join(lines[1:]).upper()
    assert len(sequence) == CONTIG_LENGTH and set(sequence) <= set("ACGTN")
    return sequence


def padded(sequence, start, end):
    """sequence[start:end] with N outside [0, len)."""
    inside = sequence[max(0, start):max(0, min(len(sequence), end))]
    return "N" * max(0, min(end, 0) - start) + inside + "N" * max(0, end - max(len(sequence), start))


def allele_windows(sequence, pos, ref, alt):
    """docs/spec.md §3.2-3.4: reference = genome [POS - 196,608, POS + 196,608); alternative = the first
    196,607 bases, ALT, then the genome from the base after REF, cut to 393,216."""
    start = pos - HALF
    ref_window = padded(sequence, start, start + WINDOW)
    after = pos - 1 + len(ref)
    alt_window = (ref_window[:OFFSET] + alt + padded(sequence, after, after + WINDOW))[:WINDOW]
    assert len(ref_window) == len(alt_window) == WINDOW
    return ref_window, alt_window


def shifted(window, shift):
    """docs/spec.md §5.1: the content moves ``shift`` bp toward higher offsets, vacated positions N."""
    if shift >= 0:
        return "N" * shift + window[:WINDOW - shift]
    return window[-shift:] + "N" * -shift


def reverse_complement(window):
    return window.translate(str.maketrans("ACGTN", "TGCAN"))[::-1]


def one_hot(windows):
    """[B, L, 4] float32, columns A, C, G, T; N = zeros."""
    codes = np.frombuffer("".join(windows).encode(), np.uint8).reshape(len(windows), -1)
    return torch.from_numpy(np.stack([codes == ord(b) for b in "ACGT"], axis=-1).astype(np.float32))


class Direct:
    """Predictions of windows cut here, by a direct model call (``model(x)``, x [2, 393216, 4]: the reference
    and the alternative of one view), cached per (model, tracks, variant, view) for every head at once."""

    def __init__(self, sequence):
        self.sequence, self.cache = sequence, {}

    def view(self, model, head, tracks, pos, ref, alt, shift=0, reverse=False):
        """(ref, alt) [896, T] float64 of one view; reverse-strand bins flipped back."""
        key = (id(model), tuple(tracks), pos, ref, alt, shift, reverse)
        if key not in self.cache:
            windows = [shifted(w, shift) for w in allele_windows(self.sequence, pos, ref, alt)]
            if reverse:
                windows = [reverse_complement(w) for w in windows]
            with torch.no_grad():
                out = {name: p[..., list(tracks)].double().numpy() for name, p in model(one_hot(windows)).items()}
            self.cache[key] = {name: (p[0, ::-1], p[1, ::-1]) if reverse else (p[0], p[1]) for name, p in out.items()}
        return self.cache[key][head]

    def predictions(self, model, pos, ref, alt, *, head="human", tracks=TRACKS, shifts=(0,), rc=False):
        """(ref, alt) [896, T] float64: the mean over the views (each shift, and with ``rc`` its reverse
        complement)."""
        views = [(s, False) for s in shifts] + ([(s, True) for s in shifts] if rc else [])
        pairs = [self.view(model, head, tracks, pos, ref, alt, s, r) for s, r in views]
        return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def statistics(ref, alt):
    """README's formulas in float64, per track: {name: [T]}."""
    d = alt - ref
    peak = np.abs(d).argmax(0)
    return {"SAD": alt.sum(0) - ref.sum(0),
            "SAR": (np.log2(alt + 1) - np.log2(ref + 1)).sum(0),
            "SADR": np.log2(alt.sum(0) + 1) - np.log2(ref.sum(0) + 1),
            "SAX": d[peak, np.arange(d.shape[1])],
            "D1": np.abs(d).sum(0),
            "D2": np.sqrt((d ** 2).sum(0))}


def float32_noise(name, ref, alt, relative=NOISE):
    """[T]: how far a separate float32 pass can move the statistic: a perturbation of ``relative`` times
    each prediction, carried through the formula (first order)."""
    size = ref + alt
    if name in ("SAD", "D1"):
        return relative * size.sum(0)
    if name == "SAR":
        return relative * (ref / (ref + 1) + alt / (alt + 1)).sum(0) / LN2
    if name == "SADR":
        return relative * size.sum(0) / (ref.sum(0) + 1) / LN2
    if name == "SAX":
        return relative * size.max(0)
    return relative * np.sqrt((size ** 2).sum(0))  # D2: | ||d + e|| - ||d|| | <= ||e||


def assert_stored(name, got, ref, alt, what="", relative=NOISE):
    """The stored float16 values ``got`` [T] equal README's statistic of (ref, alt) within float16 rounding
    plus the noise of predictions perturbed by ``relative`` (float32: NOISE). SAX: where bins' |alt - ref|
    tie within that noise, any of them may be the peak."""
    got = np.asarray(got, np.float64)
    want = statistics(ref, alt)[name]
    noise = float32_noise(name, ref, alt, relative)
    if name == "SAX":  # the candidate peak closest to the stored value
        d = alt - ref
        candidates = np.where(np.abs(d) >= np.abs(d).max(0) - 2 * relative * (ref + alt), d, np.inf)
        want = candidates[np.abs(candidates - got).argmin(0), np.arange(d.shape[1])]
    allowed = F16_RELATIVE * np.abs(want) + F16_ABSOLUTE + noise
    error = np.abs(got - want)
    assert (error <= allowed).all(), (what, name, got, want, (error / allowed).max())


def differs(a, b, name, ref, alt):
    """Whether two expectations differ by more than the tolerance somewhere (an option that changes the
    expectation this much cannot be ignored unnoticed)."""
    a, b = statistics(*a)[name], statistics(*b)[name]
    allowed = F16_RELATIVE * np.abs(a) + F16_ABSOLUTE + 2 * float32_noise(name, ref, alt)
    return bool((np.abs(a - b) > allowed).any())


# --- running the command -----------------------------------------------------------------------------------

def run(*args):
    """``enformer-score ARGS`` in-process, which must succeed; its result (``output``: stdout and stderr,
    ``stderr`` alone)."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def score(vcf, out, model, *extra):
    return run(vcf, "--fasta", FASTA, "--model", model, "-o", out, "--device", "cpu", *extra)


class Collected(logging.Handler):
    """The messages of the `enformer_vep` logger (the command's log lines; CliRunner configures no logging)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def collected_logs():
    logger, handler = logging.getLogger("enformer_vep"), Collected()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def conv_batches():
    """The batch sizes of the conv tower's passes during a run (Enformer.convolve, spied on)."""
    sizes, convolve = [], Enformer.convolve

    def spy(self, x):
        sizes.append(int(x.shape[0]))
        return convolve(self, x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Enformer, "convolve", spy)
        yield sizes


def progress_lines(messages):
    """The periodic progress lines (`scored N records (...)` / `scored N of M records (...)`): their counts."""
    pattern = re.compile(r"scored ([\d,]+)( of [\d,]+)? records \(")
    return [int(match[1].replace(",", "")) for match in map(pattern.match, messages) if match]


def only_h5(out):
    files = sorted(out.glob("*.h5"))
    assert len(files) == 1, files
    return files[0]


def rows(path):
    with h5py.File(path, "r") as f:
        return [(c.decode(), int(p), r.decode(), a.decode())
                for c, p, r, a in zip(f["chr"][:], f["pos"][:], f["ref"][:], f["alt"][:], strict=True)]


def write_vcf(path, records, contigs=("chr1",)):
    """A plain VCF of (CHROM, POS, ID, REF, ALT, FILTER) records."""
    header = "##fileformat=VCFv4.2\n##FILTER=<ID=PASS,Description=\"All filters passed\">\n" \
        "##FILTER=<ID=LowQual,Description=\"low quality\">\n##FILTER=<ID=q10,Description=\"quality below 10\">\n"
    header += "".join(f"##contig=<ID={c}>\n" for c in contigs)
    header += "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
    path.write_text(header + "".join(f"{c}\t{p}\t{i}\t{r}\t{a}\t50\t{f}\t.\n" for c, p, i, r, a, f in records))
    return path


def bgzip_indexed(vcf):
    """VCF.gz + .tbi of a plain VCF (pysam, as htslib's bgzip and tabix)."""
    pysam.tabix_compress(str(vcf), str(vcf) + ".gz", force=True)
    pysam.tabix_index(str(vcf) + ".gz", preset="vcf", force=True)
    return vcf.with_name(vcf.name + ".gz")


def skipped_lines(out):
    lines = (out / "skipped.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["chrom", "pos", "id", "ref", "alt", "reason", "record"]
    return [line.split("\t") for line in lines[1:]]


def saved(tmp_path_factory, model, name):
    path = tmp_path_factory.mktemp("model") / name
    save_native(model.state_dict(), path)
    return path


# --- shared fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def direct(genome):
    return Direct(genome)


@pytest.fixture(scope="module")
def model(fast_model):
    """The fast_model file as the command loads it: the model the expectations call directly."""
    return load_model(fast_model)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, fast_model):
    """The five variants of MAIN_REGIONS, every statistic, tracks 0-7, --batch-size 8, --precision fp32,
    --no-progress (with PROGRESS_EVERY made tiny: no line may come anyway), from a copy of input.vcf.gz
    named `hg002.v4.vcf.gz` (default prefix `hg002.v4`): its output directory, CliRunner result, the conv
    tower's batch sizes, the log messages and the VCF."""
    root = tmp_path_factory.mktemp("main")
    vcf = root / "hg002.v4.vcf.gz"
    shutil.copyfile(GIAB / "input.vcf.gz", vcf)
    shutil.copyfile(GIAB / "input.vcf.gz.tbi", root / "hg002.v4.vcf.gz.tbi")
    regions = [a for region in MAIN_REGIONS for a in ("--region", region)]
    with pytest.MonkeyPatch.context() as patch, collected_logs() as log, conv_batches() as batches:
        patch.setattr(enformer_vep.pipeline, "PROGRESS_EVERY", 0.05)
        result = score(vcf, root / "out", fast_model, *regions, "--stats", ",".join(ALL_STATS), "--tracks", "0-7",
                       "--batch-size", "8", "--precision", "fp32", "--no-progress")
    return SimpleNamespace(out=root / "out", result=result, batches=batches, log=log, vcf=vcf)


# --- 1. every statistic, 8. --precision fp32, 12. the default prefix of a VCF.gz ------------------------

def test_every_statistic_as_stored_equals_numpy_on_direct_model_calls(main_run, model, direct):
    """--stats SAD,SAR,SADR,SAX,D1,D2 with --precision fp32: each stored value equals README's formula
    computed in numpy from a direct float32 model call on windows cut from the FASTA text (an insertion,
    SNVs, an N-padded SNV and a 42-bp deletion past the contig's end), within float16 rounding plus float32
    noise. The rows are the VCF's records in the regions, read from its text."""
    path = main_run.out / "hg002.v4.chr1.h5"
    assert rows(path) == [("chr1", p, BY_POS[p][3], BY_POS[p][4]) for p in MAIN_POS]
    assert len(MAIN_POS) == 5 and any(len(BY_POS[p][3]) > 40 for p in MAIN_POS)
    with h5py.File(path, "r") as f:
        assert f["target_ids"].shape == (8,)
        for i, pos in enumerate(MAIN_POS):
            ref, alt = direct.predictions(model, pos, BY_POS[pos][3], BY_POS[pos][4])
            for name in ALL_STATS:
                assert f[name].dtype == np.float16 and f[name].shape == (5, 8)
                assert_stored(name, f[name][i], ref, alt, pos)


def test_default_prefix_of_a_vcf_gz(main_run):
    """README: the prefix defaults to the VCF name without .vcf/.bcf/.gz: `hg002.v4.vcf.gz` writes
    `hg002.v4.chr1.h5` (inner dots kept)."""
    assert only_h5(main_run.out).name == "hg002.v4.chr1.h5"


def test_default_prefix_of_a_bcf(tmp_path, fast_model):
    """`hg002.v4.bcf` (a copy of input.bcf with its .csi) writes `hg002.v4.chr1.h5`, one row."""
    shutil.copyfile(GIAB / "input.bcf", tmp_path / "hg002.v4.bcf")
    shutil.copyfile(GIAB / "input.bcf.csi", tmp_path / "hg002.v4.bcf.csi")
    score(tmp_path / "hg002.v4.bcf", tmp_path / "out", fast_model, "--region", f"chr1:{SNV}-{SNV}",
          "--tracks", "0-7", "--stats", "SAD", "--no-progress")
    assert only_h5(tmp_path / "out").name == "hg002.v4.chr1.h5"
    assert [r[1] for r in rows(tmp_path / "out" / "hg002.v4.chr1.h5")] == [SNV]


# --- 10. done.json, dataset and file attributes -------------------------------------------------------------

def test_done_json_attributes_and_summary(main_run, fast_model):
    """done.json counts 5 scored and no skip and lists each file with its rows and SHA-256 (hashlib);
    every statistic has README's `formula` and `clipped` 0; the file's attributes hold the options given:
    `options` JSON (stats, tracks, regions, precision, prefix, and the defaults of the others), the
    model (`model_source`, `model_sha256` of its bytes), `vcf` and `fasta`; the summary says `scored 5
    variant alleles`."""
    out, result = main_run.out, main_run.result
    done = json.loads((out / "done.json").read_text())
    assert done["summary"]["scored"] == 5 and done["summary"]["skipped"] == {}
    assert done["summary"]["ref_mismatch_scored"] == 0
    assert done["summary"]["clipped"] == dict.fromkeys(ALL_STATS, 0)
    for name in ("hg002.v4.chr1.h5", "skipped.tsv"):
        assert done["files"][name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert done["files"]["hg002.v4.chr1.h5"]["rows"] == 5
    assert skipped_lines(out) == []
    with h5py.File(out / "hg002.v4.chr1.h5", "r") as f:
        for name in ALL_STATS:
            assert f[name].attrs["formula"] == README_FORMULAS[name].replace("abs(alt - ref)", "|alt - ref|")
            assert int(f[name].attrs["clipped"]) == 0
        options = json.loads(f.attrs["options"])
        assert f.attrs["model_source"] == str(fast_model)
        assert f.attrs["model_sha256"] == hashlib.sha256(fast_model.read_bytes()).hexdigest()
        assert f.attrs["vcf"] == str(main_run.vcf) and f.attrs["fasta"] == str(FASTA)
        assert json.loads(f.attrs["statistics"]) == {k: f[k].attrs["formula"] for k in ALL_STATS}
    assert options["stats"] == list(ALL_STATS) and options["tracks"] == "0-7"
    assert options["regions"] == list(MAIN_REGIONS) and options["precision"] == "fp32"
    assert options["prefix"] == "hg002.v4" and options["rc"] is False and options["shifts"] == [0]
    assert options["organism"] == "human" and options["pass_only"] is False and options["ref_mismatch"] == "skip"
    # the --reuse default per device: off on the CPU (two full passes), so --tiles has nothing to act on
    assert options["reuse"] is False and options["tiles"] is True
    assert "scored 5 variant alleles in" in result.stderr
    assert "values clipped" not in result.stderr


# --- 6. --batch-size --------------------------------------------------------------------------------------

def test_batch_size_sets_the_passes_and_keeps_the_values(main_run, tmp_path, fast_model, model, direct):
    """--batch-size 1 and --batch-size 8 (the main run) over the same three variants: the conv tower ran
    passes of 2 sequences (one reference and its alternative: a variant's pair is never split) against
    8 then 2 (four pairs, then the fifth variant's), and the stored values agree within float32 rounding:
    two float16 roundings (2^-10 of the value) plus the float32 noise of two passes; both equal the direct
    computation."""
    with conv_batches() as batches:
        score(GIAB / "input.vcf.gz", tmp_path / "out", fast_model, "--region", MAIN_REGIONS[0], "--tracks", "0-7",
              "--stats", ",".join(ALL_STATS), "--batch-size", "1", "--no-progress")
    assert batches == [2, 2, 2]
    assert main_run.batches == [8, 2]
    with h5py.File(only_h5(tmp_path / "out"), "r") as one, h5py.File(main_run.out / "hg002.v4.chr1.h5", "r") as eight:
        assert one["pos"][:].tolist() == MAIN_POS[:3] == eight["pos"][:3].tolist()
        for i, pos in enumerate(MAIN_POS[:3]):
            ref, alt = direct.predictions(model, pos, BY_POS[pos][3], BY_POS[pos][4])
            for name in ALL_STATS:
                a, b = one[name][i].astype(np.float64), eight[name][i].astype(np.float64)
                allowed = 2 * F16_RELATIVE * np.maximum(abs(a), abs(b)) + 2 * F16_ABSOLUTE \
                    + float32_noise(name, ref, alt)
                assert (np.abs(a - b) <= allowed).all(), (pos, name, a, b)
                assert_stored(name, one[name][i], ref, alt, pos)


# --- 2. --shifts and --rc -----------------------------------------------------------------------------------

def test_shifts_and_reverse_complement_average_the_views(tmp_path, fast_model, model, direct):
    """--shifts -1,0,1 --rc on the insertion: the stored statistics are those of the mean of six direct
    predictions: each window shifted (content moved toward higher offsets, N filled in) and its reverse
    complement (bins flipped back). The expectation differs beyond the tolerance from the unshifted
    forward one (SAD), and SAX from the mean taken without flipping the reverse-strand bins back, so an
    option ignored, or bins left unflipped, fail."""
    pos, ref_allele, alt_allele = INSERTION, BY_POS[INSERTION][3], BY_POS[INSERTION][4]
    score(GIAB / "input.vcf.gz", tmp_path / "out", fast_model, "--region", f"chr1:{pos}-{pos}", "--tracks", "0-7",
          "--stats", ",".join(ALL_STATS), "--shifts", "-1,0,1", "--rc", "--no-progress")
    ref, alt = direct.predictions(model, pos, ref_allele, alt_allele, shifts=(-1, 0, 1), rc=True)
    with h5py.File(only_h5(tmp_path / "out"), "r") as f:
        assert f["pos"][:].tolist() == [pos]
        for name in ALL_STATS:
            assert_stored(name, f[name][0], ref, alt)
        options = json.loads(f.attrs["options"])
    assert options["shifts"] == [-1, 0, 1] and options["rc"] is True
    plain = direct.predictions(model, pos, ref_allele, alt_allele)
    assert differs((ref, alt), plain, "SAD", ref, alt)
    views = [direct.view(model, "human", TRACKS, pos, ref_allele, alt_allele, s, r) for s in (-1, 0, 1)
             for r in (False, True)]
    unflipped = [(v[0][::-1], v[1][::-1]) if k % 2 else v for k, v in enumerate(views)]
    unflipped = (sum(v[0] for v in unflipped) / 6, sum(v[1] for v in unflipped) / 6)
    assert differs((ref, alt), unflipped, "SAX", ref, alt)


def test_a_shift_moves_the_content_toward_higher_offsets(tmp_path, fast_model, model, direct):
    """--shifts 3 alone (a symmetric set like -1,0,1 cannot tell the direction): the stored values are
    those of the windows' content moved 3 bp toward higher offsets, which differ from a move of -3."""
    pos, ref_allele, alt_allele = INSERTION, BY_POS[INSERTION][3], BY_POS[INSERTION][4]
    score(GIAB / "input.vcf.gz", tmp_path / "out", fast_model, "--region", f"chr1:{pos}-{pos}", "--tracks", "0-7",
          "--stats", "SAD,SAR,SAX", "--shifts", "3", "--no-progress")
    ref, alt = direct.predictions(model, pos, ref_allele, alt_allele, shifts=(3,))
    with h5py.File(only_h5(tmp_path / "out"), "r") as f:
        for name in ("SAD", "SAR", "SAX"):
            assert_stored(name, f[name][0], ref, alt)
    assert differs((ref, alt), direct.predictions(model, pos, ref_allele, alt_allele, shifts=(-3,)), "SAD", ref, alt)


# --- 3. --pass-only -----------------------------------------------------------------------------------------

def test_pass_only_scores_exactly_the_pass_and_missing_filters(tmp_path, fast_model, model, direct):
    """Four GIAB records with FILTER PASS, LowQual, `.` and LowQual;q10: --pass-only scores the PASS and
    the `.` record (rows by pos, values as the direct computation); the other two are listed in
    skipped.tsv as `not PASS` with their 1-based record numbers, counted in the summary and done.json.
    (Also README's `--batch-size auto` on CPU: the two variants went through one pass of 4 sequences.)"""
    chosen = [BY_POS[p] for p in (INSERTION, SNV, 604360, 611317)]
    filters = ["PASS", "LowQual", ".", "LowQual;q10"]
    vcf = write_vcf(tmp_path / "filters.vcf", [r[:5] + (f,) for r, f in zip(chosen, filters, strict=True)])
    with conv_batches() as batches:
        result = score(vcf, tmp_path / "out", fast_model, "--pass-only", "--tracks", "0-7", "--stats", "SAD",
                       "--no-progress")
    assert batches == [4]
    path = tmp_path / "out" / "filters.chr1.h5"
    assert [r[1] for r in rows(path)] == [INSERTION, 604360]
    with h5py.File(path, "r") as f:
        for i, pos in enumerate((INSERTION, 604360)):
            assert_stored("SAD", f["SAD"][i], *direct.predictions(model, pos, BY_POS[pos][3], BY_POS[pos][4]))
    assert skipped_lines(tmp_path / "out") == [  # a missing ID is written chrom:pos (docs/spec.md §3.6)
        ["chr1", str(SNV), f"chr1:{SNV}", BY_POS[SNV][3], BY_POS[SNV][4], "not PASS", "2"],
        ["chr1", "611317", "chr1:611317", BY_POS[611317][3], BY_POS[611317][4], "not PASS", "4"]]
    assert "skipped 2: not PASS" in result.stderr and "scored 2 variant alleles" in result.stderr
    done = json.loads((tmp_path / "out" / "done.json").read_text())["summary"]
    assert done["scored"] == 2 and done["skipped"] == {"not PASS": 2}


# --- 4. --ref-mismatch --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mismatch_vcf(tmp_path_factory):
    """The SNV at 604,358 (G>C) with REF edited to A, then the SNV at 604,360 as it is."""
    return write_vcf(tmp_path_factory.mktemp("mismatch") / "mismatch.vcf",
                     [("chr1", SNV, "edited", "A", BY_POS[SNV][4], "PASS"), BY_POS[604360]])


def test_ref_mismatch_score_scores_it_from_the_fasta(mismatch_vcf, tmp_path, fast_model, model, direct):
    """--ref-mismatch score: the edited record is scored, both windows built from the FASTA (its values
    equal those of G>C computed directly, and a reference window holding the VCF's A would be told
    apart), and the summary says `scored despite a REF mismatch: 1` (done.json: ref_mismatch_scored 1)
    with the rate `1 of 2 alleles`."""
    assert BY_POS[SNV][3] == "G" and BY_POS[SNV][4] == "C"
    result = score(mismatch_vcf, tmp_path / "out", fast_model, "--ref-mismatch", "score", "--tracks", "0-7",
                   "--stats", "SAD,SAR", "--no-progress")
    path = tmp_path / "out" / "mismatch.chr1.h5"
    assert [r[1] for r in rows(path)] == [SNV, 604360]
    with h5py.File(path, "r") as f:
        ref, alt = direct.predictions(model, SNV, "G", "C")
        for name in ("SAD", "SAR"):
            assert_stored(name, f[name][0], ref, alt)
    fasta_ref, alt_window = allele_windows(direct.sequence, SNV, "G", "C")
    with torch.no_grad():  # the reference window with the VCF's REF written in
        vcf_ref = model(one_hot([fasta_ref[:OFFSET] + "A" + fasta_ref[OFFSET + 1:], alt_window]))["human"]
    vcf_ref = vcf_ref[..., TRACKS].double().numpy()
    assert differs((ref, alt), (vcf_ref[0], vcf_ref[1]), "SAD", ref, alt)
    assert "scored despite a REF mismatch: 1" in result.stderr
    assert "REF differs from the FASTA for 1 of 2 alleles (50.00%)" in result.stderr
    done = json.loads((tmp_path / "out" / "done.json").read_text())["summary"]
    assert done["scored"] == 2 and done["ref_mismatch_scored"] == 1 and done["skipped"] == {}
    assert skipped_lines(tmp_path / "out") == []


def test_ref_mismatch_skip_is_the_default_and_lists_it(mismatch_vcf, tmp_path, fast_model):
    """Without --ref-mismatch the edited record is skipped: skipped.tsv names it with the FASTA's base,
    the summary and done.json count it, and only the other record has a row."""
    result = score(mismatch_vcf, tmp_path / "out", fast_model, "--tracks", "0-7", "--stats", "SAD", "--no-progress")
    assert [r[1] for r in rows(tmp_path / "out" / "mismatch.chr1.h5")] == [604360]
    assert skipped_lines(tmp_path / "out") == [
        ["chr1", str(SNV), "edited", "A", "C", "REF mismatch (FASTA has G)", "1"]]
    assert "skipped 1: REF mismatch" in result.stderr and "scored despite" not in result.stderr
    done = json.loads((tmp_path / "out" / "done.json").read_text())["summary"]
    assert done["skipped"] == {"REF mismatch": 1} and done["ref_mismatch_scored"] == 0


# --- 5. --chrom ---------------------------------------------------------------------------------------------

def test_chrom_scores_only_that_contig(tmp_path, fast_model, model, direct):
    """A FASTA with contig `1` and its copy `2`, and an indexed VCF.gz with two chr1 records and one chr2
    record (the SNV at 604,358 again): --chrom chr2 writes only `two.chr2.h5`, its one row scored as the
    direct computation of that SNV; the chr1 records are neither scored nor listed as skipped."""
    text = FASTA.read_text()
    fasta = tmp_path / "two.fa"
    fasta.write_text(text + ">2\n" + text.split("\n", 1)[1])
    records = [BY_POS[SNV], BY_POS[604360], ("chr2", SNV, "c2", "G", "C", "PASS")]
    vcf = bgzip_indexed(write_vcf(tmp_path / "two.vcf", records, contigs=("chr1", "chr2")))
    run(vcf, "--fasta", fasta, "--model", fast_model, "-o", tmp_path / "out", "--device", "cpu", "--chrom", "chr2",
        "--tracks", "0-7", "--stats", "SAD", "--no-progress")
    path = only_h5(tmp_path / "out")
    assert path.name == "two.chr2.h5" and rows(path) == [("chr2", SNV, "G", "C")]
    with h5py.File(path, "r") as f:
        assert_stored("SAD", f["SAD"][0], *direct.predictions(model, SNV, "G", "C"))
    assert skipped_lines(tmp_path / "out") == []
    assert json.loads((tmp_path / "out" / "done.json").read_text())["summary"]["scored"] == 1


# --- 7. --organism mouse -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_head_model(tmp_path_factory, tiny_enformer):
    """A small random Enformer (the fast_model's shape) with both released heads: human 5313, mouse 1643."""
    model = tiny_enformer(seed=7, channels=12, pooling="max", conv_filters=[6, 6, 6, 6, 8, 12],
                          heads={"human": 5313, "mouse": 1643})
    path = saved(tmp_path_factory, model, "two_heads.safetensors")
    return path, load_model(path)


def test_organism_mouse_scores_the_mouse_head(tmp_path, two_head_model, direct):
    """--organism mouse --tracks 0-3,1639-1642: the values are those of `model(x)["mouse"]` at these
    columns (which differ from the human head's), `target_ids`/`target_labels` are those rows of
    targets_mouse.txt (read with csv), and the file's options say organism mouse."""
    path, model = two_head_model
    tracks = [0, 1, 2, 3, 1639, 1640, 1641, 1642]
    pos, ref_allele, alt_allele = INSERTION, BY_POS[INSERTION][3], BY_POS[INSERTION][4]
    score(GIAB / "input.vcf.gz", tmp_path / "out", path, "--region", f"chr1:{pos}-{pos}", "--organism", "mouse",
          "--tracks", "0-3,1639-1642", "--stats", "SAD,SAR", "--no-progress")
    ref, alt = direct.predictions(model, pos, ref_allele, alt_allele, head="mouse", tracks=tracks)
    with open(TARGETS_MOUSE, newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert len(table) == 1643
    with h5py.File(only_h5(tmp_path / "out"), "r") as f:
        for name in ("SAD", "SAR"):
            assert_stored(name, f[name][0], ref, alt)
        assert [t.decode() for t in f["target_ids"][:]] == [table[i]["identifier"] for i in tracks]
        assert [t.decode() for t in f["target_labels"][:]] == [table[i]["description"] for i in tracks]
        assert json.loads(f.attrs["options"])["organism"] == "mouse"
    human = direct.predictions(model, pos, ref_allele, alt_allele, head="human", tracks=tracks)
    assert differs((ref, alt), human, "SAD", ref, alt)


# --- 8. --precision bf16 -----------------------------------------------------------------------------------

# bf16 keeps 8 significant bits (relative rounding 2^-9); rounded at every layer of the trunk, it moved
# single predictions of this model by up to 1.4% (measured): the bound is 2^-5 of each prediction
BF16 = 2.0 ** -5


def test_precision_bf16_differs_from_fp32_within_a_bound(main_run, tmp_path, fast_model, model, direct):
    """--precision bf16 on CPU (bfloat16 autocast of the trunk) over the main run's first three variants:
    the values differ from the float32 expectation by more than float16 + float32 noise somewhere, but
    stay within the bound of a relative error BF16 of every prediction, carried through each formula as
    the float32 noise is (SAX: at a bin whose |alt - ref| ties with the peak's within it). The options
    record bf16. The fp32 side: the main run (explicit --precision fp32) equals the direct float32
    computation in the first test."""
    score(GIAB / "input.vcf.gz", tmp_path / "out", fast_model, "--region", MAIN_REGIONS[0], "--tracks", "0-7",
          "--stats", ",".join(ALL_STATS), "--precision", "bf16", "--no-progress")
    moved = False
    with h5py.File(only_h5(tmp_path / "out"), "r") as f:
        assert json.loads(f.attrs["options"])["precision"] == "bf16"
        for i, pos in enumerate(MAIN_POS[:3]):
            ref, alt = direct.predictions(model, pos, BY_POS[pos][3], BY_POS[pos][4])
            want = statistics(ref, alt)
            for name in ALL_STATS:
                got = f[name][i].astype(np.float64)
                strict = F16_RELATIVE * np.abs(want[name]) + F16_ABSOLUTE + float32_noise(name, ref, alt)
                moved |= bool((np.abs(got - want[name]) > strict).any())
                assert_stored(name, got, ref, alt, pos, relative=BF16)
    assert moved


# --- 9. values clipped to the float16 range ----------------------------------------------------------------

@pytest.fixture(scope="module")
def loud_model(tmp_path_factory, model):
    """The fast model with its human head's weight and bias multiplied by 1e5: softplus(1e5 z) ~ 1e5 z, so
    predictions reach ~6e4 per bin and sums over bins exceed the float16 range."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["heads.human.weight"] *= 1e5
    state["heads.human.bias"] *= 1e5
    path = tmp_path_factory.mktemp("loud") / "loud.safetensors"
    save_native(state, path)
    return path, load_model(path)


def test_values_beyond_float16_are_clipped_and_counted(tmp_path, loud_model, direct):
    """With predictions ~1e5, some |statistic| exceed 65,504: they are stored as +-65,504 with their sign,
    counted per statistic (as many as the direct computation has) in the dataset's `clipped`, done.json
    and the summary line `NAME: N values clipped to the float16 range`; the others are stored as usual."""
    path, model = loud_model
    pos, ref_allele, alt_allele = INSERTION, BY_POS[INSERTION][3], BY_POS[INSERTION][4]
    stats = ("SAD", "SAR", "D1", "D2")
    result = score(GIAB / "input.vcf.gz", tmp_path / "out", path, "--region", f"chr1:{pos}-{pos}", "--tracks", "0-7",
                   "--stats", ",".join(stats), "--no-progress")
    ref, alt = direct.predictions(model, pos, ref_allele, alt_allele)
    want = statistics(ref, alt)
    counts = {name: int((np.abs(want[name]) > FLOAT16_MAX).sum()) for name in stats}
    assert counts["D1"] > 0 and sum(counts.values()) < 8 * len(stats), counts  # some clipped, some not
    done = json.loads((tmp_path / "out" / "done.json").read_text())["summary"]
    assert done["clipped"] == counts
    with h5py.File(only_h5(tmp_path / "out"), "r") as f:
        for name in stats:
            # no value within the tolerance of the limit, so that the count is determinate
            assert (np.abs(np.abs(want[name]) - FLOAT16_MAX) > 1e-3 * FLOAT16_MAX).all(), name
            clipped = np.abs(want[name]) > FLOAT16_MAX
            got = f[name][0].astype(np.float64)
            assert (got[clipped] == np.sign(want[name][clipped]) * FLOAT16_MAX).all(), name
            assert_stored(name, got[~clipped], ref[:, ~clipped], alt[:, ~clipped], name)
            assert int(f[name].attrs["clipped"]) == counts[name]
    for name, n in counts.items():
        assert (f"{name}: {n} values clipped to the float16 range" in result.stderr) == (n > 0), name


# --- 11. --progress ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_record_vcf(tmp_path_factory):
    """An indexed VCF.gz holding only the SNV at 604,358 (the index counts 1 record: the bar's total)."""
    return bgzip_indexed(write_vcf(tmp_path_factory.mktemp("one") / "one.vcf", [BY_POS[SNV]]))


def test_progress_draws_a_bar_on_stderr(one_record_vcf, tmp_path, fast_model, monkeypatch):
    """--progress: a tqdm bar `scoring` on stderr, counting records against the index's total (100%, 1/1)
    with a rate; no periodic log line comes while the bar is drawn."""
    monkeypatch.setattr(enformer_vep.pipeline, "PROGRESS_EVERY", 0.05)
    with collected_logs() as log:
        result = score(one_record_vcf, tmp_path / "out", fast_model, "--tracks", "0-7", "--stats", "SAD",
                       "--progress")
    bar = [part for part in re.split(r"[\r\n]", result.stderr) if part.startswith("scoring:")]
    assert bar and re.match(r"scoring: 100%\|.*\| 1/1 \[.*records", bar[-1]), result.stderr
    assert progress_lines(log) == []


def test_without_a_terminal_progress_is_periodic_log_lines(one_record_vcf, tmp_path, fast_model, monkeypatch):
    """No --progress option and no terminal (CliRunner's stderr): no bar, but a log line every
    PROGRESS_EVERY seconds (30 by default; 0.01 here) counting the records scored so far (of 1)."""
    monkeypatch.setattr(enformer_vep.pipeline, "PROGRESS_EVERY", 0.01)
    with collected_logs() as log:
        result = score(one_record_vcf, tmp_path / "out", fast_model, "--tracks", "0-7", "--stats", "SAD")
    assert "scoring:" not in result.stderr
    counts = progress_lines(log)
    assert len(counts) >= 2 and counts == sorted(counts) and counts[-1] <= 1, log
    assert all(" of 1 records (" in m for m in log if m.startswith("scored ") and "records (" in m)


def test_no_progress_draws_nothing(main_run):
    """--no-progress (the main run, with PROGRESS_EVERY 0.05 s over a run of several seconds): neither a
    bar nor a periodic line."""
    assert "scoring:" not in main_run.result.stderr and "records/s" not in main_run.result.stderr
    assert progress_lines(main_run.log) == []
