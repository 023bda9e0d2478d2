"""What one agent connection may cost the operator: timeouts, frame size and message rate.

:class:`Limits` holds the numbers; :class:`TokenBucket` is the per-connection rate decision,
:class:`LogBudget` the one for how often a refusal is logged (both pure: the caller passes
the time), and :class:`HandshakeGate` the one for how many handshakes one address may have
in progress at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from restic_manager import protocol


@dataclass(frozen=True)
class Limits:
    # TLS and HTTP upgrade, credential check included; a stalled client is dropped after it.
    open_timeout: float = 10.0
    # An authenticated connection must say hello within this.
    hello_timeout: float = 10.0
    # Keepalive: a peer that does not answer a ping within ping_timeout is gone. Agents are
    # legitimately silent for hours between fires, so this, not silence, is the idle timeout.
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    # Larger frames close the connection (1009) before they are buffered.
    max_frame_bytes: int = protocol.MAX_FRAME_BYTES
    # Sustained frames per second, and the burst allowed above it. An agent sends a few
    # frames a minute and, per running job, a progress report a second.
    frames_per_second: float = 50.0
    burst: int = 500
    # Handshakes (TLS, upgrade, credential check) one address may have in progress at once.
    # Reconnecting agents behind one NAT address open them one by one with backoff; a flood
    # from one address is cut at accept, before it costs a TLS handshake.
    handshakes_per_address: int = 64
    # Handshakes in progress at once, in all, from addresses no agent has authenticated from:
    # a flood from many addresses takes these places, not those of the fleet's known ones.
    handshakes_from_new_addresses: int = 64


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; each frame takes one or is refused."""

    def __init__(self, *, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class LogBudget:
    """At most ``lines`` log lines per ``window`` seconds; the ones held back are counted,
    and the count is told with the next line let through. The metrics count every refusal;
    this keeps a flood of refused peers from becoming a flood of log (and of blocking writes)."""

    def __init__(self, *, lines: int, window: float) -> None:
        self._lines = lines
        self._window = window
        self._opened = float("-inf")
        self._used = 0
        self._held = 0

    def take(self, now: float) -> int | None:
        """None: do not log this one. Otherwise log it, with the number held back since the last."""
        if now - self._opened >= self._window:
            self._opened, self._used = now, 0
        if self._used >= self._lines:
            self._held += 1
            return None
        self._used += 1
        held, self._held = self._held, 0
        return held


Peer = tuple[str, int]  # (address, port): one TCP connection


class HandshakeGate:
    """Admits a connection while its address has fewer than ``per_address`` handshakes in
    progress, and, from an address no agent has authenticated from, while fewer than
    ``from_new`` handshakes from such addresses are in progress in all. A connection is in
    progress from its accept until it is settled: when its credential has been decided or
    when it closes, whichever comes first (settling twice is harmless), so an authenticated
    session never counts. An address becomes known when a credential is accepted from it
    (the ``known_addresses`` most recent are kept), or by :meth:`remember`."""

    def __init__(self, *, per_address: int, from_new: int, known_addresses: int = 65536) -> None:
        self._per_address = per_address
        self._from_new = from_new
        self._pending: dict[str, dict[Peer, bool]] = {}  # address -> peer -> counted as new
        self._new_in_progress = 0
        self._known: dict[str, None] = {}  # insertion-ordered: the oldest is forgotten first
        self._known_limit = known_addresses

    def admit(self, peer: Peer) -> str | None:
        """None: ``peer`` is admitted (and in progress). Otherwise why it is not."""
        pending = self._pending.get(peer[0], {})
        if len(pending) >= self._per_address:
            return f"{self._per_address} handshakes from this address are in progress"
        new = peer[0] not in self._known
        if new and self._new_in_progress >= self._from_new:
            return (f"{self._from_new} handshakes from addresses no agent has connected from "
                    "are in progress")
        self._pending[peer[0]] = pending
        pending[peer] = new
        self._new_in_progress += new
        return None

    def settle(self, peer: Peer, *, authenticated: bool = False) -> None:
        if authenticated:
            self.remember([peer[0]])
        pending = self._pending.get(peer[0])
        if pending is None or peer not in pending:
            return
        self._new_in_progress -= pending.pop(peer)
        if not pending:
            del self._pending[peer[0]]

    def remember(self, addresses: Iterable[str]) -> None:
        for address in addresses:
            self._known.pop(address, None)
            self._known[address] = None
        while len(self._known) > self._known_limit:
            del self._known[next(iter(self._known))]

    def in_progress(self, address: str) -> int:
        return len(self._pending.get(address, ()))

    @property
    def new_in_progress(self) -> int:
        return self._new_in_progress
