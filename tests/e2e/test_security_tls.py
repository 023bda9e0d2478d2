"""The agents' endpoint over TLS with real certificates (openssl) and the real agent connection
code, no control plane: a renewed certificate is served without a restart."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from restic_manager.operator.agents.identity import Identity, Method
from restic_manager.operator.agents.limits import Limits
from restic_manager.operator.agents.server import AgentServer, ServingCertificate, Session
from restic_manager.operator.kube.api import ObjectKey

from e2e.harness import make_certificates

TIMEOUT = 10


class Handler:
    async def on_connect(self, session: Session) -> None: ...

    async def on_message(self, session: Session, frame: object) -> None: ...

    async def on_disconnect(self, session: Session) -> None: ...

    def on_refused(self, agent: ObjectKey, reason: str, message: str) -> None: ...


async def anyone(token: str) -> Identity:
    return Identity(ObjectKey("ns", "web-01"), Method.TOKEN, "digest")


async def handshake(url: str, ca: Path) -> None:
    async with asyncio.timeout(TIMEOUT):
        async with connect(url, ssl=ssl.create_default_context(cafile=str(ca)),
                           additional_headers={"Authorization": "Bearer t"}):
            pass


async def test_a_renewed_certificate_is_served_to_new_connections(tmp_path: Path) -> None:
    old, new = make_certificates(tmp_path / "old"), make_certificates(tmp_path / "new")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(old.cert, cert)
    shutil.copy(old.key, key)
    certificate = ServingCertificate(cert, key)
    server = AgentServer(authenticate=anyone, handler=Handler())
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(server.serve("127.0.0.1", 0, tls=certificate, started=port.set_result))
    try:
        url = f"wss://127.0.0.1:{await asyncio.wait_for(port, TIMEOUT)}/agent"
        await handshake(url, old.ca)
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(url, new.ca)
        assert not await certificate.reload()  # nothing changed

        # A renewal caught in the middle (new certificate, key not yet written) keeps the old pair.
        shutil.copy(new.cert, cert)
        key.write_text("half-written")
        assert not await certificate.reload()
        await handshake(url, old.ca)

        shutil.copy(new.cert, cert)
        shutil.copy(new.key, key)
        assert await certificate.reload()
        await handshake(url, new.ca)
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(url, old.ca)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def ended(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (with a FIN or a reset)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


async def test_a_flooding_address_is_reset_before_tls_and_its_failed_handshakes_free_their_places(
        tmp_path: Path) -> None:
    pair = make_certificates(tmp_path)
    server = AgentServer(authenticate=anyone, handler=Handler(), limits=Limits(handshakes_per_address=2))
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(server.serve("127.0.0.1", 0, tls=ServingCertificate(pair.cert, pair.key),
                                               started=port.set_result))
    flooder = ("127.0.0.2", 0)
    client = ssl.create_default_context(cafile=str(pair.ca))
    try:
        bound = await asyncio.wait_for(port, TIMEOUT)
        url = f"wss://127.0.0.1:{bound}/agent"
        stalled = [await asyncio.open_connection("127.0.0.1", bound, local_addr=flooder) for _ in range(2)]
        with pytest.raises(ConnectionResetError):  # no TLS record was sent: reset at accept
            async with asyncio.timeout(TIMEOUT):
                await asyncio.open_connection("127.0.0.1", bound, ssl=client, server_hostname="127.0.0.1",
                                              local_addr=flooder)
        assert server.metrics.handshakes_refused == {"too-many-handshakes": 1}
        await handshake(url, pair.ca)  # an agent on another address is served meanwhile

        # Bytes that are not TLS end both stalled handshakes in asyncio's TLS layer, which
        # websockets never sees: their connections' close frees their places all the same.
        for reader, writer in stalled:
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            async with asyncio.timeout(TIMEOUT):
                assert await ended(reader)
        async with asyncio.timeout(TIMEOUT):
            async with connect(url, ssl=client, additional_headers={"Authorization": "Bearer t"},
                               local_addr=flooder):
                pass
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
