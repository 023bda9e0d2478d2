"""After a connection attempt ends: try again soon, try again slowly, or stop the agent.

Decisions only, no clock, socket or log: agent/connection.py says how an attempt ended and
when; :class:`Reconnect` answers with a :class:`Retry` (how long to wait, what to log and
how loudly) or a :class:`Stop` (an exit code and the message), keeping the little history
that takes: the retry count, and when this agent's connections were last replaced.

What stops the agent (:data:`ExitCode.REFUSED`), because no retry can change it:

* the credentials belong to another Agent than the one the agent says it is (the operator
  closes with ``CLOSE_WRONG_AGENT``): the token file and ``agentName`` disagree;
* the handshake refused with a reason in :data:`PERMANENT_REFUSALS`: an in-cluster agent
  deployed unlike the operator's flags say (audience, ServiceAccount, node binding, an
  Agent of its node's name that is not a node's); a fresh token would be refused the same
  way (the kubelet still restarts the pod, with its own backoff, and shows why);
* another connection with the same credentials replaced this one :data:`SHARED_REPLACEMENTS`
  times within :data:`SHARED_WINDOW`: two agents share one Agent's credentials and each
  would keep pushing the other off. The one that stops says so; the other goes on alone.

Everything else is retried. Slowly (:data:`SLOWLY`) what waits for someone to act
elsewhere: any other refusal, e.g. ``unknown-token`` (an Agent created moments ago whose
token Secret the operator has not seen yet, a rotated token not yet in the token file, an
operator that does not watch the Agent's namespace: the token file is read again on every
attempt, so fixing any of these needs no restart), and a close with 1008. Soon
(:data:`SOON`) the rest: no connection, a 5xx (the apiserver unavailable), revoked
credentials (4001: the token file may hold a fresh token by now), an operator of another
protocol version (an upgrade under way).
"""

from __future__ import annotations

import logging
import random
import re
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from websockets.frames import CloseCode

from restic_manager import protocol


class ExitCode(IntEnum):
    """How `restic-manager agent` ends. 1 is Python's own, for an error nobody foresaw.
    deploy/systemd's unit lists the :data:`PERMANENT` ones in RestartPreventExitStatus=."""

    STOPPED = 0  # SIGTERM or SIGINT
    CONFIG = 2  # a setting it cannot work with (argparse's usage errors too), restic that does not run
    STATE = 3  # the state directory cannot be read or written
    REFUSED = 4  # the operator refuses this agent for good (see the module's docstring)


