"""`plan --dry-run` plans what `run` would: its policy, the stored overrides, its schedule."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from pathlib import Path

import pytest

from siteagent.agent.api.overrides import Override
from siteagent.agent.api.store import DB_NAME, Store
from siteagent.sim.site import SimSite

BASE = "127.1.204.21"


def write_config(tmp_path: Path, addresses: list[str], policy: str) -> Path:
    listed = "".join(f'[[inventory.miners]]\naddress = "{a}"\n' for a in addresses)
    cfg = tmp_path / "siteagent.toml"
    cfg.write_text(
        "[site]\ncap_w = 39000\nsafety_margin_w = 0\n"
        f'[policy]\nname = "{policy}"\n'
        "[telemetry]\ntimeout_s = 3.0\n"
        f"[inventory]\n{listed}"
        f'[state]\ndir = "{tmp_path / "state"}"\n'
    )
    return cfg


def store_override(state_dir: Path) -> None:
    """A 6 kW cap override, as the API stores one."""
    now = time.time()
    store = Store.in_dir(state_dir)
    store.insert_override(
        Override(
            id="ovr-6kw",
            kind="cap",
            actor="alice",
            reason="feeder work",
            created_at_unix_s=now,
            expires_at_unix_s=now + 3600,
            cap_w=6000.0,
        )
    )
    store.close()


def digest(state_dir: Path) -> str:
    # The database itself (a WAL reader may add its empty -wal and -shm files beside it).
    return hashlib.sha256((state_dir / DB_NAME).read_bytes()).hexdigest()


async def plan_dry_run(cfg: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "siteagent.agent.tools.cli",
        "plan",
        "--dry-run",
        "--config",
        str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("policy", ["efficiency-capping", "economic"])
async def test_dry_run_plans_with_the_stored_override_and_the_configured_policy(
    tmp_path: Path, policy: str
) -> None:
    state = tmp_path / "state"
    store_override(state)
    before = digest(state)
    # VNish keeps a web connection per miner: the dry run must close it.
    async with SimSite(2, base_address=BASE, backends=["braiins", "vnish"]) as site:
        cfg = write_config(tmp_path, [m.address for m in site.miners], policy)
        code, out, err = await plan_dry_run(cfg)
    assert code == 0, err
    assert "override ovr-6kw: cap site 6000 W (by alice)" in out
    assert "effective cap 6000 W (from ovr-6kw)" in out, out
    assert f"plan ({policy}): " in out
    assert "Unclosed" not in err, err
    assert "Traceback" not in err, err
    # Read only: nothing ended, audited or rewritten.
    assert digest(state) == before
    store = Store.read_only(state / DB_NAME)
    assert [o.id for o in store.open_overrides()] == ["ovr-6kw"]
    assert store.audit(10) == []
    store.close()
