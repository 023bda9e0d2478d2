"""The agent's settings: flags > environment > config file > defaults, and errors that say what to fix."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from restic_manager.agent import config
from restic_manager.agent.policy import HostPolicy
from restic_manager.agent.main import add_arguments


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    return path


def load(argv: list[str], *, environ: dict[str, str] | None = None, default_file: Path | None = None,
         hostname: str = "web-01") -> config.AgentConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config.load(parser.parse_args(argv), environ=environ or {},
                       default_file=default_file or Path("/nonexistent/agent.yaml"), hostname=hostname)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("flag", "env", "in_file", "expected"),
    [
        ("wss://flag", "wss://env", "wss://file", "wss://flag"),
        (None, "wss://env", "wss://file", "wss://env"),
        (None, None, "wss://file", "wss://file"),
        ("wss://flag", None, "wss://file", "wss://flag"),
    ],
)
def test_flags_win_over_the_environment_which_wins_over_the_file(
    tmp_path: Path, token: Path, flag: str | None, env: str | None, in_file: str, expected: str
) -> None:
    config_file = write(tmp_path / "agent.yaml", f"server: {in_file}\ntokenFile: {token}\n")
    argv = ["--config", str(config_file)] + (["--server", flag] if flag else [])
    environ = {"RESTIC_MANAGER_SERVER": env} if env else {}

    assert load(argv, environ=environ).server == expected


def test_every_setting_from_the_environment(tmp_path: Path, token: Path) -> None:
    settings = load([], environ={
        "RESTIC_MANAGER_SERVER": "ws://127.0.0.1:8443/agent",
        "RESTIC_MANAGER_TOKEN_FILE": str(token),
        "RESTIC_MANAGER_STATE_DIR": str(tmp_path / "state"),
        "RESTIC_MANAGER_AGENT_NAME": "db-02",
        "RESTIC_MANAGER_RESTIC": "/opt/restic/bin/restic",
        "RESTIC_MANAGER_INSECURE": "yes",
        "RESTIC_MANAGER_LOG_LEVEL": "debug",
        "RESTIC_MANAGER_BACKUP_PATH": "/etc, /home",
        "RESTIC_MANAGER_RESTORE_TARGET": "/srv/restore",
        "RESTIC_MANAGER_REPOSITORY": "s3:https://s3.example.com/*",
    })

    assert settings == config.AgentConfig(
        server="ws://127.0.0.1:8443/agent", token_file=token, ca_file=None, state_dir=tmp_path / "state",
        agent_name="db-02", restic="/opt/restic/bin/restic", insecure=True, log_level="DEBUG",
        policy=HostPolicy(backup_paths=("/etc", "/home"), restore_targets=("/srv/restore",),
                          repositories=("s3:https://s3.example.com/*",),
                          protected=(str(token), str(tmp_path / "state"))),
    )


def test_every_setting_from_the_config_file(tmp_path: Path, token: Path) -> None:
    ca = write(tmp_path / "ca.crt", "")
    config_file = write(tmp_path / "agent.yaml", f"""
