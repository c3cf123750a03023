"""Genes, TSS bins and gene-level statistics: by hand on a base-counting toy model, and annotation files."""
import gzip
import re
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from helpers import DATA, GENE_RUN_TRACKS, GENE_RUN_TYPES, InMemoryContig
from toy_models import BaseCounter

from enformer_vep.errors import InputError
from enformer_vep.genes import Gene, GeneAnnotation, allele_gene_bins, read_annotation
from enformer_vep.scoring import VariantScorer
from enformer_vep.weights import load_model

GIAB = DATA / "grch38_chr1_giab_hg002"
GENCODE = DATA / "annotation" / "gencode.chr1_1-900000.gtf.gz"

POS = 200_000  # a variant at 1-based POS: output bin 0 starts at genome 142,656 (0-based), bin 895 ends at 257,344
BIN0 = POS - 57_344


def annotation(*genes):
    """``(gene_id, strand, [TSS 0-based positions])`` on contig ``c``."""
    pairs = sorted((p, i) for i, (_, _, tss) in enumerate(genes) for p in tss)
    return GeneAnnotation("hand", [Gene(g, g.lower(), "protein_coding", s) for g, s, _ in genes],
                          {"c": (np.array([p for p, _ in pairs], np.int64), np.array([i for _, i in pairs], np.int32))})


HAND = annotation(
    ("A", "+", [POS - 1 + 1_000]),  # bin (1,000 + 57,343) // 128 = 455
    ("B", "-", [190_000, BIN0 + 128 * 500]),  # bins 369 and 500 (the first base of bin 500: a bin border)
    ("C", "+", [BIN0 - 1]),  # one base before bin 0: outside the window
    ("D", "+", [BIN0]),  # bin 0: its left neighbour is cut
    ("E", "-", [BIN0 + 896 * 128 - 1, BIN0 + 896 * 128]),  # bin 895, and one base past the window
    ("F", "+", [BIN0 + 128 * 460 + 5]),  # 5 bp into bin 460
)


def by_gene(pairs):
    return {HAND.genes[p.gene].gene_id: p for p in pairs}


def test_tss_bins_by_hand():
    genes = by_gene(allele_gene_bins(HAND, "c", POS, 1, 1))
    assert list(genes) == ["D", "B", "A", "F", "E"]  # by first TSS in the window; C lies outside it
    assert genes["A"].ref_bins == genes["A"].alt_bins == (454, 455, 456)
    assert genes["A"].tss_distance == 1_000 and genes["A"].n_tss == 1
    assert genes["B"].ref_bins == (368, 369, 370, 499, 500, 501) and genes["B"].n_tss == 2
    # minus strand: from the variant (199,999) to the TSS along transcription = variant - TSS; nearest wins
    assert genes["B"].tss_distance == 199_999 - (BIN0 + 128 * 500)
    assert genes["D"].ref_bins == (0, 1)
    assert genes["E"].ref_bins == (894, 895) and genes["E"].n_tss == 1
    assert allele_gene_bins(HAND, "c", POS, 1, 1, tss_bins=1)[0].ref_bins == (0,)
    assert by_gene(allele_gene_bins(HAND, "c", POS, 1, 1, tss_bins=5))["A"].ref_bins == (453, 454, 455, 456, 457)


def test_an_indel_moves_the_tss_to_its_right():
    """Deleting 10 bp moves F's TSS (5 bp into bin 460) into bin 459 of the alternative; inserting 200
    moves it to 461 (77 bp in); TSSs left of the variant stay."""
    deletion = by_gene(allele_gene_bins(HAND, "c", POS, 11, 1))
    assert deletion["F"].ref_bins == (459, 460, 461) and deletion["F"].alt_bins == (458, 459, 460)
    assert deletion["B"].alt_bins[:3] == (368, 369, 370)
    insertion = by_gene(allele_gene_bins(HAND, "c", POS, 1, 201))
    assert insertion["F"].alt_bins == (460, 461, 462)


def counts(text: bytes, bins) -> np.ndarray:
    """Bases A, C, G, T in the output bins ``bins`` of a 393,216-bp window's text (bin k = window
    [139,264 + 128 k, 139,392 + 128 k))."""
    chosen = b"".join(text[139_264 + 128 * k:139_392 + 128 * k] for k in bins)
    return np.array([chosen.count(b) for b in b"ACGT"], np.float64)


