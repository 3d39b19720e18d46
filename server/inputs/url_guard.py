"""SSRF-safe connections for user-given URLs: ``image_url``, ``mask_url``, embedding paths, ``fal_webhook``.

The rules (reliability cases S1-S5, S17):

* http and https only; no user name or password in the URL (``http://a@host/``), no bracketed IPv6
  literals, no percent-escapes in the host.
* The host is resolved once and every address it resolves to must be public: not loopback, private,
  link-local (169.254.169.254 included), shared/CGNAT (100.64/10), multicast, unspecified or reserved,
  and an IPv4 address embedded in an IPv6 one (mapped, compatible, 6to4, Teredo, NAT64) must be public
  too. Hosts spelled as odd IPv4 forms (``2130706433``, ``0x7f.1``, ``127.1``) are read the way the C
  resolver reads them (``inet_aton``) and checked as the address they stand for.
* The operator's allow-list (setting ``fetch_allow``) permits networks (CIDRs or single addresses) and
  host names (``minio.internal``, ``*.corp.example``) that are not public, e.g. an internal object store.
* The connection goes to the checked address itself: there is no second lookup, so DNS rebinding cannot
  swap in another address between the check and the connect. The URL is not rewritten, so the Host
  header, TLS SNI and the certificate check still use the host name.

:class:`FetchGuard` is the policy. :class:`GuardedTransport` is an httpx transport that opens every
connection through it, so each redirect hop is checked again when it connects. Messages of
:class:`FetchError` are safe to show to users: they never contain a resolved address.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
import httpcore
import httpx

log = logging.getLogger("inpaint-server.fetch")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses the host resolves to. Tests pass stubs (DNS rebinding, fake names).
HostResolver = Callable[[str, int], Awaitable[Sequence[str | IPAddress]]]

SCHEMES = ("http", "https")
NOT_ALLOWED = (
    "is not allowed: its host is, or resolves to, a non-public address (loopback, private, link-local or reserved)"
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"),)  # RFC 6052 well-known prefix: the IPv4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use prefix: never public


class FetchError(Exception):
    """A URL that cannot be fetched. The message is a clause to put after the field name ("image_url ...")."""


class FetchRefused(FetchError):
    """The guard refused the URL or an address its host resolves to."""


class FetchTimeout(FetchError):
    """Resolving the host took too long."""


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """The system resolver (``getaddrinfo``, off the event loop): every address, in the resolver's order."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells, in any form the C resolver accepts (``0x7f.1``, ``2130706433``), else None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    text = text.removesuffix(".")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if ":" in text or not text.isascii():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv6 one (mapped, compatible, 6to4, Teredo client, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if int(ip) >> 32 == 0 or any(ip in net for net in _NAT64):  # ::a.b.c.d (deprecated) and 64:ff9b::a.b.c.d
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_plain_public(ip: IPAddress) -> bool:
    special = (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or (isinstance(ip, ipaddress.IPv6Address) and (ip.is_site_local or ip in _NAT64_LOCAL))
    )
    # is_global also excludes the special-purpose blocks not named above, e.g. 100.64.0.0/10 (shared/CGNAT).
    return ip.is_global and not special


def is_public(ip: IPAddress) -> bool:
    """True for an address on the public internet; an IPv4 address embedded in an IPv6 one is checked too."""
    inner = embedded_ipv4(ip)
    return _is_plain_public(ip) and (inner is None or _is_plain_public(inner))


def parse_allow_entry(entry: str) -> IPNetwork | str:
    """One allow-list entry: a network (``10.0.0.0/8``, ``fd00::/8``, ``10.1.2.3``) or a host name, lower-cased
    (``minio.internal``; ``*.corp.example`` for every name under corp.example). Raises ValueError."""
    text = entry.strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    name = text.lower().removesuffix(".")
    labels = name.removeprefix("*.").split(".")
    if not name or not all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii() for label in labels
    ):
        raise ValueError(
            f"{entry!r} is neither a network (10.0.0.0/8, 10.1.2.3, fd00::/8) nor a host name "
            "(minio.internal, *.corp.example)"
        )
    return name


