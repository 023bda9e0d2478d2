"""The operator's HTTP/1.1 client for its API calls: keep-alive connections to one apiserver.

Every call the operator makes (not the watches, which stream on aiohttp) is one request and
one response on a pooled connection. It is written here, on an asyncio Protocol, rather than
taken from aiohttp, for the CPU: a ResticJob create cost the operator 0.48-0.57 ms with
aiohttp and 0.21-0.30 ms this way (bench/README.md), and in a fire storm every millisecond of
the operator's is one the apiserver, on the same machine, does not get.

It speaks what the apiserver answers with and no more: a status line, headers, a body sized
by Content-Length, sent chunked, or read until the connection closes; ``Connection: close``
is honoured. TLS comes from the caller's context; a proxy (``http://host:port``) is used with
CONNECT for an https apiserver and with absolute-form requests for an http one.

Lifecycle: :meth:`Pool.request` takes an idle connection (the most recently used first) or
opens one, at most ``limit`` at once; the response's end gives the connection back, unless
it is to close. Connections idle for ``keepalive`` seconds are closed at the next request;
one the server closed while idle is dropped, and a request whose reused connection turns out to
be closed before any answer came is sent again, on the next idle connection or a new one
(the server never saw it).
A request that fails or is cancelled midway closes its connection: its answer may still come.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024  # a response's status line and headers
NO_BODY_STATUSES = frozenset({204, 304})


class HttpError(Exception):
    """The request got no (well-formed) response: refused, closed, garbled."""


class Closed(HttpError):
    """The connection closed before the response was complete."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered  # whether any byte of a response had come


class Response(NamedTuple):
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes
    close: bool  # the server will close the connection after it


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE = range(6)


