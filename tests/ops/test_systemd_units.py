"""The systemd unit: `systemd-analyze verify` is silent and the security score is "OK".

The settings the daemon relies on (notify, watchdog, a synchronous reload, the directories and
the operator group's access) are pinned here too, so a hardening edit cannot quietly drop one.
What they do on a real systemd is proven by ``test_nspawn.py``.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from tests.ops.conftest import REPO, need, run

UNIT = REPO / "systemd" / "agent-supervisor.service"
INSTALLED_BIN = "/opt/agent-supervisor/venv/bin/agent-supervisor"
MAX_EXPOSURE = 2.0  # systemd-analyze's "OK" band ends at 2.0


def directives(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key`` -> every value it is given in ``[Service]`` (keys may repeat)."""
    out: dict[str, list[str]] = defaultdict(list)
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        out[f"{section}{key}"].append(value)
    return dict(out)


def service(key: str) -> list[str]:
    return directives().get(f"[Service]{key}", [])


def verifiable_copy(tmp_path: Path) -> Path:
    """The unit, with its commands pointing at this interpreter when the installed CLI is
    absent: ``verify`` checks that every command is an executable file (only that), and
    only install.sh makes the real one."""
    text = UNIT.read_text()
    if not Path(INSTALLED_BIN).exists():
        text = text.replace(INSTALLED_BIN, sys.executable)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def test_verify_is_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify` exits 0 and prints nothing: any warning fails the test."""
    analyze = need("systemd-analyze", "systemd")
    r = run([analyze, "verify", str(verifiable_copy(tmp_path))])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_security_exposure_is_ok(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit 2.0 or better ("OK")."""
    analyze = need("systemd-analyze", "systemd")
    r = run([analyze, "security", "--offline=true", "--no-pager", str(verifiable_copy(tmp_path))])
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", r.stdout)
    assert m is not None, r.stdout
    score, verdict = float(m.group(1)), m.group(2)
    assert score <= MAX_EXPOSURE, f"exposure {score} {verdict}:\n{r.stdout}"
    assert verdict == "OK", r.stdout


def test_notify_watchdog_and_restart() -> None:
    """Type=notify with the main process only, a 30 s watchdog, restart on failure."""
    assert service("Type") == ["notify"]
    assert service("NotifyAccess") == ["main"]
    assert service("WatchdogSec") == ["30"]
    assert service("Restart") == ["on-failure"]
    assert service("ExecStart") == [
        f"{INSTALLED_BIN} run --config /etc/agent-supervisor/config.yaml"
    ]


def test_reload_is_synchronous_through_the_cli() -> None:
    """ExecReload asks the daemon over the control socket (the CLI returns its verdict);
    never `kill -HUP`, which returns before the reload is done."""
    (reload,) = service("ExecReload")
    assert reload.startswith(f"{INSTALLED_BIN} reload ")
    assert "kill" not in reload and "HUP" not in reload
    # The socket is named explicitly (a broken config cannot say where it is), and it is
    # the one install.sh writes into the config for operators' CLI.
    assert "--socket %t/agent-supervisor/control.sock" in reload
    install = (REPO / "deploy" / "install.sh").read_text()
    assert "SOCKET=/run/$NAME/control.sock" in install


def test_directories_user_and_operator_group() -> None:
    """A dedicated user; state and runtime dirs made by systemd; the group can reach the
    0660 socket through a 0750 runtime dir; the state dir comes from the environment."""
    assert service("User") == ["agent-supervisor"]
    assert service("Group") == ["agent-supervisor"]
    assert service("StateDirectory") == ["agent-supervisor"]
    assert service("RuntimeDirectory") == ["agent-supervisor"]
    assert service("RuntimeDirectoryMode") == ["0750"]
    assert service("UMask") == ["0027"]
    assert "AGENT_SUPERVISOR_STATE_DIR=/var/lib/agent-supervisor" in service("Environment")
    # No DynamicUser: its socket would be reachable by root only.
    assert service("DynamicUser") in ([], ["no"])


def test_hardening_the_brief_names_is_present() -> None:
    """The hardening settings are all there (the score alone would allow trading them)."""
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert service(key) == [value], key
    assert "@system-service" in service("SystemCallFilter")
    # PrivateUsers= would map every other uid to nobody: the control socket's peer-uid
    # check and its log line would see 65534 instead of the operator.
    assert service("PrivateUsers") in ([], ["no"])


def test_api_keys_come_as_credentials() -> None:
    """API keys are systemd credentials looked up by name in the credstore, so a key that
    is not there does not stop the service (an absolute path would: 243/CREDENTIALS)."""
    creds = service("LoadCredential")
    assert "openai_api_key" in creds and "anthropic_api_key" in creds
    assert all(":" not in c for c in creds)
