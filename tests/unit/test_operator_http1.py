"""The operator's HTTP/1.1 client (operator/http1.py): responses in every framing the
apiserver uses, cut anywhere; connections kept, reused, expired, retried; the proxy tunnel.
Servers here are raw asyncio servers that answer from a script, so a response can be
malformed, cut or closed exactly as a test needs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from restic_manager.operator.http1 import Closed, HttpError, Pool, Response, ResponseReader

CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
           b"5\r\n{\"a\":\r\n3;ext=1\r\n1}\n\r\n0\r\nX-Trailer: t\r\n\r\n")
LENGTH = b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\nRetry-After: 2\r\n\r\n{\"b\":2}"


def read_all(pieces: list[bytes], *, no_body: bool = False) -> Response | None:
    reader = ResponseReader()
    reader.reset(no_body=no_body)
    response = None
    for piece in pieces:
        assert response is None, "bytes after the response was complete"
        response = reader.feed(piece)
    return response


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@given(st.lists(st.integers(min_value=0, max_value=500), max_size=8))
def test_a_chunked_response_is_read_however_it_is_cut(points: list[int]) -> None:
    response = read_all(cut(CHUNKED, points))
    assert response is not None
    assert response.status == 200 and response.body == b'{"a":1}\n' and not response.close
    assert response.headers["content-type"] == "application/json"


@given(st.lists(st.integers(min_value=0, max_value=500), max_size=8))
def test_a_sized_response_is_read_however_it_is_cut(points: list[int]) -> None:
    response = read_all(cut(LENGTH, points))
    assert response == Response(201, {"content-length": "7", "retry-after": "2"}, b'{"b":2}', False)


def test_a_response_is_not_complete_before_its_last_byte() -> None:
    for data in (CHUNKED, LENGTH):
        assert read_all([data[:-1]]) is None


def test_connection_close_and_http_1_0_say_the_connection_ends() -> None:
    closing = read_all([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"])
    old = read_all([b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert closing is not None and closing.close and old is not None and old.close


def test_no_content_has_no_body_and_a_connect_answer_neither() -> None:
    assert read_all([b"HTTP/1.1 204 No Content\r\n\r\n"]) == Response(204, {}, b"", False)
    assert read_all([b"HTTP/1.1 200 Connection established\r\n\r\n"], no_body=True) == Response(200, {}, b"", False)


def test_a_body_without_length_ends_with_the_connection() -> None:
    reader = ResponseReader()
    assert reader.feed(b"HTTP/1.1 200 OK\r\n\r\nall of ") is None
    assert reader.feed(b"it") is None
    assert reader.eof() == Response(200, {}, b"all of it", True)


@pytest.mark.parametrize("data, message", [
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP response"),
    (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, "response headers longer than"),
])
def test_a_garbled_response_is_an_error_saying_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(HttpError, match=message):
        read_all([data])


# --- against a scripted server ---------------------------------------------------------------

Answer = Callable[[bytes, int], bytes | None]  # (request, its number on the connection) → reply, or None: close


class ScriptedServer:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        number = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                number += 1
                reply = self.answer(request, number)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close_all(self) -> None:
        for writer in self.writers:
            writer.close()


@contextlib.asynccontextmanager
async def scripted(answer: Answer) -> AsyncIterator[tuple[ScriptedServer, str]]:
    server = ScriptedServer(answer)
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.close_all()
        listening.close()


def ok(body: bytes = b"{}") -> Answer:
    return lambda request, number: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_a_request_is_sent_as_given_and_its_connection_kept_for_the_next() -> None:
    async with scripted(ok(b'{"x":1}')) as (server, address):
        pool = Pool(f"http://{address}", ssl_context=None, limit=4, keepalive=60)
        try:
            first = await pool.request("POST", "/apis/x?dryRun=All", {"Accept": "application/json"}, b'{"y":2}')
            await pool.request("GET", "/version", {}, None)
        finally:
            await pool.close()
    assert first.status == 200 and first.body == b'{"x":1}'
    assert server.requests[0] == (f"POST /apis/x?dryRun=All HTTP/1.1\r\nHost: {address}\r\n"
                                  f"Accept: application/json\r\nContent-Length: 7\r\n\r\n{{\"y\":2}}").encode()
    assert server.requests[1].startswith(b"GET /version HTTP/1.1\r\n") and b"Content-Length" not in server.requests[1]
    assert server.connections == 1


async def test_at_most_limit_connections_are_open_and_the_rest_wait() -> None:
    release = asyncio.Event()
    in_flight = 0
    most = 0

    async def answer_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, most
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                in_flight += 1
                most = max(most, in_flight)
                await release.wait()
                in_flight -= 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    listening = await asyncio.start_server(answer_later, "127.0.0.1", 0)
    pool = Pool(f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}", ssl_context=None, limit=3, keepalive=60)
    try:
        calls = [asyncio.ensure_future(pool.request("GET", "/", {}, None)) for _ in range(7)]
        await asyncio.sleep(0.2)
        assert most == 3 and not any(call.done() for call in calls)
        release.set()
        assert [response.status for response in await asyncio.gather(*calls)] == [200] * 7
    finally:
        await pool.close()
        listening.close()
    assert most == 3


async def test_a_connection_idle_past_keepalive_is_not_used_again() -> None:
    now = [0.0]
    async with scripted(ok()) as (server, address):
        pool = Pool(f"http://{address}", ssl_context=None, limit=4, keepalive=75, clock=lambda: now[0])
        try:
            await pool.request("GET", "/", {}, None)
            now[0] = 74.0
            await pool.request("GET", "/", {}, None)
            assert server.connections == 1
            now[0] = 150.0
            await pool.request("GET", "/", {}, None)
        finally:
            await pool.close()
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_replaced_and_the_request_sent_once() -> None:
    # The server answers one request per connection and then closes, without saying so.
    async with scripted(lambda request, number: ok()(request, number) if number == 1 else None) as (server, address):
        pool = Pool(f"http://{address}", ssl_context=None, limit=4, keepalive=60)
        try:
            for _ in range(3):
                assert (await pool.request("POST", "/x", {}, b"{}")).status == 200
        finally:
            await pool.close()
    # Each reused connection was found closed before any answer: sent again on a new one.
    assert server.connections == 3 and len(server.requests) == 5


async def test_a_response_cut_short_is_an_error_not_sent_again() -> None:
    async with scripted(lambda request, number: None) as (server, address):
        pool = Pool(f"http://{address}", ssl_context=None, limit=4, keepalive=60)
        try:
            with pytest.raises(Closed, match="closed before the response was complete"):
                await pool.request("POST", "/x", {}, b"{}")
        finally:
            await pool.close()
    assert len(server.requests) == 1  # a fresh connection: the server may have seen it


async def test_connection_close_in_the_response_is_honoured() -> None:
    reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    async with scripted(lambda request, number: reply) as (server, address):
        pool = Pool(f"http://{address}", ssl_context=None, limit=4, keepalive=60)
        try:
            await pool.request("GET", "/", {}, None)
            await pool.request("GET", "/", {}, None)
        finally:
            await pool.close()
    assert server.connections == 2


async def test_a_cancelled_request_closes_its_connection() -> None:
    never = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never.wait()

    listening = await asyncio.start_server(silent, "127.0.0.1", 0)
    pool = Pool(f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}", ssl_context=None, limit=1, keepalive=60)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await pool.request("GET", "/", {}, None)
        assert pool._idle == [] and pool._open == set()  # its late answer can never be taken for another's
    finally:
        await pool.close()
        never.set()
        listening.close()


async def test_an_http_apiserver_through_a_proxy_is_asked_in_absolute_form() -> None:
    async with scripted(ok()) as (proxy, address):
        pool = Pool("http://apiserver.example:8080", ssl_context=None, proxy=f"http://{address}", limit=1,
                    keepalive=60)
        try:
            await pool.request("GET", "/version", {}, None)
        finally:
            await pool.close()
    assert proxy.requests[0].startswith(b"GET http://apiserver.example:8080/version HTTP/1.1\r\n"
                                        b"Host: apiserver.example:8080\r\n")


async def test_a_proxy_that_refuses_the_tunnel_is_an_error_naming_it() -> None:
    refuse = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    async with scripted(lambda request, number: refuse) as (proxy, address):
        pool = Pool("https://apiserver.example:6443", ssl_context=None, proxy=f"http://{address}", limit=1,
                    keepalive=60)
        try:
            with pytest.raises(HttpError, match="the proxy refused CONNECT apiserver.example:6443: 403"):
                await pool.request("GET", "/version", {}, None)
        finally:
            await pool.close()
    assert proxy.requests == [b"CONNECT apiserver.example:6443 HTTP/1.1\r\nHost: apiserver.example:6443\r\n\r\n"]


def test_urls_that_cannot_be_served_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Pool("ftp://x", ssl_context=None, limit=1, keepalive=1)
    with pytest.raises(ValueError, match="only an http:// proxy"):
        Pool("https://x", ssl_context=None, proxy="socks5://p:1080", limit=1, keepalive=1)


async def test_connections_left_idle_past_keepalive_are_closed_at_the_next_request() -> None:
    now = [0.0]
    async with scripted(ok()) as (server, address):
        pool = Pool(f"http://{address}", ssl_context=None, limit=4, keepalive=75, clock=lambda: now[0])
        try:
            await asyncio.gather(*(pool.request("GET", "/", {}, None) for _ in range(3)))
            assert len(pool._idle) == 3
            now[0] = 60.0
            await pool.request("GET", "/", {}, None)  # takes the last released; two wait beneath it
            now[0] = 100.0
            await pool.request("GET", "/", {}, None)
            assert len(pool._idle) == 1 and len(pool._open) == 1  # the two below closed, not kept for ever
        finally:
            await pool.close()
    assert server.connections == 3
