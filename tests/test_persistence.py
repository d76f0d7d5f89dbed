"""Overrides across a real `kill -9`: the same view after restart, and no comeback once expired.

A real `siteagent run` process with a config whose miners do not exist (nothing
listens at their addresses, so they read as unreachable), driven over HTTP.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_store import drop_wal_transactions

from siteagent.agent.api.auth import Scope, create_token
from siteagent.agent.tools.cli import EXIT_NEEDS_OPERATOR

PORT_RE = re.compile(r"override API on http://127\.0\.0\.1:(\d+)")


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def exit_and_output(self, timeout_s: float = 60.0) -> tuple[int, str]:
        """Wait for the process to end on its own: its exit code and all it wrote to stderr."""
        code = self.popen.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.popen.stderr is not None and not self.popen.stderr.closed:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return code, "".join(self.lines)

    def port(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if m := PORT_RE.search(line):
                    return int(m.group(1))
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("agent did not start:\n" + "".join(self.lines))


def start(config: Path, *flags: str, notify: str = "") -> Proc:
    popen = subprocess.Popen(
        [sys.executable, "-m", "siteagent.agent.tools.cli", "run", "--config", str(config), *flags],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "NOTIFY_SOCKET": notify},
    )
    proc = Proc(popen)

    def drain() -> None:
        assert popen.stderr is not None
        for line in popen.stderr:
            proc.lines.append(line)
        popen.stderr.close()

    threading.Thread(target=drain, daemon=True).start()
    return proc


def start_ready(config: Path, *flags: str) -> Proc:
    """Start the agent and wait for its READY=1 (its SIGTERM handler is in place from then on)."""
    name = f"siteagent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(f"\0{name}")
        sock.settimeout(60)
        proc = start(config, *flags, notify=f"@{name}")
        while b"READY=1" not in sock.recv(4096).split(b"\n"):
            pass
    return proc


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, str, list[Proc]]]:
    yield from _site(tmp_path, "127.1.222")


@pytest.fixture
def store_site(tmp_path: Path) -> Iterator[tuple[Path, str, list[Proc]]]:
    yield from _site(tmp_path, "127.1.201")


def _site(tmp_path: Path, net: str) -> Iterator[tuple[Path, str, list[Proc]]]:
    tokens = tmp_path / "tokens"
    token = create_token(tokens, "alice", Scope.ADMIN)
    config = tmp_path / "siteagent.toml"
    miners = "".join(
        f'[[inventory.miners]]\naddress = "{net}.{i + 1}"\nid = "m{i}"\n' for i in range(4)
    )
    config.write_text(
        f"""
