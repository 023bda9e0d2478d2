"""The agents' side: the WebSocket server and its sessions (server.py), who an agent is
(identity.py, authenticator.py), what one may cost (limits.py), which Schedules target it
(targets.py) and the pushes of its schedule set (pushes.py)."""
