"""The controller: the wiring (wiring.py) of the operator's use cases — the Agents
(fleet.py), what each Schedule's status shows (schedules.py), an agent's fire (firing.py), a
job's end and the history it leaves (history.py)."""

from restic_manager.operator.controller.wiring import Controller

__all__ = ["Controller"]
