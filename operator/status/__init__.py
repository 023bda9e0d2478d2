"""Status: what the operator's objects show (rendering.py, health.py, repositories.py) and its
writes (writer.py)."""