[site]
cap_w = 20000
[telemetry]
interval_s = 60
timeout_s = 0.2
[control]
interval_s = 60
[api]
port = 0
tokens_file = "{tokens}"
[metrics]
port = 0
[state]
dir = "{tmp_path / "state"}"
{miners}"""
    )
    procs: list[Proc] = []
    yield config, token, procs
    for p in procs:
        if p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait()


def view(client: httpx.Client) -> dict[str, Any]:
    status = client.get("/v1/status").json()
    overrides = client.get("/v1/overrides").json()
    for o in overrides:
        o.pop("remaining_s")
    keep = ("site_cap_w", "effective_cap_w", "cap_source", "modes", "pins", "active_overrides")
    return {"status": {k: status[k] for k in keep}, "overrides": overrides}


def test_overrides_survive_kill_9_and_expire_while_down(
    site: tuple[Path, str, list[Proc]],
) -> None:
    config, token, procs = site
    headers = {"Authorization": f"Bearer {token}"}
    first = start(config)
    procs.append(first)
    url = f"http://127.0.0.1:{first.port()}"
    with httpx.Client(base_url=url, headers=headers, timeout=10) as c:
        for body in (
            {"kind": "cap", "cap_w": 15000, "ttl_s": 3600, "reason": "utility"},
            {"kind": "mode", "mode": "monitor-only", "ttl_s": 3600, "reason": "maintenance"},
            {"kind": "pin", "device_id": "m1", "power_w": 1000, "ttl_s": 3, "reason": "short"},
        ):
            r = c.post("/v1/overrides", json=body)
            assert r.status_code == 201, r.text
        short = r.json()["id"]
        before = view(c)
    assert before["status"]["pins"] == 1 and before["status"]["effective_cap_w"] == 15000
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait()
    time.sleep(max(0.0, r.json()["expires_at_unix_s"] - time.time()) + 0.1)

    second = start(config)
    procs.append(second)
    with httpx.Client(base_url=f"http://127.0.0.1:{second.port()}", headers=headers) as c:
        after = view(c)
        gone = c.get(f"/v1/overrides/{short}").json()
        audit = c.get("/v1/audit").json()
    expected = {
        "status": {**before["status"], "pins": 0, "active_overrides": 2},
        "overrides": [o for o in before["overrides"] if o["id"] != short],
    }
    assert after == expected
    assert gone["state"] == "expired" and gone["ended_by"] == "siteagent"
    assert any(
        a["override_id"] == short and "expired while the agent was down" in a["result"]
        for a in audit
    )
    assert sum(1 for a in audit if a["status"] == 201) == 3  # the accepted writes, kept
    second.popen.send_signal(signal.SIGTERM)
    assert second.popen.wait(timeout=15) == 0


def test_an_emptied_store_is_refused_then_restored_from_its_backup(
    store_site: tuple[Path, str, list[Proc]],
) -> None:
    config, token, procs = store_site
    headers = {"Authorization": f"Bearer {token}"}
    db = config.parent / "state" / "siteagent.db"
    first = start_ready(config)
    procs.append(first)
    with httpx.Client(base_url=f"http://127.0.0.1:{first.port()}", headers=headers) as c:
        for body in (
            {"kind": "cap", "cap_w": 15000, "ttl_s": 3600, "reason": "utility"},
            {"kind": "mode", "mode": "monitor-only", "ttl_s": 3600, "reason": "maintenance"},
        ):
            assert c.post("/v1/overrides", json=body).status_code == 201
        before = view(c)
    first.popen.send_signal(signal.SIGTERM)
    assert first.popen.wait(timeout=15) == 0
    second = start_ready(config)  # a clean start: backs the store up
    procs.append(second)
    second.popen.send_signal(signal.SIGTERM)
    assert second.popen.wait(timeout=15) == 0

    db.write_bytes(b"")
    third = start(config)
    procs.append(third)
    code, out = third.exit_and_output()
    # Not 1, which systemd retries every RestartSec: an emptied store stays emptied.
    assert code == EXIT_NEEDS_OPERATOR == 78, out
    assert f"{db} is empty (0 bytes); not starting on it" in out
    assert "(exit 78: not restarted until an operator acts)" in out
    assert "siteagent run --restore-backup" in out
    assert "override API on" not in out

    fourth = start_ready(config, "--restore-backup")
    procs.append(fourth)
    with httpx.Client(base_url=f"http://127.0.0.1:{fourth.port()}", headers=headers) as c:
        after = view(c)
        audit = c.get("/v1/audit").json()
    assert after == before
    restored = [a for a in audit if a["action"] == "restore-backup"]
    assert len(restored) == 1 and "from backup " in restored[0]["result"]
    assert any(f"restored {db} from backup" in line for line in fourth.lines)
    assert len(list(db.parent.glob("siteagent.db.damaged-*"))) == 1
    fourth.popen.send_signal(signal.SIGTERM)
    assert fourth.popen.wait(timeout=15) == 0


def test_a_wal_damaged_after_kill_9_is_refused_not_started_short(
    store_site: tuple[Path, str, list[Proc]],
) -> None:
    config, token, procs = store_site
    headers = {"Authorization": f"Bearer {token}"}
    db = config.parent / "state" / "siteagent.db"
    first = start_ready(config)
    procs.append(first)
    with httpx.Client(base_url=f"http://127.0.0.1:{first.port()}", headers=headers) as c:
        for i in range(31):
            body = {"kind": "cap", "cap_w": 19000 - 10 * i, "ttl_s": 3600, "reason": "dr"}
            r = c.post("/v1/overrides", json=body)
            assert r.status_code == 201, r.text
    last = r.json()["id"]
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait()
    # The 31st override's insert and its audit record: committed, then torn in the WAL.
    drop_wal_transactions(Path(f"{db}-wal"), 2)

    second = start(config)
    procs.append(second)
    code, out = second.exit_and_output()
    assert code == EXIT_NEEDS_OPERATOR, out
    assert "it holds 30 override(s)" in out and "but 31 override(s)" in out
    assert f"{last} (cap site 18700 W by alice" in out

    third = start_ready(config, "--restore-backup")
    procs.append(third)
    with httpx.Client(base_url=f"http://127.0.0.1:{third.port()}", headers=headers) as c:
        overrides = c.get("/v1/overrides").json()
        audit = c.get("/v1/audit").json()
    assert len(overrides) == 30 and last not in {o["id"] for o in overrides}
    restored = [a for a in audit if a["action"] == "restore-backup"]
    assert len(restored) == 1 and f"{last} (cap site 18700 W" in restored[0]["result"]
    assert "from the store as found" in restored[0]["result"]
    third.popen.send_signal(signal.SIGTERM)
    assert third.popen.wait(timeout=15) == 0