@pytest.mark.parametrize("ref_length, alt", [(1, "G"), (11, "A"), (1, "A" + "C" * 200)])
def test_gene_statistics_on_a_base_counter(ref_length, alt):
    """SED and logSED from the toy model's base counts equal counts of the bases in the TSS bins of the
    reference and alternative windows, written out here by hand."""
    rng = np.random.default_rng(3)
    codes = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, 420_000)].copy()
    genome = InMemoryContig(codes)
    ref = codes[POS - 1:POS - 1 + ref_length].tobytes().decode()
    if alt == "G" and ref == "G":
        alt = "T"
    allele = SimpleNamespace(fasta_chrom="c", pos=POS, ref=ref, alt=alt)
    pairs = allele_gene_bins(HAND, "c", POS, len(ref), len(alt))
    scorer = VariantScorer(BaseCounter(), stats=["SAD"], batch_size=2)
    got = scorer.score_block(genome, [allele, allele], genes=[pairs, pairs[:2]])
    assert got["SED"].shape == (len(pairs) + 2, 4) and got["logSED"].shape == (len(pairs) + 2, 4)
    text = codes.tobytes()
    window = text[POS - 196_608:POS + 196_608]
    alt_window = (text[POS - 196_608:POS - 1] + alt.encode() + text[POS - 1 + len(ref):])[:393_216]
    for row, pair in enumerate(pairs + pairs[:2]):
        r, a = counts(window, pair.ref_bins), counts(alt_window, pair.alt_bins)
        # sums of base counts are exact in float32 (measured 0); float32 log2 of counts up to 384 (an ulp of
        # log2(385) ~ 8.6 is 9.5e-7): measured 2.9e-6
        np.testing.assert_array_equal(got["SED"][row], a - r)
        np.testing.assert_allclose(got["logSED"][row], np.log2(a + 1) - np.log2(r + 1), atol=1e-5)


GTF = """\
#!comment
chr1\tT\tgene\t1001\t5000\t.\t+\t.\tgene_id "G1"; gene_name "ONE"; gene_type "protein_coding";
chr1\tT\ttranscript\t1001\t5000\t.\t+\t.\tgene_id "G1"; transcript_id "T1"; gene_name "ONE"; gene_type "protein_coding";
chr1\tT\texon\t1001\t1200\t.\t+\t.\tgene_id "G1"; transcript_id "T1"; gene_name "ONE"; gene_type "protein_coding";
chr1\tT\ttranscript\t1501\t5000\t.\t+\t.\tgene_id "G1"; transcript_id "T2"; gene_name "ONE"; gene_type "protein_coding";
chr1\tT\ttranscript\t2001\t9000\t.\t-\t.\tgene_id "G2"; transcript_id "T3"; gene_name "TWO"; gene_type "lncRNA";
chrUn\tT\ttranscript\t1\t90\t.\t-\t.\tgene_id "G3"; transcript_id "T4"; gene_name "THREE"; gene_type "lncRNA";
"""


def test_a_gtf_gives_transcript_five_prime_ends(tmp_path):
    """Plain and gzip; Ensembl contig names ('1') for a UCSC-named FASTA; minus strand TSS = the end;
    a contig the FASTA lacks is left out; --gene-types filters."""
    plain = tmp_path / "a.gtf"
    plain.write_text(GTF.replace("chr1\t", "1\t"))
    packed = tmp_path / "b.gtf.gz"
    packed.write_bytes(gzip.compress(GTF.encode()))
    for path in (plain, packed):
        found = read_annotation(path, {"chr1"})
        assert [g.gene_id for g in found.genes] == ["G1", "G2"]
        positions, genes = found.tss["chr1"]
        assert positions.tolist() == [1000, 1500, 8999] and genes.tolist() == [0, 0, 1]
        assert found.genes[1] == Gene("G2", "TWO", "lncRNA", "-")
    only = read_annotation(plain, {"chr1"}, gene_types={"lncRNA"})
    assert [g.gene_id for g in only.genes] == ["G2"]