PERMANENT = frozenset({ExitCode.CONFIG, ExitCode.STATE, ExitCode.REFUSED})


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: retry n waits a uniformly random time in
    [0, min(cap, base * 2**n)], so a fleet that lost its operator does not return in lockstep."""

    base: float = 1.0
    cap: float = 10.0

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.cap, self.base * 2.0 ** min(retry, 32)))


# The cap is low because a restarting operator is back within seconds, and an agent that
# waited toward a minute would come back long after it; full jitter over the cap still
# spreads a large fleet's reconnects (bench/README.md measures them).
SOON = Backoff(base=1.0, cap=10.0)
# What someone must fix first: at most a minute between attempts, so the agent is back
# within a minute of the fix, and logs the refusal about once a minute meanwhile.
SLOWLY = Backoff(base=2.0, cap=60.0)

SHARED_REPLACEMENTS = 3
SHARED_WINDOW = 600.0  # seconds

# Refusals no retry gets past, with what to do about them.
PERMANENT_REFUSALS = {
    "wrong-audience": "the ServiceAccount token's audience is not the operator's --agent-token-audience "
                      "(the chart sets both from agentDaemonSet.tokenAudience)",
    "wrong-service-account": "the pod's ServiceAccount is not the operator's --agent-service-account: run the "
                             "agent DaemonSet the chart installs (agentDaemonSet.enabled)",
    "no-node-binding": "the ServiceAccount token is not bound to a pod on a node: in-cluster agents need the "
                       "projected token of a DaemonSet pod, on Kubernetes 1.30 or newer",
    "not-a-node-agent": "an Agent named after this node exists without that node in spec.nodeName: delete it, "
                        "and this node's Agent is registered again",
}
# Advice for refusals that something done elsewhere may end.
_ADVICE = {
    "no-token": "the token file {token_file} is empty",
    "unknown-token": "no Agent has the token in {token_file}: put Agent {agent}'s token there (Secret "
                     "{agent}-agent-token, key token); an Agent created moments ago is known as soon as the "
                     "operator has seen its Secret",
    "agent-deleting": "Agent {agent} is being deleted",
    "token-expired": "the ServiceAccount token has expired; the kubelet writes a fresh one",
    "service-account-token": "the operator accepts no ServiceAccount tokens (it runs without "
                             "--agent-service-account: the chart's agentDaemonSet.enabled)",
}
_REASON_CODE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


@dataclass(frozen=True)
class Refused:
    """The operator refused the handshake: its HTTP status, and its reason code if it gave one."""

    status: int
    reason: str = ""


@dataclass(frozen=True)
class Closed:
    """The operator (or the network: 1006) ended an open connection."""

    code: int
    reason: str = ""


@dataclass(frozen=True)
class Failed:
    """No session for any other reason: no connection, TLS, a timeout, another protocol version."""

    error: str
    level: int = logging.WARNING


Ending = Refused | Closed | Failed


@dataclass(frozen=True)
class Retry:
    delay: float
    message: str
    level: int  # logging's: ERROR for what someone must look at, WARNING for what may heal by itself


@dataclass(frozen=True)
class Stop:
    exit_code: ExitCode
    message: str


def reason_code(header: str | None) -> str:
    """The refusal reason the operator named, or "" for none or for anything that is not one
    (it goes to the log: a reason code is lowercase words and dashes, nothing else)."""
    return header if header and _REASON_CODE.fullmatch(header) else ""


class Reconnect:
    """What to do after each attempt of one agent's connection (the module's docstring)."""

    def __init__(self, *, agent: str, token_file: Path | None, rng: random.Random,
                 soon: Backoff = SOON, slowly: Backoff = SLOWLY) -> None:
        self._agent = agent
        self._token_file = token_file
        self._rng = rng
        self._soon = soon
        self._slowly = slowly
        self._retries = 0
        self._replaced: deque[float] = deque()

    def after(self, ending: Ending, *, established: bool, now: float) -> Retry | Stop:
        """``ending`` of an attempt at ``now`` (seconds, any monotonic clock); ``established``
        whether it got as far as an acknowledged set, which starts the backoff over."""
        if established:
            self._retries = 0
        match ending:
            case Refused(status=status, reason=reason):
                return self._refused(status, reason)
            case Closed(code=protocol.CLOSE_WRONG_AGENT, reason=reason):
                return Stop(ExitCode.REFUSED, f"the operator refuses this agent as Agent {self._agent}: "
                            f"{reason or 'its credentials belong to another Agent'}; set agentName to the Agent "
                            f"the token in {self._token_file} belongs to, or put Agent {self._agent}'s token there")
            case Closed(code=protocol.CLOSE_REPLACED):
                return self._replaced_at(now)
            case Closed(code=protocol.CLOSE_REVOKED, reason=reason):
                return self._retry(self._soon, logging.WARNING, f"the operator ended the connection: "
                                   f"{reason or 'credentials revoked'}; reading {self._token_file} again")
            case Closed(code=CloseCode.POLICY_VIOLATION, reason=reason):
                return self._retry(self._slowly, logging.ERROR,
                                   f"the operator ended the connection (code 1008, {reason!r})")
            case Closed(code=code, reason=reason):
                return self._retry(self._soon, logging.WARNING,
                                   f"connection closed (code {code}{f', {reason!r}' if reason else ''})")
            case Failed(error=error, level=level):
                return self._retry(self._soon, level, error)
        raise AssertionError(f"unknown ending {ending!r}")

    def _refused(self, status: int, reason: str) -> Retry | Stop:
        said = f"HTTP {status}{f' {reason}' if reason else ''}"
        if reason in PERMANENT_REFUSALS:
            return Stop(ExitCode.REFUSED, f"the operator refuses this agent ({said}): {PERMANENT_REFUSALS[reason]}")
        if status >= 500:
            return self._retry(self._soon, logging.WARNING, f"the operator cannot check credentials now ({said})")
        advice = _ADVICE.get(reason, "the operator's log says why").format(agent=self._agent,
                                                                          token_file=self._token_file)
        return self._retry(self._slowly, logging.ERROR, f"the operator refuses this agent ({said}): {advice}")

    def _replaced_at(self, now: float) -> Retry | Stop:
        self._replaced.append(now)
        while self._replaced[0] <= now - SHARED_WINDOW:
            self._replaced.popleft()
        count = len(self._replaced)
        shared = (f"another connection with the credentials of Agent {self._agent} replaced this one {count} "
                  f"time(s) in {SHARED_WINDOW / 60:g} minutes")
        if count >= SHARED_REPLACEMENTS:
            return Stop(ExitCode.REFUSED, f"{shared}: two agents use the same credentials (one token file on two "
                        "hosts, or two agents on one host or node); give each host its own Agent and token. "
                        "Stopping, so that the other agent goes on alone")
        return self._retry(self._slowly, logging.ERROR, f"{shared}; if it goes on, two agents share them")

    def _retry(self, backoff: Backoff, level: int, message: str) -> Retry:
        delay = backoff.delay(self._retries, self._rng)
        self._retries += 1
        return Retry(delay, message, level)
