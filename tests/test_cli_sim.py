"""`siteagent sim --miners N --mix ...` as the operator types it: the inventory line first."""

from __future__ import annotations

import asyncio
import json
import sys

import pyasic

MIX = "antminer,braiins,luxos,vnish,whatsminer"


async def test_sim_command_prints_an_inventory_pyasic_agrees_with() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "siteagent.agent.tools.cli",
        "sim",
        "--miners",
        "5",
        "--mix",
        MIX,
        "--base",
        "127.1.198.1",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        inv = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        miners = inv["miners"]
        assert [m["backend"] for m in miners] == MIX.split(",")
        assert [m["address"] for m in miners] == [f"127.1.198.{i}" for i in range(1, 6)]
        for m in miners:
            assert m["nameplate_power_w"] > 0 and m["model"]
            found = await asyncio.wait_for(pyasic.get_miner(m["address"]), 30)
            assert found is not None, m
            assert m["model"].replace(" ", "") in str(found.model).replace(" ", ""), (m, found)
    finally:
        proc.terminate()
        await proc.wait()
