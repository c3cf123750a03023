"""Tests for enformer_vep.download against a local HTTP server (127.0.0.1 only)."""
import hashlib
import io
import os
import random
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from enformer_vep.cli import cli
from enformer_vep.download import UnreachableError, cache_dir, download, extract_savedmodel, fetch
from enformer_vep.errors import DownloadError, WeightsError

DATA_NAME = "variables/variables.data-00000-of-00001"
MODEL_FILES = {
    "saved_model.pb": random.Random(1).randbytes(700),
    "variables/variables.index": random.Random(2).randbytes(300),
    # Random bytes do not compress, so the gzip body is mostly this file: a flipped byte lands in it.
    DATA_NAME: random.Random(3).randbytes(48 * 1024),
}
TIMEOUT = 5


def make_tar(files, *, prefix="", mode="w:gz", extra=()):
    """Archive bytes holding `files` (name -> bytes) under `prefix`, then the raw TarInfo/data pairs in `extra`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        dirs = sorted({name.rsplit("/", 1)[0] for name in files if "/" in name})
        for d in ([prefix.rstrip("/")] if prefix else []) + [prefix + d for d in dirs]:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


PAYLOAD = make_tar(MODEL_FILES)


class _State:
    def __init__(self):
        self.requests = []  # (path, Range header or None)
        self.ignore_range = False
        self.cut_after = None  # cut the next body after this many bytes


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass  # keep the test output clean

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        state = self.server.state
        range_header = self.headers.get("Range")
        state.requests.append((self.path, range_header))
        if self.path == "/redirect":
            return self._redirect("/model.tar.gz")
        if self.path == "/redirect-ftp":
            return self._redirect("ftp://127.0.0.1/model.tar.gz")
        if self.path != "/model.tar.gz":
            return self.send_error(404)
        body = PAYLOAD
        m = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if m and not state.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.cut_after is not None:
            cut, state.cut_after = state.cut_after, None
            self.wfile.write(body[:cut])
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Keep the real cache untouched and stop a configured proxy from intercepting 127.0.0.1."""
    monkeypatch.setenv("ENFORMER_VEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def server(request):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = _State()
    httpd.state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.state.url = httpd.state.base + "/model.tar.gz"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop():
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=TIMEOUT)

    request.addfinalizer(stop)
    return httpd.state


def files_under(root):
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}


def test_fetch_downloads_once_then_uses_cache(server, tmp_path):
    path = fetch(server.url, timeout=TIMEOUT)
    assert path.read_bytes() == PAYLOAD
    assert path.parent == tmp_path / "cache" / "downloads"
    assert path.name == hashlib.sha256(server.url.encode()).hexdigest()[:16] + "-model.tar.gz"
    assert server.requests == [("/model.tar.gz", None)]
    assert fetch(server.url, progress=False, timeout=TIMEOUT) == path
    assert len(server.requests) == 1


def test_interrupted_transfer_resumes_with_range(server):
    cut = len(PAYLOAD) // 2
    server.cut_after = cut
    with pytest.raises(DownloadError) as exc:
        fetch(server.url, progress=False, timeout=TIMEOUT)
    message = str(exc.value)
    assert server.url in message and "run again" in message and "\n" not in message
    (part,) = (cache_dir() / "downloads").glob("*.part")
    assert part.read_bytes() == PAYLOAD[:cut]

    path = fetch(server.url, progress=False, timeout=TIMEOUT)
    assert server.requests[-1] == ("/model.tar.gz", f"bytes={cut}-")
    assert path.read_bytes() == PAYLOAD
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "model.tar.gz"
    (tmp_path / "model.tar.gz.part").write_bytes(b"x" * 1000)  # would corrupt the result if appended to
    server.ignore_range = True
    assert download(server.url, dest, progress=False, timeout=TIMEOUT) == dest
    assert server.requests == [("/model.tar.gz", "bytes=1000-")]
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "model.tar.gz.part").exists()


def test_416_on_complete_part_finishes_without_data(server, tmp_path):
    dest = tmp_path / "model.tar.gz"
    (tmp_path / "model.tar.gz.part").write_bytes(PAYLOAD)
    download(server.url, dest, progress=False, timeout=TIMEOUT)
    assert server.requests == [("/model.tar.gz", f"bytes={len(PAYLOAD)}-")]
    assert dest.read_bytes() == PAYLOAD


def test_416_on_overlong_part_restarts(server, tmp_path):
    dest = tmp_path / "model.tar.gz"
    (tmp_path / "model.tar.gz.part").write_bytes(PAYLOAD + b"junk")
    download(server.url, dest, progress=False, timeout=TIMEOUT)
    assert server.requests == [("/model.tar.gz", f"bytes={len(PAYLOAD) + 4}-"), ("/model.tar.gz", None)]
    assert dest.read_bytes() == PAYLOAD


