"""The SSRF guard (server/fetch.py), without a server: URL shapes, address checks, allow-list, pinned connects.

Reliability cases S1, S2, S4, S5 and S17 at the unit level; tests/api/test_hostile_fetch.py runs them
through the real server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest

from server.inputs.url_guard import (
    NOT_ALLOWED,
    FetchError,
    FetchGuard,
    FetchRefused,
    FetchTimeout,
    GuardedBackend,
    GuardedTransport,
    embedded_ipv4,
    ip_literal,
    is_public,
    parse_allow_entry,
)
from server.settings import SettingsError, load_settings
from tests.compat.certs import make_tls_files
from tests.hostile_http import StubResolver


def refused(guard: FetchGuard, url: str) -> str | None:
    """The refusal's message, or None when ``url`` passes the guard."""
    try:
        asyncio.run(guard.check(url))
    except FetchRefused as exc:
        assert not re.search(r"\d+\.\d+|[0-9a-f]*::", str(exc)), exc  # never an address (nor the URL)
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------- S1, S2

S2_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1/",
    "http://127.0.0.1:8000/x",
    "http://127.255.255.254/",
    "http://0.0.0.0/",
    "http://0/",
    "http://[::1]/",
    "http://[::]/",
    "http://2130706433/",  # 127.0.0.1 as one number
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",  # octal
    "http://017700000001/",
    "http://127.1/",
    "http://127.0.0.1./",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://10.0.0.5/hook",
    "http://10.255.255.255/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.0.1/",
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://198.18.0.1/",
    "http://192.0.0.170/",
    "http://192.0.2.1/",
]


@pytest.mark.parametrize("url", S2_URLS)
def test_every_loopback_private_and_reserved_form_is_refused_without_dns(url: str) -> None:
    resolver = StubResolver({})
    assert refused(FetchGuard(resolver=resolver), url)
    assert resolver.calls == []  # literals are never looked up


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "0.0.0.0",
        "::1",
        "::",
        "10.1.2.3",
        "172.20.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "fc00::1",
        "fd00::5",
        "fe80::1",
        "fec0::1",  # deprecated site-local
        "ff02::1",
        "224.0.0.251",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",  # IPv4-compatible
        "::a00:1",
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "64:ff9b::a00:5",  # NAT64 of 10.0.0.5
        "64:ff9b::7f00:1",
        "64:ff9b:1::1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "2001:db8::1",
    ],
)
def test_a_name_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    resolver = StubResolver({"images.example": [[address]]})
    assert refused(FetchGuard(resolver=resolver), "https://images.example/cat.png") == NOT_ALLOWED
    assert resolver.calls == ["images.example"]


def test_one_non_public_address_among_public_ones_refuses_the_host() -> None:
    resolver = StubResolver({"mixed.example": [["93.184.216.34", "2606:2800:220:1::1", "10.0.0.5"]]})
    assert refused(FetchGuard(resolver=resolver), "http://mixed.example/")


@pytest.mark.parametrize(
    ("url", "answer"),
    [
        ("http://images.example/a.png", ["93.184.216.34"]),
        ("https://images.example:8443/a.png", ["93.184.216.34", "2606:2800:220:1::1"]),
        ("http://8.8.8.8/", []),
        ("http://0x08080808/", []),  # an odd spelling of a public address is that address
        ("http://134744072/", []),
    ],
)
def test_public_addresses_pass(url: str, answer: list[str]) -> None:
    guard = FetchGuard(resolver=StubResolver({"images.example": [answer]}))
    parsed = asyncio.run(guard.check(url))
    assert parsed.host in ("images.example", "8.8.8.8", "0x08080808", "134744072")


def test_odd_ipv4_spellings_read_as_the_c_resolver_reads_them() -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    for spelling in ("2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f.0.0.1", "127.0.0.1.", "[127.0.0.1]"):
        assert ip_literal(spelling) == loopback, spelling
    for name in ("images.example", "0x", "1e5", "localhost", "a.1"):
        assert ip_literal(name) is None, name


