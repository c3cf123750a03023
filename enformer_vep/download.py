"""Fetch Enformer weights: a resumable HTTP download into a user cache and safe SavedModel extraction."""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from .atomic import fix_directory_mode
from .errors import DownloadError, EnformerVepError, WeightsError

_SCHEMES = ("http", "https")
# Failures of the connection itself, as opposed to HTTP error statuses.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$")
_COPY_CHUNK = 1 << 20


class UnreachableError(DownloadError):
    """The server could not be reached (name resolution, refused connection, timeout...): no byte arrived."""


def cache_dir() -> Path:
    """The cache root: $ENFORMER_VEP_CACHE, else $XDG_CACHE_HOME/enformer-vep, else ~/.cache/enformer-vep."""
    root = os.environ.get("ENFORMER_VEP_CACHE")
    if root:
        path = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        # The XDG spec says a relative value is invalid and must be ignored.
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
        path = base / "enformer-vep"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EnformerVepError(f"cannot create cache directory {path}: {_one_line(e)}") from e
    return path


def fetch(url: str, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Return the cached copy of `url` under cache_dir()/downloads, downloading (or resuming) it if needed."""
    _check_scheme(url)
    dest = cache_dir() / "downloads" / _cache_name(url)
    if dest.is_file():
        return dest
    return download(url, dest, progress=progress, timeout=timeout)


def download(
    url: str, dest: Path, *, progress: bool = True, chunk_size: int = 1 << 20, timeout: float = 60.0
) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming an existing .part with a Range request.

    `dest` only appears once the whole file arrived (and matched the announced size, if any).
    Raises DownloadError (UnreachableError when the server cannot be reached); when a transfer breaks
    after some bytes arrived, the .part is kept so that running again resumes, and the message says so.
    """
    _check_scheme(url)
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A second attempt happens only after the server made the old .part unusable, and starts from zero.
    for _ in range(2):
        offset = part.stat().st_size if part.is_file() else 0
        if _transfer(url, part, offset, progress=progress, chunk_size=chunk_size, timeout=timeout):
            os.replace(part, dest)
            return dest
        part.unlink(missing_ok=True)
    raise DownloadError(f"cannot download {url}: the server answers range requests inconsistently")


def extract_savedmodel(archive: Path, dest_dir: Path) -> Path:
    """Extract the TF SavedModel in a .tar(.gz) `archive` into `dest_dir` and return `dest_dir`.

    Every member is checked before anything is written (no absolute or `..` paths, links or special
    files), the whole compressed stream is read so that a bad checksum is caught, and only
    saved_model.pb and variables/* are written, into a temporary directory renamed to `dest_dir`.
    Raises WeightsError.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise _unreadable(archive, e) from e
    with tar:
        try:
            members = tar.getmembers()
            # tarfile stops at the end-of-archive marker; the gzip CRC and length sit after it.
            while tar.fileobj.read(_COPY_CHUNK):
                pass
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise _unreadable(archive, e) from e
        selected = _savedmodel_members(archive, members)
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.tmp-", dir=dest_dir.parent))
        try:
            fix_directory_mode(tmp)  # mkdtemp makes it 0700: a shared cache must stay readable
            for member, rel in selected:
                target = tmp.joinpath(*rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with tar.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, _COPY_CHUNK)
                        os.fsync(out.fileno())
                except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                    raise WeightsError(f"cannot extract {member.name!r} from {archive}: {_one_line(e)}") from e
            _move_into_place(tmp, dest_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest_dir


def _transfer(url: str, part: Path, offset: int, *, progress: bool, chunk_size: int, timeout: float) -> bool:
    """Bring `part` (holding `offset` bytes) up to date; True when complete, False when it must be discarded."""
    headers = {"User-Agent": "enformer-vep", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    redirects = _HttpOnlyRedirects()
    opener = urllib.request.build_opener(redirects)
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and offset:
                # Our .part is at least as long as the file: complete only if the server says how long that is.
                return _content_range(e.headers.get("Content-Range"))[1] == offset
            raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except _NETWORK_ERRORS as e:
        raise _unreachable(url, redirects.target or url, part, e) from e
    with resp:
        length = _header_int(resp.headers.get("Content-Length"))
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                return False
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        elif resp.status == 200:
            offset, total, mode = 0, length, "wb"
        else:
            raise DownloadError(f"cannot download {url}: unexpected HTTP status {resp.status}")
        size = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=part.name.removesuffix(".part"), disable=not progress)
        with bar, open(part, mode) as f:
            while True:
                try:
                    chunk = resp.read(chunk_size)
                except _NETWORK_ERRORS as e:
                    raise _interrupted(url, part, e) from e
                if not chunk:
                    break
                f.write(chunk)
                size += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and size < total:
        raise _interrupted(url, part, f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        part.unlink()
        raise DownloadError(f"cannot download {url}: received {size} bytes but the server announced {total}; "
                            "partial file discarded")
    return True


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but only to http(s): urllib would also follow one to ftp://. `target` is the
    last URL redirected to (None without redirects), so that errors name the host that failed."""

    def __init__(self):
        super().__init__()
        self.target: str | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in _SCHEMES:
            raise DownloadError(f"cannot download {req.full_url}: it redirects to non-HTTP URL {newurl}")
        request = super().redirect_request(req, fp, code, msg, headers, newurl)
        if request is not None:
            self.target = request.full_url
        return request


def _check_scheme(url: str) -> None:
    if urllib.parse.urlsplit(url).scheme.lower() not in _SCHEMES:
        raise DownloadError(f"cannot download {url}: only http:// and https:// URLs are supported")


def _cache_name(url: str) -> str:
    """A file name unique to `url` (hash prefix) that stays recognisable (sanitised basename suffix)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    base = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    suffix = re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:64].strip("._")
    return f"{digest}-{suffix or 'download'}"


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None where absent or unknown."""
    m = _CONTENT_RANGE.match((value or "").strip())
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _header_int(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _kept(part: Path) -> int:
    """Bytes in `part`; an empty `part` is removed (nothing to resume, nothing to mention)."""
    try:
        size = part.stat().st_size
    except OSError:
        return 0
    if size == 0:
        part.unlink(missing_ok=True)
    return size


def _unreachable(url: str, target: str, part: Path, reason: BaseException) -> DownloadError:
    """No response from the server: name resolution, connection or the request itself failed."""
    host = urllib.parse.urlsplit(target).hostname or target
    redirected = f" (it redirected to {target})" if target != url else ""
    cause = reason.reason if isinstance(reason, urllib.error.URLError) else reason
    # "Name or service not known" rather than "[Errno -2] Name or service not known"
    detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else _one_line(reason)
    if isinstance(cause, http.client.HTTPException):
        what = f"{host} sent no HTTP answer ({detail})"
    else:
        what = f"{host} could not be reached ({detail})"
    kept = _kept(part)
    if kept:  # a .part from an earlier, broken transfer: it stays for the next attempt
        return UnreachableError(f"cannot download {url}{redirected}: {what}; the first {kept} bytes, "
                                f"from an earlier attempt, are kept in {part}: run again to resume")
    return UnreachableError(f"cannot download {url}{redirected}: {what}")


def _interrupted(url: str, part: Path, reason: object) -> DownloadError:
    """The transfer broke after the server answered: keep what arrived, if anything, for a resume."""
    kept = _kept(part)
    if not kept:
        return DownloadError(f"cannot download {url}: the connection broke before any data arrived "
                             f"({_one_line(reason)}); run again to retry")
    return DownloadError(f"download of {url} interrupted ({_one_line(reason)}); the first {kept} bytes "
                         f"are kept in {part}: run again to resume")


def _unreadable(archive: Path, error: BaseException) -> WeightsError:
    return WeightsError(f"cannot read weights archive {archive} (corrupt, truncated or not a tar file): "
                        f"{_one_line(error)}")


def _one_line(reason: object) -> str:
    if isinstance(reason, urllib.error.URLError) and not isinstance(reason, urllib.error.HTTPError):
        reason = reason.reason
    text = " ".join(str(reason).split()) or type(reason).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _savedmodel_members(archive: Path, members: list[tarfile.TarInfo]) -> list[tuple[tarfile.TarInfo, tuple]]:
    """Check that every member is safe, then pick the SavedModel files with their paths relative to its root."""
    parts = [_member_parts(archive, m) for m in members]
    roots = {p[:-2] for m, p in zip(members, parts, strict=True)
             if m.isreg() and p[-2:] == ("variables", "variables.index")}
    if not roots:
        raise WeightsError(f"{archive} holds no TensorFlow SavedModel (no variables/variables.index member)")
    if len(roots) > 1:
        found = ", ".join(sorted("/".join(r) or "." for r in roots))
        raise WeightsError(f"{archive} holds several SavedModels ({found}); expected one")
    (root,) = roots
    n = len(root)
    return [
        (m, p[n:]) for m, p in zip(members, parts, strict=True)
        if m.isreg() and p[:n] == root and (p[n:] == ("saved_model.pb",) or (len(p) > n + 1 and p[n] == "variables"))
    ]


def _member_parts(archive: Path, member: tarfile.TarInfo) -> tuple[str, ...]:
    """The path components of a member, refusing anything that could write outside the target directory."""
    name = member.name
    parts = tuple(p for p in re.split(r"[/\\]", name) if p not in ("", "."))
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in parts:
        raise WeightsError(f"unsafe member {name!r} in {archive}: its path leaves the extraction directory")
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise WeightsError(f"unsafe member {name!r} in {archive}: {kind} link to {member.linkname!r}")
    if not (member.isreg() or member.isdir()):
        raise WeightsError(f"unsafe member {name!r} in {archive}: device, FIFO or other special file")
    return parts


def _move_into_place(tmp: Path, dest_dir: Path) -> None:
    """Rename `tmp` to `dest_dir`; an existing `dest_dir` is renamed aside first so it is never half-deleted."""
    old = None
    if dest_dir.exists():
        old = tmp.with_name(tmp.name + "-old")
        os.replace(dest_dir, old)
    os.replace(tmp, dest_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