def test_gff3_and_bed(tmp_path):
    gff = tmp_path / "a.gff3"
    gff.write_text("##gff-version 3\n"
                   "1\tE\tgene\t101\t900\t.\t-\t.\tID=gene:G1;gene_id=G1;Name=ONE;biotype=protein_coding\n"
                   "1\tE\tmRNA\t101\t800\t.\t-\t.\tID=transcript:T1;Parent=gene:G1\n"
                   "1\tE\texon\t101\t200\t.\t-\t.\tParent=transcript:T1\n"
                   "1\tE\tlnc_RNA\t150\t900\t.\t-\t.\tID=transcript:T2;Parent=gene:G1\n")
    found = read_annotation(gff, {"1"})
    assert found.genes == [Gene("G1", "ONE", "protein_coding", "-")]
    assert found.tss["1"][0].tolist() == [799, 899]
    bed = tmp_path / "tss.bed"
    bed.write_text("chr1\t10\t11\tX\t0\t+\nchr1\t50\t60\tY\t0\t-\nchr1\t70\t71\tX\t0\t+\n")
    found = read_annotation(bed, {"chr1"})
    assert [g.gene_id for g in found.genes] == ["X", "Y"] and found.tss["chr1"][0].tolist() == [10, 59, 70]


@pytest.mark.parametrize("text, message", [
    ("chr1\tT\ttranscript\tten\t20\t.\t+\t.\tgene_id \"G\";\n", "line 1: start and end"),
    ("chr1\tT\ttranscript\t10\t20\t.\t.\t.\tgene_id \"G\";\n", "line 1: strand"),
    ("chr1\tT\ttranscript\t10\n", "line 1: not a GTF line"),
    ("chr9\tT\ttranscript\t10\t20\t.\t+\t.\tgene_id \"G\";\n", "no TSS on the FASTA's contigs"),
])
def test_a_malformed_annotation_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "bad.gtf"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_annotation(path, {"chr1"})