server: wss://operator.example.com/agent
tokenFile: {token}
caFile: {ca}
stateDir: {tmp_path}/state
agentName: db-02
restic: /usr/local/bin/restic
insecure: false
logLevel: WARNING
backupPaths: [/etc, /home]
restoreTargets: [/srv/restore, /home]
repositories: ["rest:https://backup.example.com/*"]
""")

    assert load(["--config", str(config_file)]) == config.AgentConfig(
        server="wss://operator.example.com/agent", token_file=token, ca_file=ca, state_dir=tmp_path / "state",
        agent_name="db-02", restic="/usr/local/bin/restic", insecure=False, log_level="WARNING",
        policy=HostPolicy(backup_paths=("/etc", "/home"), restore_targets=("/srv/restore", "/home"),
                          repositories=("rest:https://backup.example.com/*",),
                          protected=(str(token), str(tmp_path / "state"), str(config_file))),
    )


def test_what_the_host_allows_defaults_to_backups_of_anything_and_restores_into_one_directory(token: Path) -> None:
    settings = load(["--server", "wss://op/agent", "--token-file", str(token), "--state-dir", "/var/lib/rm"])

    assert settings.policy == HostPolicy(backup_paths=("/",), restore_targets=("/var/lib/restic-manager-restore",),
                                         repositories=("*",), protected=(str(token), "/var/lib/rm"))


def test_repeated_flags_make_a_list(token: Path) -> None:
    settings = load(["--server", "wss://op/agent", "--token-file", str(token),
                     "--backup-path", "/etc", "--backup-path", "/srv", "--restore-target", "/srv/restore"])

    assert (settings.policy.backup_paths, settings.policy.restore_targets) == (("/etc", "/srv"), ("/srv/restore",))


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--backup-path", "etc"], {}, "backup path 'etc' (from --backup-path): expected an absolute path"),
    ([], {"RESTIC_MANAGER_RESTORE_TARGET": "/srv,restore"},
     "restore target 'restore' (from RESTIC_MANAGER_RESTORE_TARGET): expected an absolute path"),
    ([], {"RESTIC_MANAGER_REPOSITORY": "s3:*,,"}, "repositories 's3:*,,' (from RESTIC_MANAGER_REPOSITORY): "
     "expected a list of non-empty strings"),
])
def test_bad_lists_are_refused_naming_the_setting(
    token: Path, argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(config.ConfigError) as refused:
        load(["--server", "wss://op/agent", "--token-file", str(token), *argv], environ=environ)
    assert str(refused.value) == message


def test_defaults_and_the_agent_name_from_the_host_name(token: Path) -> None:
    settings = load(["--server", "wss://op/agent", "--token-file", str(token)], hostname="Web-01.Example.COM")

    assert settings.agent_name == "web-01.example.com"
    assert (settings.state_dir, settings.restic, settings.insecure, settings.ca_file, settings.log_level) == (
        Path("/var/lib/restic-manager"), "restic", False, None, "INFO"
    )


def test_the_default_config_file_is_read_when_it_exists(tmp_path: Path, token: Path) -> None:
    default = write(tmp_path / "agent.yaml", f"server: wss://from-default/agent\ntokenFile: {token}\n")

    assert load([], default_file=default).server == "wss://from-default/agent"


def test_the_environment_can_turn_off_what_the_file_turned_on(tmp_path: Path, token: Path) -> None:
    config_file = write(tmp_path / "agent.yaml", f"server: wss://op/agent\ntokenFile: {token}\ninsecure: true\n")

    assert load(["--config", str(config_file)], environ={"RESTIC_MANAGER_INSECURE": "false"}).insecure is False


@pytest.mark.parametrize(
    ("argv", "environ", "file_text", "message"),
    [
        ([], {}, None, "no operator server given: pass --server URL, set RESTIC_MANAGER_SERVER"),
        (["--server", "wss://op/agent"], {}, None, "no token file given: pass --token-file PATH"),
        (["--server", "wss://op/agent", "--token-file", "/nonexistent/token"], {}, None,
         "token file /nonexistent/token (from --token-file): cannot read it: No such file or directory"),
        (["--server", "https://op/agent"], {}, None, "server 'https://op/agent' (from --server): expected wss://"),
        ([], {"RESTIC_MANAGER_SERVER": "ws://op/agent"}, None,
         "server 'ws://op/agent' (from RESTIC_MANAGER_SERVER): plain ws:// would send the token"),
        (["--server", "wss://op/agent"], {"RESTIC_MANAGER_INSECURE": "maybe"}, None,
         "insecure 'maybe' (from RESTIC_MANAGER_INSECURE): expected true or false"),
        ([], {}, "server: wss://op/agent\ntoken_file: /x\nsevrer: y\n",
         "unknown key(s) sevrer, token_file; known keys: server, tokenFile, caFile"),
        ([], {}, "server: [wss://op/agent\n", "not valid YAML"),
        ([], {}, "- server\n", "must be a mapping of settings"),
        ([], {}, "server: 8443\n", "server 8443 (from "),
        (["--server", "ws://op/agent", "--insecure", "--ca-file", "/etc/ca.crt"], {}, None,
         "ca file /etc/ca.crt (from --ca-file): only used with a wss:// server"),
        (["--server", "wss://op/agent", "--agent-name", "Web_01"], {}, None,
         "agent name 'Web_01' (from --agent-name): must be lowercase letters"),
        (["--server", "wss://op/agent", "--agent-name", "web-01\n"], {}, None,
         "agent name 'web-01\\n' (from --agent-name): must be lowercase letters"),
        (["--server", "wss://op/agent", "--log-level", "chatty"], {}, None, "log level 'chatty' (from --log-level)"),
    ],
)
def test_errors_name_the_setting_its_source_and_the_fix(
    tmp_path: Path, token: Path, argv: list[str], environ: dict[str, str], file_text: str | None, message: str
) -> None:
    if "--token-file" not in argv and "no token file" not in message:
        argv = [*argv, "--token-file", str(token)]
    if file_text is not None:
        argv = [*argv, "--config", str(write(tmp_path / "agent.yaml", file_text))]

    with pytest.raises(config.ConfigError) as raised:
        load(argv, environ=environ)
    assert message in str(raised.value)


def test_an_empty_token_file_is_an_error(tmp_path: Path) -> None:
    empty = write(tmp_path / "token", "\n")

    with pytest.raises(config.ConfigError, match=r"token file .*/token \(from --token-file\): is empty"):
        load(["--server", "wss://op/agent", "--token-file", str(empty)])


def test_a_host_name_that_is_no_agent_name_asks_for_one(token: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"agent name 'web_01' \(the host name; set --agent-name"):
        load(["--server", "wss://op/agent", "--token-file", str(token)], hostname="WEB_01")


def test_an_explicit_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"config file .*/missing.yaml: does not exist"):
        load([], environ={"RESTIC_MANAGER_CONFIG": str(tmp_path / "missing.yaml")})


def test_a_ca_file_that_cannot_be_loaded_is_an_error(tmp_path: Path, token: Path) -> None:
    settings = load(["--server", "wss://op/agent", "--token-file", str(token), "--ca-file", str(tmp_path / "none.crt")])

    with pytest.raises(config.ConfigError, match=r"ca file .*/none.crt: cannot load it"):
        settings.ssl_context()
