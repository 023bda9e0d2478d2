"""The bogus side of benchmark 7 (b_handshake.py): ``--concurrency`` clients, each opening
one agent handshake after another with a credential nobody holds, for ``--seconds``; then
one JSON line on stdout: how many handshakes were answered, by HTTP status, and how many
failed otherwise. Run as its own process, so the flood and the legitimate agent that the
benchmark times do not share an event loop.

    python bench/flood.py wss://127.0.0.1:PORT/agent --kind unknown-token --concurrency 500 --seconds 30
    python bench/flood.py ... --sources 250   # client i connects from 127.0.0.(2 + i mod 250)
    FLOOD_TOKEN=<a real ServiceAccount token> python bench/flood.py ... --kind forged-token

``unknown-token``: a random token of a host agent's shape, new each time. ``forged-token``:
the claims of a real projected ServiceAccount token (right audience, ServiceAccount, key id)
under a random signature, new each time: only the signature check can tell it apart.
The clients do not verify the operator's certificate (an attacker would not bother). They
connect from loopback addresses other than 127.0.0.1, the legitimate agent's: one host
flooding (``--sources 1``, the default) or many.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import secrets
import ssl
import time

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus


def bogus(kind: str, real: str) -> str:
    if kind == "unknown-token":
        return secrets.token_urlsafe(32)
    header_and_claims = real.rpartition(".")[0]
    return f"{header_and_claims}.{base64.urlsafe_b64encode(secrets.token_bytes(256)).decode().rstrip('=')}"


async def flood(url: str, *, kind: str, real: str, concurrency: int, seconds: float,
                sources: int) -> dict[str, object]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    answered: collections.Counter[str] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + seconds

    async def client(source: str) -> None:
        while time.monotonic() < deadline:
            headers = {"Authorization": f"Bearer {bogus(kind, real)}"}
            try:
                async with connect(url, additional_headers=headers, ssl=context if url.startswith("wss") else None,
                                   open_timeout=30, compression=None, ping_interval=None, local_addr=(source, 0)):
                    answered["101"] += 1  # let in: must never happen
            except InvalidStatus as refused:
                answered[str(refused.response.status_code)] += 1
            except (OSError, TimeoutError, InvalidMessage) as error:  # reset, or closed before an answer
                failed[type(error).__name__] += 1

    started = time.monotonic()
    await asyncio.gather(*(client(f"127.0.0.{2 + i % sources}") for i in range(concurrency)))
    elapsed = time.monotonic() - started
    return {"kind": kind, "concurrency": concurrency, "sources": sources, "seconds": round(elapsed, 1),
            "answered": dict(answered),
            "failed": dict(failed), "per_second": round(sum(answered.values()) / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--kind", choices=("unknown-token", "forged-token"), required=True)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sources", type=int, choices=range(1, 254), default=1, metavar="1..253",
                        help="loopback addresses the clients connect from, 127.0.0.2 onwards (default: 1)")
    args = parser.parse_args()
    real = os.environ.get("FLOOD_TOKEN", "")
    if args.kind == "forged-token" and real.count(".") != 2:
        parser.error("--kind forged-token needs FLOOD_TOKEN in the environment: a real ServiceAccount token (a JWT)")
    print(json.dumps(asyncio.run(flood(args.url, kind=args.kind, real=real, concurrency=args.concurrency,
                                       seconds=args.seconds, sources=args.sources))), flush=True)


if __name__ == "__main__":
    main()