def test_embedded_ipv4_addresses_are_unwrapped() -> None:
    cases = {
        "::ffff:127.0.0.1": "127.0.0.1",
        "::10.0.0.1": "10.0.0.1",
        "2002:a9fe:a9fe::": "169.254.169.254",
        "64:ff9b::c0a8:1": "192.168.0.1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe": "127.0.0.1",
    }
    for v6, v4 in cases.items():
        assert embedded_ipv4(ipaddress.ip_address(v6)) == ipaddress.ip_address(v4), v6
    assert embedded_ipv4(ipaddress.ip_address("2606:2800:220:1::1")) is None
    assert is_public(ipaddress.ip_address("2002:808:808::"))  # 6to4 of 8.8.8.8
    assert not is_public(ipaddress.ip_address("2002:a00:1::"))  # 6to4 of 10.0.0.1


# ---------------------------------------------------------------------------------------------- S5


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://images.example/a.png",
        "gopher://images.example:70/_x",
        "dict://images.example:11211/stats",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
        "//images.example/a.png",
        "/etc/passwd",
        "http://[127.0.0.1]/",
        "http://[2606:2800:220:1::1]/",  # any bracketed IPv6 literal: use a host name
        "http://a@127.0.0.1/",
        "http://a@images.example/",
        "http://user:pass@images.example/",
        "http://images.example\\@127.0.0.1/",
        "http://%31%32%37.0.0.1/",
        "http://images.example:99999/",
        "http://[::1",
        "http:///a.png",
        "http://",
    ],
)
def test_schemes_userinfo_and_bracketed_hosts_are_refused_before_any_lookup(url: str) -> None:
    resolver = StubResolver({"images.example": [["93.184.216.34"]]})
    with pytest.raises(FetchRefused):
        FetchGuard(resolver=resolver).check_url(url)
    assert refused(FetchGuard(resolver=resolver), url)
    assert resolver.calls == []


# ---------------------------------------------------------------------------------------------- resolution


def test_a_name_that_does_not_resolve_is_an_error_not_a_refusal() -> None:
    with pytest.raises(FetchError) as caught:
        asyncio.run(FetchGuard(resolver=StubResolver({})).check("http://nowhere.example/"))
    assert not isinstance(caught.value, FetchRefused)
    assert "does not resolve" in str(caught.value)


def test_a_slow_resolver_times_out() -> None:
    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(10)
        return ["93.184.216.34"]

    with pytest.raises(FetchTimeout):
        asyncio.run(FetchGuard(resolver=slow, resolve_timeout_s=0.05).check("http://slow.example/"))


def test_the_system_resolver_is_used_by_default_and_checked() -> None:
    # "localhost" resolves through the system resolver (no network needed) to loopback: refused.
    assert refused(FetchGuard(), "http://localhost:9/")


# ---------------------------------------------------------------------------------------------- allow-list


def test_allow_list_networks_permit_exactly_their_addresses() -> None:
    guard = FetchGuard(["127.0.0.1/32", "10.20.0.0/16", "fd00::/8"])
    allowed = ["127.0.0.1", "10.20.3.4", "fd00::1", "::ffff:127.0.0.1", "93.184.216.34"]
    for address in allowed:
        assert guard.allows_address(ipaddress.ip_address(address)), address
    for address in ["127.0.0.2", "10.21.0.1", "fe80::1", "::1", "169.254.169.254"]:
        assert not guard.allows_address(ipaddress.ip_address(address)), address


def test_an_allow_listed_host_name_may_resolve_anywhere_but_raw_addresses_still_may_not() -> None:
    resolver = StubResolver(
        {
            "minio.internal": [["10.0.0.5"]],
            "s3.corp.example": [["10.1.0.1"]],
            "a.b.corp.example": [["10.1.0.2"]],
            "corp.example": [["10.1.0.3"]],
            "other.internal": [["10.0.0.6"]],
        }
    )
    guard = FetchGuard(["minio.internal", "*.corp.example"], resolver=resolver)
    for url in ["http://minio.internal:9000/b/k", "http://MINIO.internal/x", "https://s3.corp.example/x"]:
        asyncio.run(guard.check(url))
    asyncio.run(guard.check("https://a.b.corp.example/x"))
    assert guard.allows_name("minio.internal.") and guard.allows_name("S3.Corp.Example")
    for url in ["http://corp.example/", "http://other.internal/", "http://10.0.0.5:9000/b/k"]:
        assert refused(guard, url), url


@pytest.mark.parametrize("entry", ["http://minio.internal", "minio.internal:9000", "*", "", "a..b", "10.0.0.0/33"])
def test_bad_allow_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_allow_entry(entry)