class FetchGuard:
    """Which URLs and addresses user-given URLs may reach, and the one place their hosts are resolved."""

    def __init__(
        self, allow: Iterable[str] = (), resolver: HostResolver = resolve_host, resolve_timeout_s: float = 5.0
    ) -> None:
        entries = [parse_allow_entry(e) for e in allow]
        self.networks: list[IPNetwork] = [e for e in entries if not isinstance(e, str)]
        self.names: set[str] = {e for e in entries if isinstance(e, str) and not e.startswith("*.")}
        self.suffixes: tuple[str, ...] = tuple(e[1:] for e in entries if isinstance(e, str) and e.startswith("*."))
        self.resolver = resolver
        self.resolve_timeout_s = resolve_timeout_s

    def allows_address(self, ip: IPAddress) -> bool:
        """Public, or (itself or the IPv4 address inside it) in an allow-listed network."""
        candidates = [a for a in (ip, embedded_ipv4(ip)) if a is not None]
        if any(a.version == net.version and a in net for a in candidates for net in self.networks):
            return True
        return is_public(ip)

    def allows_name(self, host: str) -> bool:
        """The host name is allow-listed: every address it resolves to is accepted."""
        name = host.lower().removesuffix(".")
        return name in self.names or name.endswith(self.suffixes)

    def check_url(self, url: str | httpx.URL) -> httpx.URL:
        """The URL's shape (scheme, host, no userinfo, no IPv6 literal); no network access. Raises FetchRefused."""
        try:
            parsed = httpx.URL(url) if isinstance(url, str) else url
        except (httpx.InvalidURL, ValueError, TypeError):
            raise FetchRefused("is not a valid URL") from None
        if parsed.scheme not in SCHEMES:
            raise FetchRefused("must be an http or https URL")
        if not parsed.host:
            raise FetchRefused("has no host")
        if parsed.userinfo:
            raise FetchRefused("must not contain a user name or password (user@host)")
        if parsed.netloc.startswith(b"[") or ":" in parsed.host:
            raise FetchRefused("must not use an IPv6 address literal ([...]); use a host name")
        if "%" in parsed.host:
            raise FetchRefused("has an invalid host name")
        if parsed.port is not None and not 0 < parsed.port <= 65535:
            raise FetchRefused("has an invalid port")
        return parsed

    async def addresses(self, host: str, port: int) -> list[IPAddress]:
        """Resolve ``host`` once and check every address; callers connect only to what this returns.

        Raises FetchRefused when any address is not allowed, FetchError when the name does not resolve.
        """
        literal = ip_literal(host)
        if literal is not None:
            if not self.allows_address(literal):
                log.warning("refused a connection to %s (not a public address)", host)
                raise FetchRefused(NOT_ALLOWED)
            return [literal]
        try:
            with anyio.fail_after(self.resolve_timeout_s):
                answer = await self.resolver(host, port)
            addresses = [ipaddress.ip_address(a) if isinstance(a, str) else a for a in answer]
        except TimeoutError:
            raise FetchTimeout("could not be fetched: resolving its host name took too long") from None
        except (OSError, ValueError, UnicodeError):
            raise FetchError("could not be fetched: its host name does not resolve") from None
        if not addresses:
            raise FetchError("could not be fetched: its host name does not resolve")
        if not self.allows_name(host):
            refused = [a for a in addresses if not self.allows_address(a)]
            if refused:
                log.warning("refused a connection to %s: it resolves to %s", host, ", ".join(map(str, refused)))
                raise FetchRefused(NOT_ALLOWED)
        return addresses

    async def check(self, url: str | httpx.URL) -> httpx.URL:
        """Shape and addresses of ``url`` (resolves its host): what a webhook URL gets at submit."""
        parsed = self.check_url(url)
        await self.addresses(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80))
        return parsed


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses the guard has checked."""

    def __init__(self, guard: FetchGuard, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.guard = guard
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        error: Exception | None = None
        for address in await self.guard.addresses(host, port):
            try:
                return await self.inner.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:  # try the host's next address
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise FetchRefused("must not name a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport with every connection opened through :class:`GuardedBackend`.

    No proxies and no environment (``trust_env=False``): a proxy would make the checked address the proxy's.
    """

    def __init__(
        self,
        guard: FetchGuard,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits | None = None,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=32, max_keepalive_connections=8)
        super().__init__(verify=verify, trust_env=False, limits=limits)
        # httpx takes no network backend; build the pool it would build, with ours. The tests that connect
        # to fake host names fail if this stops taking effect.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(guard),
        )
