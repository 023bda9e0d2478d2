"""What the end of a connection attempt means for the agent (agent/retry.py): try again soon,
slowly, or stop with an exit code that keeps systemd from restarting it."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from restic_manager import protocol
from restic_manager.agent import retry
from restic_manager.agent.retry import (
    SHARED_REPLACEMENTS, SHARED_WINDOW, SLOWLY, SOON, Closed, ExitCode, Failed, Reconnect, Refused, Retry, Stop,
)

TOKEN_FILE = Path("/etc/restic-manager/token")


class HighestDelay(random.Random):
    """Full jitter picks a delay in [0, limit]; this always picks the limit, so tests see it."""

    def uniform(self, a: float, b: float) -> float:
        return b


def reconnect() -> Reconnect:
    return Reconnect(agent="web-01", token_file=TOKEN_FILE, rng=HighestDelay())


SOON_FIRST, SLOW_FIRST = SOON.delay(0, HighestDelay()), SLOWLY.delay(0, HighestDelay())


@pytest.mark.parametrize(("ending", "delay", "level", "says"), [
    # Someone must act elsewhere (and may have, by the next attempt): slowly, loudly.
    (Refused(401, "unknown-token"), SLOW_FIRST, logging.ERROR,
     f"(HTTP 401 unknown-token): no Agent has the token in {TOKEN_FILE}: put Agent web-01's token there"),
    (Refused(401, "no-token"), SLOW_FIRST, logging.ERROR, f"the token file {TOKEN_FILE} is empty"),
    (Refused(403, "agent-deleting"), SLOW_FIRST, logging.ERROR, "Agent web-01 is being deleted"),
    (Refused(401, "token-expired"), SLOW_FIRST, logging.ERROR, "the kubelet writes a fresh one"),
    (Refused(401), SLOW_FIRST, logging.ERROR, "(HTTP 401): the operator's log says why"),  # an older operator
    (Refused(403, "made-up-by-a-newer-operator"), SLOW_FIRST, logging.ERROR, "the operator's log says why"),
    (Closed(1008, "the Agent resource was deleted"), SLOW_FIRST, logging.ERROR, "'the Agent resource was deleted'"),
    # May heal by itself: soon.
    (Refused(503, "tokenreview-failed"), SOON_FIRST, logging.WARNING,
     "cannot check credentials now (HTTP 503 tokenreview-failed)"),
    (Closed(protocol.CLOSE_REVOKED, "credentials revoked"), SOON_FIRST, logging.WARNING,
     f"credentials revoked; reading {TOKEN_FILE} again"),
    (Closed(1001, "operator shutting down"), SOON_FIRST, logging.WARNING, "closed (code 1001, 'operator shutting down')"),
    (Closed(1006), SOON_FIRST, logging.WARNING, "closed (code 1006)"),
    (Failed("cannot connect: [Errno 111] Connection refused"), SOON_FIRST, logging.WARNING, "Connection refused"),
    (Failed("the operator speaks protocol version 1", level=logging.ERROR), SOON_FIRST, logging.ERROR, "version 1"),
    # Once: perhaps an old pod of a DaemonSet rollout; retried slowly, and named.
    (Closed(protocol.CLOSE_REPLACED), SLOW_FIRST, logging.ERROR,
     "replaced this one 1 time(s) in 10 minutes; if it goes on, two agents share them"),
])
def test_what_heals_elsewhere_is_retried_slowly_and_what_may_heal_by_itself_soon(
        ending: retry.Ending, delay: float, level: int, says: str) -> None:
    decision = reconnect().after(ending, established=False, now=0.0)
    assert isinstance(decision, Retry)
    assert (decision.delay, decision.level) == (delay, level)
    assert says in decision.message


@pytest.mark.parametrize(("ending", "says"), [
    (Closed(protocol.CLOSE_WRONG_AGENT, "hello: agent 'web-01' is not the Agent these credentials belong to ('db-01')"),
     "as Agent web-01: hello: agent 'web-01' is not the Agent these credentials belong to ('db-01'); set agentName "
     f"to the Agent the token in {TOKEN_FILE} belongs to, or put Agent web-01's token there"),
    (Refused(401, "wrong-audience"), "(HTTP 401 wrong-audience): the ServiceAccount token's audience"),
    (Refused(403, "wrong-service-account"), "(HTTP 403 wrong-service-account): the pod's ServiceAccount"),
    (Refused(403, "no-node-binding"), "Kubernetes 1.30 or newer"),
    (Refused(403, "not-a-node-agent"), "an Agent named after this node exists without that node in spec.nodeName"),
])
def test_credentials_of_another_agent_and_a_deployment_the_operator_refuses_stop_the_agent(
        ending: retry.Ending, says: str) -> None:
    decision = reconnect().after(ending, established=False, now=0.0)
    assert isinstance(decision, Stop) and decision.exit_code is ExitCode.REFUSED
    assert says in decision.message


def test_an_agent_replaced_again_and_again_shares_its_credentials_and_stops() -> None:
    policy = reconnect()
    replaced = Closed(protocol.CLOSE_REPLACED, "replaced by a newer connection of the same agent")
    for minute in range(SHARED_REPLACEMENTS - 1):
        assert isinstance(policy.after(replaced, established=True, now=minute * 60.0), Retry)
    stop = policy.after(replaced, established=True, now=(SHARED_REPLACEMENTS - 1) * 60.0)
    assert isinstance(stop, Stop) and stop.exit_code is ExitCode.REFUSED
    assert f"replaced this one {SHARED_REPLACEMENTS} time(s) in 10 minutes: two agents use the same credentials" \
        in stop.message


def test_replacements_further_apart_than_the_window_are_not_counted_together() -> None:
    policy = reconnect()
    replaced = Closed(protocol.CLOSE_REPLACED)
    for attempt in range(3 * SHARED_REPLACEMENTS):
        decision = policy.after(replaced, established=True, now=attempt * SHARED_WINDOW / (SHARED_REPLACEMENTS - 1))
        assert isinstance(decision, Retry), attempt


def test_the_backoff_grows_per_attempt_and_starts_over_after_an_established_session() -> None:
    policy = reconnect()
    refused, lost = Refused(401, "unknown-token"), Closed(1006)
    delays = [policy.after(ending, established=established, now=0.0)
              for ending, established in [(refused, False), (refused, False), (lost, False), (lost, True)]]
    assert [d.delay for d in delays if isinstance(d, Retry)] == [
        SLOWLY.delay(0, HighestDelay()), SLOWLY.delay(1, HighestDelay()), SOON.delay(2, HighestDelay()),
        SOON.delay(0, HighestDelay())]


@pytest.mark.parametrize(("retry_count", "limit"), [(0, 1.0), (1, 2.0), (2, 4.0), (5, 32.0), (6, 60.0), (1000, 60.0)])
def test_backoff_doubles_up_to_the_cap_with_full_jitter(retry_count: int, limit: float) -> None:
    backoff = retry.Backoff(base=1.0, cap=60.0)
    assert backoff.delay(retry_count, HighestDelay()) == limit
    assert 0 <= backoff.delay(retry_count, random.Random(retry_count)) <= limit


@pytest.mark.parametrize(("header", "code"), [
    ("unknown-token", "unknown-token"), (None, ""), ("", ""),
    ("Unknown Token", ""), ("x\r\ninjected: yes", ""), ("a" * 65, ""),  # only a code reaches the log
])
def test_only_a_reason_code_is_taken_from_the_refusal_header(header: str | None, code: str) -> None:
    assert retry.reason_code(header) == code


def test_the_permanent_exit_codes_are_those_of_errors_no_restart_fixes() -> None:
    assert retry.PERMANENT == {ExitCode.CONFIG, ExitCode.STATE, ExitCode.REFUSED}
    assert ExitCode.STOPPED not in retry.PERMANENT and 1 not in retry.PERMANENT  # 1: a crash, worth a restart
