"""`siteagent demo --meter`: the agent reads the simulated site's meter and holds the cap."""

from __future__ import annotations

import io

import pytest

from siteagent.agent.tools.demo import run_demo


@pytest.mark.slow
async def test_the_metered_demo_holds_the_cap_by_the_simulators_true_power() -> None:
    out = io.StringIO()
    report = await run_demo(
        10,
        gpu_nodes=1,
        gpus_per_node=4,
        base="127.4.40.1",
        gpu_base="127.4.41.1",
        time_scale=0.6,
        out=out,
        meter=True,
        meter_address="127.4.42.1",
    )
    assert report["meter"] is True
    assert report["cap_changes"] == 2
    # The samples are the simulator's truth: its auxiliary load and what the miners
    # under-report included.
    assert report["seconds_over_cap"] == 0, out.getvalue()
    lowered = [
        s for s in report["samples"] if s["cap_w"] == min(c["cap_w"] for c in report["caps"])
    ]
    assert lowered[-1]["site_power_w"] <= lowered[-1]["cap_w"]
