"""The agent's settings: from flags, the environment, a YAML file and defaults, in that order.

Every setting has the three spellings of one row of `OPTIONS`: a flag (`--token-file`), an
environment variable (`RESTIC_MANAGER_TOKEN_FILE`) and a config-file key (`tokenFile`).
`load` merges them (flags > environment > file > defaults), checks the result and raises
`ConfigError` naming the setting, where its value came from and what to do.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from restic_manager import protocol
from restic_manager.agent import policy
from restic_manager.agent.policy import HostPolicy

ENV_PREFIX = "RESTIC_MANAGER_"
DEFAULT_CONFIG_FILE = Path("/etc/restic-manager/agent.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/restic-manager")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(Exception):
    """A setting the agent cannot start with."""


@dataclass(frozen=True)
class Option:
    name: str  # AgentConfig field and argparse dest
    key: str  # config-file key
    kind: type  # str, Path, bool, or list (of strings: a repeated flag, commas in the environment)
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS = (
    Option("server", "server", str, "the operator's agent endpoint, e.g. wss://restic-manager.example.com/agent "
           "(ws:// only with --insecure)", "URL"),
    Option("token_file", "tokenFile", Path, "file holding this agent's bearer token (read again on every "
           "connect, so a rotated token is picked up)", "PATH"),
    Option("ca_file", "caFile", Path, "CA bundle that signed the operator's certificate (default: the "
           "system's CAs)", "PATH"),
    Option("state_dir", "stateDir", Path, "where schedule cursors and undelivered messages are kept "
           f"(default: {DEFAULT_STATE_DIR})", "DIR"),
    Option("agent_name", "agentName", str, "this host's Agent name in Kubernetes (default: the host name, "
           "lowercased)", "NAME"),
    Option("restic", "restic", str, "the restic binary: a path, or a name looked up on PATH (default: restic)",
           "PATH"),
    Option("insecure", "insecure", bool, "allow a plain ws:// server: the token and repository credentials "
           "then cross the network unencrypted; for local tests only"),
    Option("log_level", "logLevel", str, f"one of {', '.join(LOG_LEVELS)} (default: INFO)", "LEVEL"),
    Option("backup_path", "backupPaths", list, "a backup may read only at or under these paths (repeat the "
           f"flag; default: {', '.join(policy.DEFAULT_BACKUP_PATHS)}); the agent's token, state and config are "
           "never backed up", "PATH"),
    Option("restore_target", "restoreTargets", list, "a restore may write only at or under these paths "
           f"(repeat the flag; default: {policy.DEFAULT_RESTORE_TARGET})", "PATH"),
    Option("repository", "repositories", list, "repository URLs this host works with, as shell patterns "
           "(repeat the flag; default: *, any), e.g. 's3:https://s3.example.com/backups/*'", "PATTERN"),
)
_BY_KEY = {option.key: option for option in OPTIONS}


@dataclass(frozen=True)
class AgentConfig:
    server: str
    token_file: Path
    ca_file: Path | None
    state_dir: Path
    agent_name: str
    restic: str
    insecure: bool
    log_level: str
    policy: HostPolicy = HostPolicy()

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for a wss:// server (None for ws://)."""
        if not self.server.startswith("wss://"):
            return None
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"ca file {self.ca_file}: cannot load it: {error}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="PATH",
                        help=f"YAML config file (default: {DEFAULT_CONFIG_FILE} if it exists; "
                             f"also {ENV_PREFIX}CONFIG)")
    for option in OPTIONS:
        if option.kind is bool:
            # default None, not False, so an absent flag does not hide the environment or the file
            parser.add_argument(option.flag, dest=option.name, action="store_true", default=None, help=option.help)
        elif option.kind is list:
            parser.add_argument(option.flag, dest=option.name, action="append", metavar=option.metavar,
                                help=option.help)
        else:
            parser.add_argument(option.flag, dest=option.name, metavar=option.metavar, help=option.help)
    parser.epilog = (
        "every option, three ways (a flag wins over the environment, the environment over the file):\n"
        f"  {'flag':<14} {'environment variable':<30} config-file key\n"
        + "\n".join(f"  {o.flag:<14} {o.env:<30} {o.key}" for o in OPTIONS)
        + "\n\nlists in the environment are comma-separated.\n\nexample config file:\n"
        "  server: wss://restic-manager.example.com/agent\n"
        "  tokenFile: /etc/restic-manager/token\n"
        "  caFile: /etc/restic-manager/ca.crt\n"
        "  backupPaths: [/etc, /home, /srv]\n"
        f"  restoreTargets: [{policy.DEFAULT_RESTORE_TARGET}]\n"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def load(
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    default_file: Path = DEFAULT_CONFIG_FILE,
    hostname: str | None = None,
) -> AgentConfig:
    """The agent's settings from `args` (as `add_arguments` defines them), the environment
    and the config file; raises ConfigError for anything it cannot start with."""
    environ = os.environ if environ is None else environ
    file_values, file_source = _read_file(args.config, environ, default_file)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        if getattr(args, option.name, None) is not None:
            raw, source = getattr(args, option.name), option.flag
        elif environ.get(option.env):
            raw, source = environ[option.env], option.env
        elif option.key in file_values:
            raw, source = file_values[option.key], f"{file_source}: {option.key}"
        else:
            continue
        values[option.name] = _convert(option, raw, source)
        sources[option.name] = source
    return _check(values, sources, hostname=hostname, config_file=Path(file_source) if file_source else None)


def _read_file(flag: Path | None, environ: Mapping[str, str], default_file: Path) -> tuple[dict[str, Any], str]:
    if flag is not None:
        path, explicit = flag, True
    elif environ.get(ENV_PREFIX + "CONFIG"):
        path, explicit = Path(environ[ENV_PREFIX + "CONFIG"]), True
    else:
        path, explicit = default_file, False
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path}: does not exist") from None
        return {}, ""
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read it: {error.strerror}") from None
    # Imported here: PyYAML is ~1 MB resident, which agents configured by flags and
    # environment alone (the DaemonSet's) need not carry.
    import yaml

    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: not valid YAML: {error}") from None
    if content is None:
        return {}, str(path)
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path}: must be a mapping of settings, e.g. 'server: wss://...'")
    unknown = sorted(str(key) for key in content if key not in _BY_KEY)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                          f"known keys: {', '.join(_BY_KEY)}")
    return content, str(path)


