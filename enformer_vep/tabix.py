"""bgzip-compressed, tabix-indexed text files (VCF, TSV), written atomically."""
from __future__ import annotations

import os
from pathlib import Path


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
