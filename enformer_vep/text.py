"""Text fields (IDs, contig names, INFO) as bytes that travel unchanged.

The VCF specification says UTF-8, but files in the wild hold Latin-1 and worse. Inside the
package such fields are ``str`` decoded as UTF-8 with ``surrogateescape`` (Python's PEP 383):
valid UTF-8 reads as the text it is, and every other byte becomes a lone surrogate that
:func:`to_bytes` turns back into the same byte. So what a VCF holds is what our HDF5 files,
``skipped.tsv`` and annotated VCFs hold, byte for byte.
"""
from __future__ import annotations


def from_bytes(data: bytes) -> str:
    """``data`` as text; bytes that are not UTF-8 survive as surrogates."""
    return data.decode("utf-8", "surrogateescape")


def to_bytes(text: str) -> bytes:
    """The bytes :func:`from_bytes` read (UTF-8 for ordinary text)."""
    return text.encode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """``text`` safe to print or log: bytes that are not UTF-8 shown as ``\\xNN``."""
    return to_bytes(text).decode("utf-8", "backslashreplace")