class ResponseReader:
    """Incremental parser of one response at a time; each byte is looked at once, so a
    listing of many megabytes costs no more than its size."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.reset(no_body=False)

    def reset(self, *, no_body: bool) -> None:
        """Expect the next response; ``no_body``: it answers a CONNECT (or a HEAD)."""
        self._state = _HEAD
        self._no_body = no_body
        self._scanned = 0
        self._remaining = 0
        self._parts: list[bytes] = []
        self._status = 0
        self._headers: dict[str, str] = {}
        self._close = False
        self.started = bool(self._buffer)

    def feed(self, data: bytes) -> Response | None:
        """Take bytes from the connection; the response once it is complete."""
        self.started = True
        self._buffer += data
        buffer = self._buffer
        while True:
            if self._state == _HEAD:
                end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
                if end < 0:
                    self._scanned = len(buffer)
                    if self._scanned > MAX_HEAD:
                        raise HttpError(f"response headers longer than {MAX_HEAD} bytes")
                    return None
                head = bytes(buffer[:end])
                del buffer[:end + 4]
                self._begin(head)
                if self._state == _HEAD:  # no body
                    return self._done(b"")
            elif self._state == _LENGTH:
                if len(buffer) < self._remaining:
                    return None
                body = bytes(buffer[:self._remaining])
                del buffer[:self._remaining]
                return self._done(body)
            elif self._state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return None
                try:
                    size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise HttpError(f"bad chunk size {bytes(buffer[:min(end, 40)])!r}") from None
                del buffer[:end + 2]
                self._remaining = size
                self._state = _CHUNK_DATA if size else _TRAILER
            elif self._state == _CHUNK_DATA:
                if len(buffer) < self._remaining + 2:
                    return None
                self._parts.append(bytes(buffer[:self._remaining]))
                del buffer[:self._remaining + 2]
                self._state = _CHUNK_SIZE
            elif self._state == _TRAILER:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return None
                trailer = end > 0
                del buffer[:end + 2]
                if not trailer:
                    return self._done(b"".join(self._parts))
            else:  # _UNTIL_CLOSE: the body is what comes before the connection closes
                return None

    def eof(self) -> Response | None:
        """The connection closed: the response, if it was one that ends so."""
        if self._state == _UNTIL_CLOSE:
            body = bytes(self._buffer)
            self._buffer.clear()
            return self._done(body)
        return None

    def _begin(self, head: bytes) -> None:
        status_line, *lines = head.split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        try:
            self._status = int(rest[:3])
        except ValueError:
            raise HttpError(f"not an HTTP response: {status_line[:80]!r}") from None
        if not version.startswith(b"HTTP/1."):
            raise HttpError(f"not an HTTP/1.x response: {status_line[:80]!r}")
        headers = self._headers
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        connection = headers.get("connection", "").lower()
        self._close = connection == "close" or (version == b"HTTP/1.0" and connection != "keep-alive")
        if self._no_body or self._status in NO_BODY_STATUSES or 100 <= self._status < 200:
            return
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise HttpError(f"bad Content-Length {headers['content-length'][:40]!r}") from None
            self._state = _LENGTH
        else:
            self._state, self._close = _UNTIL_CLOSE, True

    def _done(self, body: bytes) -> Response:
        response = Response(self._status, self._headers, body, self._close)
        self._state = _HEAD
        return response


class Connection(asyncio.Protocol):
    """One connection to the apiserver (or through the proxy); one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._reader = ResponseReader()
        self._waiter: asyncio.Future[Response] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.close()  # an answer to nothing: the connection can no longer be trusted
            return
        try:
            response = self._reader.feed(data)
        except HttpError as error:
            waiter.set_exception(error)
            self.close()
            return
        if response is not None:
            waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            response = self._reader.eof()
            if response is not None:
                waiter.set_result(response)
            else:
                why = f": {exc}" if exc else ""
                waiter.set_exception(Closed(f"the connection closed before the response was complete{why}",
                                            answered=self._reader.started))

    async def exchange(self, request: bytes, *, no_body: bool = False) -> Response:
        """Send ``request``, return its response."""
        if self.lost or self.transport is None:
            raise Closed("the connection is closed", answered=False)
        self._reader.reset(no_body=no_body)
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to the apiserver at ``base`` (``https://host:port``)."""

    def __init__(self, base: str, *, ssl_context: ssl.SSLContext | None, server_hostname: str | None = None,
                 proxy: str | None = None, limit: int, keepalive: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._authority = parts.netloc.rpartition("@")[2]
        self._ssl = (ssl_context or ssl.create_default_context()) if self._tls else None
        self._server_hostname = server_hostname
        self._proxy = urlsplit(proxy) if proxy else None
        if self._proxy is not None and (self._proxy.scheme != "http" or not self._proxy.hostname):
            raise ValueError(f"only an http:// proxy is supported, not {proxy!r}")
        # An http apiserver through a proxy is asked in absolute form; over CONNECT, as usual.
        self._prefix = f"http://{self._authority}" if self._proxy is not None and not self._tls else ""
        self._keepalive = keepalive
        self._clock = clock
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[Connection] = []  # the most recently used last
        self._open: set[Connection] = set()

    async def request(self, method: str, target: str, headers: Mapping[str, str], body: bytes | None) -> Response:
        """``method`` ``target`` (a path with its query) with ``headers`` and ``body``."""
        lines = [f"{method} {self._prefix}{target} HTTP/1.1", f"Host: {self._authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        async with self._slots:
            while True:
                connection = self._take_idle()
                reused = connection is not None
                if connection is None:
                    connection = await self._connect()
                try:
                    response = await connection.exchange(request)
                except Closed as closed:
                    self._discard(connection)
                    if reused and not closed.answered:
                        continue  # the server had closed it while idle: it never saw the request
                    raise
                except BaseException:
                    self._discard(connection)
                    raise
                if response.close or connection.lost:
                    self._discard(connection)
                else:
                    connection.idle_since = self._clock()
                    self._idle.append(connection)
                return response

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()

    def _take_idle(self) -> Connection | None:
        now = self._clock()
        # The list is in the order connections were released: those idle too long are at its
        # start, and are closed here even when the pool never reaches down to them.
        while self._idle and (self._idle[0].lost or now - self._idle[0].idle_since >= self._keepalive):
            self._discard(self._idle.pop(0))
        while self._idle:
            connection = self._idle.pop()
            if not connection.lost:
                return connection
            self._discard(connection)
        return None

    def _discard(self, connection: Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        hostname = (self._server_hostname or self._host) if self._tls else None
        if self._proxy is None:
            _, connection = await loop.create_connection(Connection, self._host, self._port, ssl=self._ssl,
                                                         server_hostname=hostname)
        else:
            assert self._proxy.hostname is not None
            _, connection = await loop.create_connection(Connection, self._proxy.hostname, self._proxy.port or 80)
            if self._tls:
                await self._tunnel(loop, connection, hostname)
        self._open.add(connection)
        return connection

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, connection: Connection, hostname: str | None) -> None:
        """Through the proxy to the apiserver by CONNECT, then TLS inside the tunnel."""
        target = f"{self._host}:{self._port}"
        try:
            answer = await connection.exchange(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(),
                                               no_body=True)
            if answer.status // 100 != 2:
                raise HttpError(f"the proxy refused CONNECT {target}: {answer.status}")
            assert connection.transport is not None
            transport = await loop.start_tls(connection.transport, connection, self._ssl,  # type: ignore[arg-type]
                                             server_hostname=hostname)
        except BaseException:
            connection.close()
            raise
        assert isinstance(transport, asyncio.Transport)
        connection.transport = transport
