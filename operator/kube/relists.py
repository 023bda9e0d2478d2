"""What a watch that listed again may have missed: the deletions while it was gone.

kopf starts a watch over with a fresh listing when the apiserver no longer keeps the version
it was at (410 Gone, after a long disconnection), and hands the listed objects on as events of
type None; nothing tells of the objects deleted meanwhile. So an object of the view that such
a listing does not bring is a suspect: once the listing has had time to come through, each is
read, and dropped only if the apiserver says it is gone (controller/wiring.py does the reads).

A listing's events are told from the startup listing's, which are of type None too, by the
object: the startup listing is the first event kopf's event handlers see of it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from restic_manager.operator.kube.api import ObjectKey

# (plural, namespace): one watch's objects; namespace None for a watch of every namespace.
Scope = tuple[str, str | None]


class Relists:
    """The suspects of each listing under way, by the watch it is of.

    ``namespaced``: the operator watches a list of namespaces, one watch per namespace."""

    def __init__(self, *, namespaced: bool) -> None:
        self._namespaced = namespaced
        self._evented: dict[str, set[ObjectKey]] = {}  # per plural: the objects events were seen of
        self._suspects: dict[Scope, set[ObjectKey]] = {}

    def scope(self, plural: str, key: ObjectKey) -> Scope:
        return plural, key.namespace if self._namespaced else None

    def event(self, plural: str, event_type: str | None, key: ObjectKey, view: Iterable[ObjectKey]) -> Scope | None:
        """An event from kopf's event handlers, with the keys the view holds of ``plural``; the
        scope whose listing it shows to have begun, if it does."""
        seen = self._evented.setdefault(plural, set())
        if event_type == "DELETED":
            seen.discard(key)
            return None
        if key not in seen:
            seen.add(key)  # the startup listing's event of it, or a new object's first
            return None
        scope = self.scope(plural, key)
        if event_type is not None or scope in self._suspects:
            return None
        self._suspects[scope] = {one for one in view if one != key and self.scope(plural, one) == scope}
        return scope

    def observed(self, plural: str, key: ObjectKey) -> None:
        """The watch brought ``key``: no suspect."""
        if self._suspects:
            self._suspects.get(self.scope(plural, key), set()).discard(key)

    def take(self, scope: Scope) -> set[ObjectKey]:
        """The listing has had its time: the objects it did not bring, for reading."""
        return self._suspects.pop(scope, set())

    def give_back(self, scope: Scope, keys: Iterable[ObjectKey]) -> None:
        """Suspects not read yet (the apiserver did not answer): read them on the next try."""
        self._suspects.setdefault(scope, set()).update(keys)