def test_redirect_is_followed(server):
    assert fetch(server.base + "/redirect", progress=False, timeout=TIMEOUT).read_bytes() == PAYLOAD
    assert [path for path, _ in server.requests] == ["/redirect", "/model.tar.gz"]


def test_redirect_to_non_http_is_refused(server):
    with pytest.raises(DownloadError, match="redirects to non-HTTP URL ftp://"):
        fetch(server.base + "/redirect-ftp", progress=False, timeout=TIMEOUT)


def test_404_names_the_url(server, tmp_path):
    url = server.base + "/missing.tar.gz"
    with pytest.raises(DownloadError, match=re.escape(url) + ".*404"):
        download(url, tmp_path / "x", progress=False, timeout=TIMEOUT)
    assert files_under(tmp_path) == set()


def closed_port():
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_says_the_host_could_not_be_reached(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/model.tar.gz"
    with pytest.raises(UnreachableError, match=re.escape(url) + ": 127.0.0.1 could not be reached") as exc:
        download(url, tmp_path / "x", progress=False, timeout=TIMEOUT)
    assert ".part" not in str(exc.value) and "resume" not in str(exc.value)  # no byte came: nothing kept
    assert files_under(tmp_path) == set()


def test_unreachable_with_an_earlier_part_says_it_is_kept(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/model.tar.gz"
    part = tmp_path / "x.part"
    part.write_bytes(PAYLOAD[:1000])  # from an earlier, broken transfer
    with pytest.raises(UnreachableError, match="could not be reached") as exc:
        download(url, tmp_path / "x", progress=False, timeout=TIMEOUT)
    assert f"first 1000 bytes, from an earlier attempt, are kept in {part}: run again to resume" in str(exc.value)
    assert part.read_bytes() == PAYLOAD[:1000]


def cli_error(args):
    """The one `Error:` line the command printed, last (exit status 1; a progress bar may come before)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()  # the bar redraws itself with \r
    assert [line for line in lines if "Error" in line] == lines[-1:], result.output
    assert lines[-1].startswith("Error: "), result.output
    return lines[-1]


def test_unresolvable_host_through_the_cli(tmp_path):
    """No network needed: `.invalid` never resolves (RFC 2606)."""
    url = "http://nonexistent.invalid/model.tar.gz"
    message = cli_error(["convert", url, tmp_path / "out.safetensors"])
    assert f"cannot download {url}: nonexistent.invalid could not be reached (" in message
    assert "offline? pass a local copy instead: --model PATH or ENFORMER_VEP_MODEL=PATH" in message
    assert ".part" not in message and "resume" not in message and "interrupted" not in message
    assert not list((tmp_path / "cache").rglob("*.part"))
    assert not (tmp_path / "out.safetensors").exists()


def test_transfer_broken_midway_through_the_cli_keeps_the_part(server, tmp_path):
    cut = len(PAYLOAD) // 3
    server.cut_after = cut
    message = cli_error(["convert", server.url, tmp_path / "out.safetensors"])
    (part,) = (cache_dir() / "downloads").glob("*.part")
    assert part.read_bytes() == PAYLOAD[:cut]
    assert f"download of {server.url} interrupted (" in message
    assert f"the first {cut} bytes are kept in {part}: run again to resume" in message
    assert "offline?" not in message and "could not be reached" not in message
    assert "or pass a local copy instead: --model PATH" in message


def test_transfer_broken_before_any_byte_keeps_no_part(server, tmp_path):
    server.cut_after = 0  # headers, then the connection closes
    with pytest.raises(DownloadError, match="before any data arrived") as exc:
        download(server.url, tmp_path / "x", progress=False, timeout=TIMEOUT)
    assert not isinstance(exc.value, UnreachableError)
    assert ".part" not in str(exc.value) and "resume" not in str(exc.value)
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/model.tar.gz", "model.tar.gz"])
def test_non_http_scheme_is_refused(url, tmp_path):
    with pytest.raises(DownloadError, match="only http"):
        fetch(url)
    with pytest.raises(DownloadError, match="only http"):
        download(url, tmp_path / "x")
    assert not (tmp_path / "cache" / "downloads").exists()
    assert not (tmp_path / "x").exists()


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ENFORMER_VEP_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    assert cache_dir().is_dir()
    monkeypatch.delenv("ENFORMER_VEP_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "enformer-vep"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == tmp_path / "home" / ".cache" / "enformer-vep"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "enformer-vep"
    assert cache_dir().is_dir()


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return os.stat(path).st_mode & 0o777


def test_cache_respects_the_umask(server, tmp_path, monkeypatch, umask):
    """Files and directories of the cache get what `open(..., "w")` and `mkdir` give: a lab-shared
    cache stays readable by colleagues under umask 022, private under 077."""
    monkeypatch.setenv("ENFORMER_VEP_CACHE", str(tmp_path / "shared" / "cache"))
    archive = fetch(server.url, progress=False, timeout=TIMEOUT)
    extracted = extract_savedmodel(archive, cache_dir() / "savedmodels" / "abc")
    dirs = [tmp_path / "shared", cache_dir(), archive.parent, extracted.parent, extracted, extracted / "variables"]
    assert {d.name: mode(d) for d in dirs} == {d.name: 0o777 & ~umask for d in dirs}
    files = [archive, extracted / "saved_model.pb", extracted / DATA_NAME]
    assert {f.name: mode(f) for f in files} == {f.name: 0o666 & ~umask for f in files}


@pytest.mark.parametrize("mode", ["w:gz", "w"])
@pytest.mark.parametrize("prefix", ["", "./", "enformer_1/"])
def test_extract_good_archive(tmp_path, prefix, mode):
    archive = tmp_path / "src" / "model.tar"
    archive.parent.mkdir()
    extras = {"assets/vocab.txt": b"ignored", "fingerprint.pb": b"ignored"}
    archive.write_bytes(make_tar({**MODEL_FILES, **extras}, prefix=prefix, mode=mode))
    dest = tmp_path / "out" / "model"
    for _ in range(2):  # the second run replaces the first extraction
        assert extract_savedmodel(archive, dest) == dest
        assert files_under(dest) == set(MODEL_FILES)
        for name, data in MODEL_FILES.items():
            assert (dest / name).read_bytes() == data
        assert list(dest.parent.iterdir()) == [dest]  # no temporary directory left behind


def corrupt_flip(payload):
    data = bytearray(payload)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(corrupt_flip(PAYLOAD), id="flipped-byte"),
        pytest.param(PAYLOAD[: len(PAYLOAD) // 2], id="truncated-half"),
        pytest.param(PAYLOAD[:-4], id="truncated-trailer"),
        pytest.param(random.Random(4).randbytes(5000), id="not-a-tar"),
    ],
)
def test_extract_corrupt_archive(tmp_path, payload):
    archive = tmp_path / "src" / "model.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(payload)
    with pytest.raises(WeightsError, match="cannot read weights archive .*model.tar.gz"):
        extract_savedmodel(archive, tmp_path / "out" / "model")
    assert files_under(tmp_path) == {"src/model.tar.gz"}


def test_extract_without_variables_index(tmp_path):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(make_tar({k: v for k, v in MODEL_FILES.items() if k != "variables/variables.index"}))
    with pytest.raises(WeightsError, match="no variables/variables.index"):
        extract_savedmodel(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def special_member(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "name, kind, linkname, reason",
    [
        ("../evil", tarfile.REGTYPE, "", "leaves the extraction directory"),
        ("variables/../../evil", tarfile.REGTYPE, "", "leaves the extraction directory"),
        ("{tmp}/abs/path", tarfile.REGTYPE, "", "leaves the extraction directory"),
        ("variables/link", tarfile.SYMTYPE, "/etc/passwd", "symbolic link to '/etc/passwd'"),
        ("variables/hard", tarfile.LNKTYPE, "{tmp}/evil", "hard link"),
        ("variables/fifo", tarfile.FIFOTYPE, "", "special file"),
    ],
)
def test_extract_rejects_unsafe_members(tmp_path, name, kind, linkname, reason):
    name, linkname = name.format(tmp=tmp_path), linkname.format(tmp=tmp_path)
    info = special_member(name, kind, linkname)
    data = b"evil" if kind == tarfile.REGTYPE else b""
    info.size = len(data)
    archive = tmp_path / "src" / "model.tar.gz"
    archive.parent.mkdir()
    # The unsafe member comes last: rejecting it must not leave the earlier, valid files extracted.
    archive.write_bytes(make_tar(MODEL_FILES, extra=[(info, data)]))
    dest = tmp_path / "out" / "model"
    with pytest.raises(WeightsError, match=re.escape(repr(name)) + ".*" + re.escape(reason)):
        extract_savedmodel(archive, dest)
    for target in (tmp_path / "out" / "evil", tmp_path / "evil", tmp_path / "abs" / "path", dest):
        assert not target.exists() and not target.is_symlink()
    assert files_under(tmp_path) == {"src/model.tar.gz"}