def test_gencode_slice_and_giab_variants_against_a_per_gene_computation(gene_run, fast_model):
    """``enformer-score --genes`` on the real GENCODE slice ('chr1') with the GIAB variants ('chr1') and the
    Ensembl-named FASTA ('1') (conftest ``gene_run``), against this test's own reading of the GTF, windows
    cut from the FASTA text, the model called directly and the TSS bins summed here; and its ``--vcf-out``
    gene fields against the genes file."""
    out, tracks = gene_run, GENE_RUN_TRACKS

    transcripts = []  # (0-based TSS, gene_id, gene_name, gene_type, strand)
    for line in gzip.decompress(GENCODE.read_bytes()).decode().splitlines():
        fields = line.split("\t")
        if fields[2] == "transcript":
            attrs = dict(re.findall(r'(\w+) "([^"]*)"', fields[8]))
            tss = int(fields[3]) - 1 if fields[6] == "+" else int(fields[4]) - 1
            transcripts.append((tss, attrs["gene_id"], attrs["gene_name"], attrs["gene_type"], fields[6]))
    text = b"".join(GIAB.joinpath("reference.fa").read_bytes().split(b"\n")[1:])
    variants = [line.split("\t")[:5] for line in GIAB.joinpath("input.vcf").read_text().splitlines()
                if not line.startswith("#") and 840_000 <= int(line.split("\t")[1]) <= 851_000]
    model = load_model(fast_model)
    expected, left_out = {}, set()
    for si, (_, pos, _, ref, alt) in enumerate(variants):
        pos = int(pos)
        padded = b"N" * 196_608 + text + b"N" * 400_000
        window = padded[pos:pos + 393_216]  # genome [POS - 196,608, POS + 196,608)
        alt_window = (padded[pos:pos + 196_607] + alt.encode() + padded[pos + 196_607 + len(ref):])[:393_216]
        onehot = torch.from_numpy(np.stack([np.frombuffer(w, np.uint8)[:, None] == np.frombuffer(b"ACGT", np.uint8)
                                            for w in (window, alt_window)]).astype(np.float32))
        with torch.no_grad():
            ref_pred, alt_pred = model(onehot)["human"][:, :, tracks].double().numpy()
        genes = {}
        for tss, gene_id, name, kind, strand in transcripts:
            k = (tss - pos + 57_344) // 128
            if 0 <= k < 896:
                if kind in GENE_RUN_TYPES:
                    genes.setdefault((gene_id, name, kind, strand), []).append(tss)
                else:
                    left_out.add(kind)
        for (gene_id, name, kind, strand), starts in genes.items():
            starts = sorted(set(starts))
            ref_bins = {b for t in starts for b in range((t - pos + 57_344) // 128 - 1, (t - pos + 57_344) // 128 + 2)}
            moved = [t + len(alt) - len(ref) if t >= pos - 1 + len(ref) else t for t in starts]
            alt_bins = {b for t in moved for b in range((t - pos + 57_344) // 128 - 1, (t - pos + 57_344) // 128 + 2)}
            r = ref_pred[sorted(b for b in ref_bins if 0 <= b < 896)].sum(0)
            a = alt_pred[sorted(b for b in alt_bins if 0 <= b < 896)].sum(0)
            distance = min(((t - (pos - 1)) if strand == "+" else (pos - 1 - t) for t in starts),
                           key=lambda d: (abs(d), d))
            # two float32 passes (here one batch, there another) differ by rounding: measured 2e-7 of the sums
            # beyond the float16 storage's (half an ulp, <= 2^-11 of the value)
            noise = 1e-6 * np.abs(r).max()
            expected[si, gene_id] = (name, kind, strand, distance, len(starts), a - r, np.log2(a + 1) - np.log2(r + 1),
                                     noise, starts[0])
    assert left_out  # --gene-types had genes to leave out
    with h5py.File(out / "input.chr1.genes.h5", "r") as f:
        keys = list(zip(f["si"][:].tolist(), [g.decode() for g in f["gene_id"][:]], strict=True))
        assert sorted(keys) == sorted(expected) and len(variants) == 13
        assert keys == sorted(keys, key=lambda k: (k[0], expected[k][-1]))  # VCF order, then first TSS
        assert f["SED"].dtype == np.float16 and f["SED"].shape == (len(keys), len(tracks))
        assert f.attrs["annotation_sha256"] and f.attrs["tss_bins"] == 3
        for row, key in enumerate(keys):
            name, kind, strand, distance, n_tss, sed, log_sed, noise, _ = expected[key]
            assert (f["gene_name"][row].decode(), f["gene_type"][row].decode(), f["strand"][row].decode()) == \
                (name, kind, strand)
            assert (int(f["tss_distance"][row]), int(f["n_tss"][row])) == (distance, n_tss)
            np.testing.assert_allclose(f["SED"][row], sed, rtol=2**-11, atol=noise)
            np.testing.assert_allclose(f["logSED"][row], log_sed, rtol=2**-11, atol=noise)

    # --vcf-out: per allele, the gene of largest |logSED| over the CAGE tracks (the last column only)
    with h5py.File(out / "input.chr1.genes.h5", "r") as f:
        cage = [i for i, label in enumerate(f["target_labels"][:]) if label.startswith(b"CAGE")]
        assert cage == [len(tracks) - 1]
        log_sed = f["logSED"][:, cage].astype(np.float32)
        si, names = f["si"][:], [g.decode() for g in f["gene_name"][:]]
    strongest = {}
    for row in range(len(si)):
        column = np.abs(log_sed[row]).argmax()
        if si[row] not in strongest or abs(log_sed[row, column]) > abs(strongest[si[row]][1]):
            strongest[si[row]] = (names[row], log_sed[row, column])
    records = [line.split("\t") for line in gzip.decompress((out.parent / "annotated.vcf.gz").read_bytes()).decode()
               .splitlines() if not line.startswith("#")]
    assert len(records) == len(variants)
    for row, fields in enumerate(records):
        info = dict(item.split("=", 1) for item in fields[7].split(";") if "=" in item)
        name, value = strongest[row]
        assert info["ENFORMER_GENE"] == name
        # written with 4 significant digits: <= 5e-4 of the value; measured 4.3e-4
        assert float(info["ENFORMER_GENE_logSED"]) == pytest.approx(float(value), rel=1e-3, abs=1e-7)
