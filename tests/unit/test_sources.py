"""server.inputs.data_uris.read_source: data URIs, local paths and http(s) URLs (a local test server)."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server.inputs import data_uris as sources
from server.inputs.data_uris import SourceError, read_data_uri, read_source

PAYLOAD = bytes(range(256)) * 4  # 1024 bytes, every byte value


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/payload":
            self._send(200, PAYLOAD)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/payload")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith("/size/"):
            self._send(200, b"a" * int(self.path.rsplit("/", 1)[1]))
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def http_base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------
# data URIs


def test_data_uri_base64():
    uri = "data:application/octet-stream;base64," + base64.b64encode(PAYLOAD).decode()
    assert read_source(uri) == PAYLOAD
    assert read_data_uri(uri) == PAYLOAD


def test_data_uri_base64_png_mime():
    assert read_source("data:image/png;base64,aGVsbG8=") == b"hello"


def test_data_uri_base64_without_mime():
    assert read_source("data:;base64,aGVsbG8gd29ybGQ=") == b"hello world"


def test_data_uri_base64_empty_payload():
    assert read_source("data:image/png;base64,") == b""


def test_data_uri_percent_encoded():
    assert read_source("data:,hello%20world%21") == b"hello world!"
    assert read_source("data:text/plain;charset=utf-8,%00%FF%e2%82%ac") == b"\x00\xff\xe2\x82\xac"


def test_data_uri_plain_text():
    assert read_source("data:text/plain,abc") == b"abc"


def test_data_uri_is_not_read_as_a_file_even_when_local_is_refused():
    assert read_source("data:,x", allow_local=False) == b"x"


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png;base64",  # no comma
        "data:",
        "data:image/png;base64,aGVsbG8",  # bad padding
        "data:image/png;base64,@@@@",
        "data:image/png;base64,aGVs bG8=",  # whitespace
    ],
)
def test_malformed_data_uri(uri):
    with pytest.raises(SourceError):
        read_source(uri)


def test_source_error_is_a_value_error():
    assert issubclass(SourceError, ValueError)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 1000, 1001, 1002])
def test_data_uri_cap_is_exact_for_base64(size):
    uri = "data:image/png;base64," + base64.b64encode(bytes(size)).decode()
    assert sources.data_uri_min_bytes(uri) == size
    assert read_data_uri(uri, max_bytes=size) == bytes(size)
    if size:
        with pytest.raises(sources.DataUriTooLarge):
            read_data_uri(uri, max_bytes=size - 1)


def test_data_uri_over_the_cap_is_refused_before_decoding(monkeypatch):
    uri = "data:image/png;base64," + "A" * 4_000_000
    monkeypatch.setattr(sources.base64, "b64decode", lambda *a, **k: pytest.fail("decoded"))
    monkeypatch.setattr(sources, "unquote_to_bytes", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(sources.DataUriTooLarge, match="larger than 1000 bytes"):
        read_data_uri(uri, max_bytes=1000)
    with pytest.raises(sources.DataUriTooLarge):
        read_data_uri("data:," + "a" * 4000, max_bytes=1000)


def test_percent_encoded_data_uri_is_checked_after_decoding_too():
    assert read_data_uri("data:," + "%41" * 1000, max_bytes=1000) == b"A" * 1000
    with pytest.raises(sources.DataUriTooLarge):
        read_data_uri("data:," + "%41" * 999 + "ab", max_bytes=1000)


# ---------------------------------------------------------------------------------------------
# local paths


def test_local_file(tmp_path):
    path = tmp_path / "image.bin"
    path.write_bytes(PAYLOAD)
    assert read_source(str(path)) == PAYLOAD


def test_local_file_with_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.bin").write_bytes(b"tilde")
    assert read_source("~/x.bin") == b"tilde"


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(SourceError) as info:
        read_source(str(missing))
    assert str(missing) in str(info.value)


def test_directory_is_an_error(tmp_path):
    with pytest.raises(SourceError):
        read_source(str(tmp_path))


def test_local_refused_when_not_allowed(tmp_path):
    path = tmp_path / "image.bin"
    path.write_bytes(PAYLOAD)
    with pytest.raises(SourceError, match="only http"):
        read_source(str(path), allow_local=False)


# ---------------------------------------------------------------------------------------------
# http


def test_http_url(http_base):
    assert read_source(f"{http_base}/payload") == PAYLOAD
    assert read_source(f"{http_base}/payload", allow_local=False) == PAYLOAD


def test_http_redirect_is_followed(http_base):
    assert read_source(f"{http_base}/redirect") == PAYLOAD


def test_http_404(http_base):
    with pytest.raises(SourceError) as info:
        read_source(f"{http_base}/missing")
    assert "404" in str(info.value)


def test_http_connection_refused():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SourceError):
        read_source(f"http://127.0.0.1:{port}/x", timeout=5)


def test_http_body_over_cap(http_base, monkeypatch):
    monkeypatch.setattr(sources, "MAX_BYTES", 100)
    with pytest.raises(SourceError, match="larger than 100 bytes"):
        read_source(f"{http_base}/size/5000")


def test_http_body_at_cap_is_accepted(http_base, monkeypatch):
    monkeypatch.setattr(sources, "MAX_BYTES", 100)
    assert read_source(f"{http_base}/size/100") == b"a" * 100
    with pytest.raises(SourceError):
        read_source(f"{http_base}/size/101")
