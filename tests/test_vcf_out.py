"""`--vcf-out`: the scored VCF reads back with cyvcf2, every ALT allele carrying the strongest SAD
of each assay family, computed here independently from the HDF5 file."""
import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from cyvcf2 import VCF
from helpers import DATA

from enformer_vep.cli import cli
from enformer_vep.vcf_out import assay_families

GIAB = DATA / "grch38_chr1_giab_hg002"


def test_assay_families_from_track_descriptions():
    labels = ["CAGE:liver", "DNASE:x", "CHIP:H3K4me3:y", "CAGE:brain", "no colon", "ATAC-seq:z"]
    families = assay_families(labels)
    assert list(families) == ["CAGE", "DNASE", "CHIP", "OTHER", "ATAC_SEQ"]
    assert families["CAGE"].tolist() == [0, 3] and families["OTHER"].tolist() == [4]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, fast_model):
    """12 GIAB records, the 4th made multi-allelic with a symbolic second ALT (not scored), then a
    record on chr2 (not in the FASTA: not scored)."""
    tmp = tmp_path_factory.mktemp("vcf_out")
    lines = (GIAB / "input.vcf").read_text().splitlines(keepends=True)
    header = [line for line in lines if line.startswith("#")]
    body = [line for line in lines if not line.startswith("#")][:12]
    fields = body[3].split("\t")
    fields[4] += ",<DEL>"
    fields[9] = "1/2" + fields[9][3:]
    body[3] = "\t".join(fields)
    body.append("chr2\t5000\tnot_here\tA\tG\t50\tPASS\t.\tGT\t0/1\n")
    vcf = tmp / "in.vcf"
    vcf.write_text("".join(header + body))
    result = CliRunner().invoke(cli, [str(vcf), "--fasta", str(GIAB / "reference.fa"), "--model", str(fast_model),
                                      "--device", "cpu", "--no-progress", "-o", str(tmp / "out"),
                                      "--vcf-out", str(tmp / "annotated.vcf.gz")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp


def test_annotated_vcf_has_the_strongest_sad_per_family(annotated):
    with h5py.File(annotated / "out" / "in.chr1.h5", "r") as f:
        sad = f["SAD"][:].astype(np.float32)
        ids = [t.decode() for t in f["target_ids"][:]]
        labels = [t.decode() for t in f["target_labels"][:]]
        keys = list(zip(f["pos"][:].tolist(), (a.decode() for a in f["alt"][:]), strict=True))
    want = {}
    for row, key in enumerate(keys):  # a plain loop over every track
        best = {}
        for column, label in enumerate(labels):
            family = label.split(":")[0].upper().replace("-", "_")
            if family not in best or abs(sad[row, column]) > abs(sad[row, best[family]]):
                best[family] = column
        want[key] = {family: (sad[row, c], ids[c]) for family, c in best.items()}
    assert {"CAGE", "DNASE", "CHIP", "ATAC"} <= set(next(iter(want.values())))

    records = list(VCF(str(annotated / "annotated.vcf.gz")))
    assert len(records) == 13 and len(want) == 12
    for rec in records[:12]:
        for family in ("CAGE", "DNASE", "CHIP", "ATAC"):
            values = rec.INFO.get(f"ENFORMER_{family}_SAD")
            tracks = rec.INFO.get(f"ENFORMER_{family}_TRACK")
            values = values if isinstance(values, tuple) else (values,)
            tracks = tracks.split(",") if isinstance(tracks, str) else list(tracks)
            assert len(values) == len(rec.ALT) == len(tracks)
            for alt, value, track in zip(rec.ALT, values, tracks, strict=True):
                if alt == "<DEL>":
                    assert value is None and track == "."
                    continue
                expected, expected_track = want[(rec.POS, alt)][family]
                assert track == expected_track
                # written with 4 significant digits: <= 5e-4 of the value
                assert value == pytest.approx(float(expected), rel=1e-3, abs=1e-9)
    assert records[12].CHROM == "chr2" and records[12].INFO.get("ENFORMER_CAGE_SAD") is None
    header = VCF(str(annotated / "annotated.vcf.gz")).raw_header
    assert '##INFO=<ID=ENFORMER_CAGE_SAD,Number=A,Type=Float' in header


def test_annotated_vcf_is_indexed(annotated):
    vcf = VCF(str(annotated / "annotated.vcf.gz"))
    positions = [rec.POS for rec in vcf("chr1:700000-900000")]
    all_positions = [rec.POS for rec in VCF(str(annotated / "annotated.vcf.gz")) if rec.CHROM == "chr1"]
    assert positions == [p for p in all_positions if 700000 <= p <= 900000] and positions


def test_vcf_out_needs_sad_and_no_shard(tmp_path, fast_model):
    base = [str(GIAB / "input.vcf.gz"), "--fasta", str(GIAB / "reference.fa"), "--model", str(fast_model),
            "--device", "cpu", "-o", str(tmp_path), "--vcf-out", str(tmp_path / "a.vcf.gz")]
    result = CliRunner().invoke(cli, base + ["--stats", "SAR"])
    assert result.exit_code == 1 and "--vcf-out needs SAD" in result.output
    result = CliRunner().invoke(cli, base + ["--shard", "1/2"])
    assert result.exit_code == 1 and "give it to `enformer-score merge`" in result.output


BUG_REPORTS = DATA / "bug_reports"


def latin1_vcf(tmp_path):
    """The bug report's Latin-1 INFO value (0xE9, 0xE8) and UTF-8 ID and INFO, plus a Latin-1 ID."""
    source = (BUG_REPORTS / "vcf_out_latin1_bytes" / "latin1_info.vcf").read_bytes()
    assert b"NOTE=T\xe9lom\xe8re_latin1" in source and b"var_T\xc3\xa9lom\xc3\xa8re_utf8" in source
    vcf = tmp_path / "latin1.vcf"
    vcf.write_bytes(source + b"ctgB\t20000\tid_\xe9\tT\tA\t50\tPASS\tNOTE=\xff\tGT\t0/1\n")
    return vcf, source.splitlines(keepends=True)[-2:] + [b"ctgB\t20000\tid_\xe9\tT\tA\t50\tPASS\tNOTE=\xff\tGT\t0/1\n"]


def body_lines(path):
    import gzip
    return [line for line in gzip.decompress(path.read_bytes()).splitlines(keepends=True) if not line.startswith(b"#")]


def without_ours(line: bytes) -> bytes:
    """The line with our ENFORMER_* INFO keys taken out again."""
    fields = line.split(b"\t")
    fields[7] = b";".join(kv for kv in fields[7].split(b";") if not kv.startswith(b"ENFORMER_")) or b"."
    return b"\t".join(fields)


def test_bytes_that_are_not_utf8_travel_unchanged_into_the_annotated_vcf(tmp_path, fast_model):
    vcf, records = latin1_vcf(tmp_path)
    result = CliRunner().invoke(cli, [str(vcf), "--fasta", str(BUG_REPORTS / "ref.fa"), "--model", str(fast_model),
                                      "--device", "cpu", "--no-progress", "-o", str(tmp_path / "out"),
                                      "--vcf-out", str(tmp_path / "annotated.vcf.gz")])
    assert result.exit_code == 0, result.output
    lines = body_lines(tmp_path / "annotated.vcf.gz")
    assert [without_ours(line) for line in lines] == records
    assert all(b"ENFORMER_CAGE_SAD=" in line for line in lines)
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name.split(".")]


def test_merge_keeps_the_bytes_in_its_annotated_vcf(tmp_path, fast_model):
    vcf, records = latin1_vcf(tmp_path)
    for k in (1, 2):
        result = CliRunner().invoke(cli, [str(vcf), "--fasta", str(BUG_REPORTS / "ref.fa"), "--model",
                                          str(fast_model), "--device", "cpu", "--no-progress", "--checkpoint-every",
                                          "1", "--shard", f"{k}/2", "-o", str(tmp_path / f"s{k}")])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "-o", str(tmp_path / "m"),
                                      "--vcf-out", str(tmp_path / "m.vcf.gz")])
    assert result.exit_code == 0, result.output
    assert [without_ours(line) for line in body_lines(tmp_path / "m.vcf.gz")] == records


def test_annotated_vcf_header_records_the_provenance(annotated):
    header = VCF(str(annotated / "annotated.vcf.gz")).raw_header
    with h5py.File(annotated / "out" / "in.chr1.h5", "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f.attrs.items()}
    for key in ("enformer_vep_version", "model_sha256", "model_source", "fasta", "fasta_index_sha256", "options"):
        line = f"##{key if key.startswith('enformer_vep') else 'enformer_vep_' + key}={attrs[key]}\n"
        assert line in header, key
