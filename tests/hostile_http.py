"""A hostile image host for the SSRF and fetch-limit tests: a raw HTTP/1.1 server on 127.0.0.1.

Paths (the query string is ignored except by ``/redirect``):

``/image.png``          a small PNG
``/redirect?to=URL``    302 to URL
``/hops/N``             302 to ``/hops/N-1``; ``/hops/0`` is the PNG
``/slow``               declares 1000 bytes, sends 1 byte a second
``/huge``               declares 200 MB in Content-Length and sends zeros until the client goes
``/endless``            chunked, endless zeros
``/reset``              reads the request, then resets the connection (RST)
``/flaky/K``            resets the first K connections to this path, then sends the PNG

Every connection and request is recorded, with the bytes of body each handler managed to send.
:class:`StubResolver` stands in for DNS (fake names, rebinding).
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

HUGE = 200 * 1024 * 1024
CHUNK = 64 * 1024


class StubResolver:
    """A DNS stand-in for the SSRF guard: answers from a table, one answer per call in turn (the last one
    repeats), and records every name it was asked for. An unknown name does not resolve."""

    def __init__(self, table: dict[str, Sequence[Sequence[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answers = self.table.get(host)
        if answers is None:
            raise OSError("Name or service not known")
        return list(answers[min(self.calls.count(host), len(answers)) - 1])


@dataclass
class Seen:
    """One request the server read."""

    path: str
    host: str


@dataclass
class HostileServer:
    image: bytes
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    sent: Counter = field(default_factory=Counter)  # body bytes sent, by path
    finished: Counter = field(default_factory=Counter)  # handlers that returned, by path

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with owner._lock:
                    owner.connections += 1
                owner._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        with self._lock:
            return [seen.path for seen in self.requests]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ behaviours

    def _serve(self, sock: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                return
            head += data
        lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        parts = urlsplit(target)
        with self._lock:
            self.requests.append(Seen(parts.path, headers.get("host", "")))
            hits = sum(1 for seen in self.requests if seen.path == parts.path)
        try:
            self._answer(sock, parts.path, parse_qs(parts.query), hits)
        except OSError:  # the client went away: the point of several behaviours
            pass
        finally:
            with self._lock:
                self.finished[parts.path] += 1

    def _answer(self, sock: socket.socket, path: str, query: dict[str, list[str]], hits: int) -> None:
        name, _, arg = path.strip("/").partition("/")
        if path == "/image.png" or (name == "hops" and arg == "0"):
            self._send(sock, path, 200, self.image)
        elif name == "redirect":
            self._send(sock, path, 302, b"", {"Location": query["to"][0]})
        elif name == "hops":
            self._send(sock, path, 302, b"", {"Location": f"/hops/{int(arg) - 1}"})
        elif name == "slow":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
            for _ in range(1000):
                sock.sendall(b"\x89")
                self._count(path, 1)
                time.sleep(1.0)
        elif name == "huge":
            sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {HUGE}\r\n\r\n".encode())
            for _ in range(HUGE // CHUNK):
                sock.sendall(bytes(CHUNK))
                self._count(path, CHUNK)
        elif name == "endless":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = f"{CHUNK:x}\r\n".encode() + bytes(CHUNK) + b"\r\n"
            while True:
                sock.sendall(chunk)
                self._count(path, CHUNK)
        elif name == "reset" or (name == "flaky" and hits <= int(arg)):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # with a zero linger time: RST instead of FIN
        elif name == "flaky":
            self._send(sock, path, 200, self.image)
        else:
            self._send(sock, path, 404, b"no such path")

    def _send(self, sock: socket.socket, path: str, status: int, body: bytes, headers: dict | None = None) -> None:
        lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self._count(path, len(body))

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self.sent[path] += n
