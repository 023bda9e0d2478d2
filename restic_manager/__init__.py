"""restic-manager: restic backups across a fleet of hosts, driven from Kubernetes."""

__version__ = "0.1.0"
