"""bgzip compression and indexes through pysam (htslib), written atomically: our tabix-indexed
outputs, and ``enformer-score index`` for a user's VCF, BCF or FASTA (a pip install brings no
``bgzip``, ``tabix``, ``bcftools`` or ``samtools``)."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

from .atomic import atomic_path
from .errors import InputError


def bgzip_and_index(plain: str | Path, dest: str | Path, *, preset: str | None = None, seq_col: int = 0,
                    start_col: int = 1, end_col: int = 1) -> Path:
    """Compress the sorted text file ``plain`` into ``dest`` (bgzip) with its ``dest.tbi`` index, then
    delete ``plain``. ``preset='vcf'`` for VCF; otherwise 0-based column numbers of contig, start and
    end, 1-based inclusive coordinates, '#' lines as header. Both files appear only when complete."""
    import pysam

    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp.gz")
    pysam.tabix_compress(str(plain), str(tmp), force=True)
    if preset:
        pysam.tabix_index(str(tmp), preset=preset, force=True)
    else:
        pysam.tabix_index(str(tmp), seq_col=seq_col, start_col=start_col, end_col=end_col, meta_char="#",
                          zerobased=False, force=True)
    os.replace(f"{tmp}.tbi", f"{dest}.tbi")
    os.replace(tmp, dest)
    Path(plain).unlink()
    return dest


def index_input(path: str | Path) -> list[Path]:
    """Make ``path`` usable with regions and fast reads, as the rest of the package expects:

    - a plain VCF: ``PATH.gz`` (bgzip) and ``PATH.gz.tbi`` (the original is kept);
    - a VCF.gz: its ``.tbi`` (rebuilt); one compressed with plain gzip is first recompressed
      with bgzip in place;
    - a BCF: its ``.csi`` (rebuilt);
    - a FASTA (plain, gzip or bgzip): its ``.fai`` (and ``.gzi``) rebuilt; plain gzip recompressed
      with bgzip in place.

    Returns the files written. Raises :class:`InputError` for anything else or a file htslib
    cannot read."""
    import pysam
    import pysam.bcftools

    from .genome import Genome
    from .variants import _sniff

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    kind = _sniff(str(path))
    with (gzip.open if kind != "plain" else open)(path, "rb") as f:
        head = f.read(16)
    try:
        if head.startswith(b">"):  # FASTA
            if kind == "gzip":
                _recompress(path)
            for index in (Path(f"{path}.fai"), Path(f"{path}.gzi")):
                index.unlink(missing_ok=True)
            Genome(path).close()  # builds and checks the indexes
            return [p for p in (Path(f"{path}.gzi"), Path(f"{path}.fai")) if p.is_file()]
        if not (head.startswith(b"##fileformat=VCF") or head.startswith(b"BCF")):
            raise InputError(f"{path} is neither a VCF, a BCF nor a FASTA")
        if kind == "plain":
            dest = path.with_name(path.name + ".gz")
            with atomic_path(dest) as tmp:
                pysam.tabix_compress(str(path), str(tmp), force=True)
            path = dest
        elif kind == "gzip":
            _recompress(path)
        if head.startswith(b"BCF"):
            with atomic_path(f"{path}.csi") as tmp:
                pysam.bcftools.index("-f", "-o", str(tmp), str(path), catch_stdout=False)
            return [path, Path(f"{path}.csi")]
        with atomic_path(f"{path}.tbi") as tmp:
            pysam.tabix_index(str(path), preset="vcf", force=True, index=str(tmp))
        return [path, Path(f"{path}.tbi")]
    except (OSError, ValueError, pysam.utils.SamtoolsError) as error:
        # htslib's failures to read reach us as an OSError without errno or message
        why = "htslib could not read it to the end (truncated or corrupt?)" if (
            isinstance(error, OSError) and error.strerror is None) else error
        raise InputError(f"cannot index {path}: {why}") from None


def _recompress(path: Path) -> None:
    """Replace a plain-gzip file by the same bytes in BGZF blocks (atomically)."""
    import pysam

    with atomic_path(path) as tmp:
        plain = tmp.with_name(tmp.name + ".plain")
        try:
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            pysam.tabix_compress(str(plain), str(tmp), force=True)
        finally:
            plain.unlink(missing_ok=True)