def test_allow_list_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INPAINT_FETCH_ALLOW", "10.0.0.0/8, minio.internal,*.corp.example")
    settings = load_settings({"data_dir": tmp_path})
    assert settings.fetch_allow == ["10.0.0.0/8", "minio.internal", "*.corp.example"]
    assert load_settings({"data_dir": tmp_path, "fetch_allow": ["fd00::/8"]}).fetch_allow == ["fd00::/8"]
    monkeypatch.setenv("INPAINT_FETCH_ALLOW", "10.0.0.0/8,http://bad")
    with pytest.raises(SettingsError, match="fetch_allow"):
        load_settings({"data_dir": tmp_path})


# ---------------------------------------------------------------------------------------------- S4: pinning


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records where connections would go; never opens one."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.connects.append((host, port))
        raise httpcore.ConnectError("recording only")

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def test_dns_rebinding_connects_only_to_the_checked_address() -> None:
    """First answer public, second private: the connection goes to the first (pinned) address; the next
    connection resolves again and is refused before any connect."""
    resolver = StubResolver({"rebind.example": [["93.184.216.34"], ["127.0.0.1"]]})
    inner = RecordingBackend()
    backend = GuardedBackend(FetchGuard(resolver=resolver), inner)
    with pytest.raises(httpcore.ConnectError):
        asyncio.run(backend.connect_tcp("rebind.example", 80, timeout=1))
    assert inner.connects == [("93.184.216.34", 80)]
    with pytest.raises(FetchRefused):
        asyncio.run(backend.connect_tcp("rebind.example", 80, timeout=1))
    assert inner.connects == [("93.184.216.34", 80)]  # nothing opened to 127.0.0.1
    assert resolver.calls == ["rebind.example", "rebind.example"]


def test_each_checked_address_is_tried_in_turn() -> None:
    resolver = StubResolver({"two.example": [["93.184.216.34", "2606:2800:220:1::1"]]})
    inner = RecordingBackend()
    with pytest.raises(httpcore.ConnectError):
        asyncio.run(GuardedBackend(FetchGuard(resolver=resolver), inner).connect_tcp("two.example", 443))
    assert inner.connects == [("93.184.216.34", 443), ("2606:2800:220:1::1", 443)]


def test_unix_sockets_are_refused() -> None:
    with pytest.raises(FetchRefused):
        asyncio.run(GuardedBackend(FetchGuard()).connect_unix_socket("/var/run/docker.sock"))


# ---------------------------------------------------------------------------------------------- TLS and Host


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, list[str], list[str | None]]]:
    """An HTTPS server on 127.0.0.1 whose certificate names DNS:localhost and IP:127.0.0.1 only.

    Yields (port, CA file, the Host header of each request, the SNI name of each handshake).
    """
    files = make_tls_files(tmp_path_factory.mktemp("tls"))
    hosts: list[str] = []
    snis: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hosts.append(self.headers.get("host", ""))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.server_cert, files.server_key)

    def on_sni(sock: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        snis.append(name)

    context.sni_callback = on_sni
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], files.ca_cert, hosts, snis
    server.shutdown()
    server.server_close()


def test_tls_keeps_the_host_name_for_sni_host_header_and_certificate(tls_server) -> None:
    """The connection goes to the pinned 127.0.0.1, but TLS and HTTP still speak to the host name: a name the
    certificate does not carry fails verification although the certificate names the IP it connected to."""
    port, ca_file, hosts, snis = tls_server
    resolver = StubResolver({"localhost": [["127.0.0.1"]], "images.test": [["127.0.0.1"]]})
    guard = FetchGuard(["localhost", "images.test"], resolver=resolver)
    verify = ssl.create_default_context(cafile=str(ca_file))

    async def get(url: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=GuardedTransport(guard, verify=verify)) as client:
            return await client.get(url)

    response = asyncio.run(get(f"https://localhost:{port}/x"))
    assert response.status_code == 200 and response.text == "ok"
    assert hosts == [f"localhost:{port}"]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(get(f"https://images.test:{port}/x"))
    assert hosts == [f"localhost:{port}"]
    assert snis == ["localhost", "images.test"]  # not the address connected to
    assert resolver.calls == ["localhost", "images.test"]  # both connections resolved through the guard only


def test_the_transport_refuses_before_connecting() -> None:
    async def get() -> None:
        async with httpx.AsyncClient(transport=GuardedTransport(FetchGuard())) as client:
            await client.get("http://169.254.169.254/latest/meta-data/")

    with pytest.raises(FetchRefused):
        asyncio.run(get())
