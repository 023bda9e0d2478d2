"""The API's names and formats, as every part of the operator uses them: the group and version
of restic-manager's kinds, the finalizer, object keys, Kubernetes' timestamps, owner references
and the name of an Agent's token Secret."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, NamedTuple

GROUP = "resticmanager.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
TOKEN_KEY = "token"
# Held by a ResticJob from its creation (fires) or dispatch (kubectl's) until it ends, so that
# deleting it while it runs reaches the operator, which cancels restic on the agent.
FINALIZER = "resticmanager.io/cancel-on-delete"

Body = Mapping[str, Any]


class ObjectKey(NamedTuple):
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> ObjectKey:
        namespace, _, name = text.partition("/")
        return cls(namespace, name)

    @classmethod
    def of(cls, body: Body) -> ObjectKey:
        return cls(body["metadata"]["namespace"], body["metadata"]["name"])


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, second precision, as Kubernetes writes its own times."""
    return moment.astimezone(timezone.utc).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def owner_reference(kind: str, key: ObjectKey, uid: str) -> dict[str, Any]:
    """An owner reference to the operator's object ``key`` of ``kind``: its controller, and
    the garbage collector deletes what it owns only after it."""
    return {"apiVersion": API_VERSION, "kind": kind, "name": key.name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def token_secret_name(agent: str) -> str:
    """``<agent>-agent-token``, shortened with a hash where an Agent name is very long."""
    name = f"{agent}-agent-token"
    if len(name) <= 253:
        return name
    return f"{agent[:230]}-{hashlib.sha256(agent.encode()).hexdigest()[:8]}-agent-token"