def _convert(option: Option, raw: object, source: str) -> object:
    if option.kind is list:
        items = raw.split(",") if isinstance(raw, str) and source == option.env else raw
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
            raise ConfigError(f"{option.key} {raw!r} (from {source}): expected a list of non-empty strings")
        return tuple(item.strip() for item in items)
    if option.kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(f"{option.name} {raw!r} (from {source}): expected true or false")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{option.name} {raw!r} (from {source}): expected a non-empty string")
    return Path(raw).expanduser() if option.kind is Path else raw


def _check(values: dict[str, Any], sources: dict[str, str], *, hostname: str | None,
           config_file: Path | None) -> AgentConfig:
    def origin(name: str) -> str:
        return f"(from {sources[name]})"

    server = values.get("server")
    if server is None:
        raise ConfigError("no operator server given: pass --server URL, set RESTIC_MANAGER_SERVER or put "
                          "'server: wss://...' in the config file")
    parts = urlsplit(server)
    if parts.scheme not in ("wss", "ws") or not parts.hostname:
        raise ConfigError(f"server {server!r} {origin('server')}: expected wss://HOST[:PORT]/PATH")
    insecure = values.get("insecure", False)
    if parts.scheme == "ws" and not insecure:
        raise ConfigError(f"server {server!r} {origin('server')}: plain ws:// would send the token and "
                          "repository credentials unencrypted; use wss:// or pass --insecure")
    ca_file = values.get("ca_file")
    if ca_file is not None and parts.scheme != "wss":
        raise ConfigError(f"ca file {ca_file} {origin('ca_file')}: only used with a wss:// server")

    token_file = values.get("token_file")
    if token_file is None:
        raise ConfigError("no token file given: pass --token-file PATH, set RESTIC_MANAGER_TOKEN_FILE or put "
                          "'tokenFile: PATH' in the config file (the token is in the Agent's Secret)")
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(f"token file {token_file} {origin('token_file')}: cannot read it: {error.strerror}") from None
    if not token:
        raise ConfigError(f"token file {token_file} {origin('token_file')}: is empty")

    if "agent_name" in values:
        agent_name = values["agent_name"]
        how = origin("agent_name")
    else:
        agent_name = (hostname or socket.gethostname()).lower()
        how = "(the host name; set --agent-name to choose another)"
    if not protocol.is_object_name(agent_name):
        raise ConfigError(f"agent name {agent_name!r} {how}: must be lowercase letters, digits, '-' and '.', "
                          "starting and ending with a letter or digit, as a Kubernetes object name")

    log_level = values.get("log_level", "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log level {values['log_level']!r} {origin('log_level')}: expected one of "
                          f"{', '.join(LOG_LEVELS)}")

    for name in ("backup_path", "restore_target"):
        relative = [path for path in values.get(name, ()) if not path.startswith("/")]
        if relative:
            raise ConfigError(f"{name.replace('_', ' ')} {relative[0]!r} {origin(name)}: expected an absolute path")
    state_dir = values.get("state_dir", DEFAULT_STATE_DIR)
    own = [token_file, state_dir] + ([config_file] if config_file is not None else [])
    host_policy = HostPolicy(
        backup_paths=values.get("backup_path", policy.DEFAULT_BACKUP_PATHS),
        restore_targets=values.get("restore_target", (policy.DEFAULT_RESTORE_TARGET,)),
        repositories=values.get("repository", policy.DEFAULT_REPOSITORIES),
        protected=tuple(dict.fromkeys(os.path.realpath(path) for path in own)),
    )

    return AgentConfig(
        server=server,
        token_file=token_file,
        ca_file=ca_file,
        state_dir=state_dir,
        agent_name=agent_name,
        restic=values.get("restic", "restic"),
        insecure=insecure,
        log_level=log_level,
        policy=host_policy,
    )
