"""The compiled fill against the plain one-segment-at-a-time rule, written apart."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siteagent.domain import DeviceControls
from siteagent.policies.fill import CUT, SKIPPED, WHOLE, Clamp, Filled, Segments, fill


def sequential(
    seg: Segments,
    chains: np.ndarray,
    avail: list[float],
    start: list[float],
    caps: list[DeviceControls],
) -> tuple[list[int], list[float], list[float]]:
    """The rule as the policies first wrote it: one segment at a time, in order."""
    room_of = list(avail)
    level = list(start)
    status = [0] * len(seg.device)
    used = [0.0] * len(seg.device)
    for s in range(len(seg.device)):
        p = int(seg.pred[s])
        if p >= 0 and status[p] != WHOLE:
            status[s] = SKIPPED
            continue
        d = int(seg.device[s])
        nodes = {int(k) for k in chains[d]}
        room = min(room_of[k] for k in nodes)
        w = float(seg.width_w[s])
        if seg.all_or_nothing[s]:
            if w + float(seg.reserve_w[s]) <= room:
                status[s], used[s], level[d] = WHOLE, float(seg.added_w[s]), float(seg.level_w[s])
            else:
                status[s] = SKIPPED
        elif w <= room:
            status[s], used[s], level[d] = WHOLE, float(seg.added_w[s]), float(seg.level_w[s])
        else:
            new = max(caps[d].clamp_power_target_w(level[d] + max(room, 0.0)), level[d])
            status[s], used[s], level[d] = CUT, new - level[d], new
        for k in nodes:
            room_of[k] -= used[s]
    return status, used, level


@st.composite
def cases(
    draw: st.DrawFn,
) -> tuple[Segments, np.ndarray, list[float], list[float], list[DeviceControls]]:
    n_nodes = draw(st.integers(1, 7))
    parent = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n_nodes)]
    chain_of = []
    for i in range(n_nodes):
        c = [i]
        while parent[c[-1]] >= 0:
            c.append(parent[c[-1]])
        chain_of.append(c)
    depth = max(len(c) for c in chain_of)
    n_dev = draw(st.integers(1, 15))
    chains = np.zeros((n_dev, depth), np.intp)
    caps, start, pieces = [], [], []
    for d in range(n_dev):
        c = chain_of[draw(st.integers(0, n_nodes - 1))]
        chains[d] = c + [c[-1]] * (depth - len(c))
        lo = draw(st.integers(0, 2000))
        step = draw(st.sampled_from([0, 1, 7, 100, 250]))
        caps.append(
            DeviceControls(
                power_target=True,
                power_target_min_w=draw(st.sampled_from([None, float(lo)])),
                power_target_max_w=float(lo + draw(st.integers(0, 4000))),
                power_target_step_w=float(step),
            )
        )
        # Mostly as in the policies (a segment that may be cut starts at or above the
        # minimum), sometimes below it.
        level = float(lo + draw(st.integers(-300, 2000)))
        start.append(level)
        for j in range(draw(st.integers(1, 4))):
            w = float(draw(st.integers(1, 3000)))
            added = w - float(draw(st.integers(0, 20))) if w > 20 else w
            level += added
            whole = j == 0 and draw(st.booleans())
            reserve = float(draw(st.sampled_from([0, 0, 500]))) if whole else 0.0
            pieces.append((d, j, w, level, added, reserve, whole))
    order = draw(st.permutations(range(len(pieces))))
    pieces = [pieces[k] for k in order]
    pos = {(p[0], p[1]): i for i, p in enumerate(pieces)}
    seg = Segments(
        device=np.array([p[0] for p in pieces], np.intp),
        width_w=np.array([p[2] for p in pieces]),
        level_w=np.array([p[3] for p in pieces]),
        added_w=np.array([p[4] for p in pieces]),
        reserve_w=np.array([p[5] for p in pieces]),
        all_or_nothing=np.array([p[6] for p in pieces], bool),
        pred=np.array([pos.get((p[0], p[1] - 1), -1) for p in pieces], np.intp),
    )
    avail = [float(draw(st.integers(-500, 20_000))) for _ in range(n_nodes)]
    return seg, chains, avail, start, caps


def run_fill(
    seg: Segments,
    chains: np.ndarray,
    avail: list[float],
    start: list[float],
    caps: list[DeviceControls],
) -> Filled:
    def col(xs: list[float | None]) -> np.ndarray:
        return np.array([np.nan if x is None else x for x in xs])

    clamp = Clamp(
        col([c.power_target_min_w for c in caps]),
        col([c.power_target_max_w for c in caps]),
        col([c.power_target_step_w for c in caps]),
    )
    return fill(seg, chains, np.array(avail), np.array(start), clamp)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fill_decides_every_segment_as_the_sequential_rule(
    case: tuple[Segments, np.ndarray, list[float], list[float], list[DeviceControls]],
) -> None:
    seg, chains, avail, start, caps = case
    status, used, level = sequential(seg, chains, avail, start, caps)
    got = run_fill(*case)
    assert got.status.tolist() == status
    assert got.used_w.tolist() == used
    assert got.level_w.tolist() == level


def test_room_left_is_the_limit_less_what_was_taken() -> None:
    # 3 levels: site (0) > 10 feeders > 100 racks; 2,000 devices, 3 segments each.
    rng = np.random.default_rng(1)
    n_dev, racks = 2000, 100
    rack_of = rng.integers(0, racks, n_dev)
    chains = np.stack([11 + rack_of, 1 + rack_of % 10, np.zeros(n_dev, np.intp)], axis=1)
    width = rng.integers(100, 1500, (n_dev, 3)).astype(float)
    level = np.cumsum(width, axis=1)
    seg = Segments(
        device=np.repeat(np.arange(n_dev), 3),
        width_w=width.ravel(),
        level_w=level.ravel(),
        added_w=width.ravel(),
        reserve_w=np.zeros(3 * n_dev),
        all_or_nothing=np.tile([True, False, False], n_dev),
        pred=np.where(np.tile([0, 1, 1], n_dev) == 1, np.arange(3 * n_dev) - 1, -1),
    )
    avail = np.r_[0.6 * width.sum(), np.full(10, 1e9), np.full(racks, 30_000.0)]
    nan = np.full(n_dev, np.nan)
    got = fill(seg, chains, avail, np.zeros(n_dev), Clamp(nan, nan, np.ones(n_dev)))
    per_rack = np.bincount(rack_of, weights=got.level_w, minlength=racks)
    assert per_rack.max() <= 30_000.0
    assert got.level_w.sum() <= avail[0]
    assert np.allclose(got.avail_w[11:], 30_000.0 - per_rack)
    assert got.avail_w[0] == avail[0] - got.used_w.sum()
    # Some racks fill: segments are cut or skipped there, and the cap binds nowhere else.
    assert (got.status == CUT).any() and (got.status == SKIPPED).any()


def test_a_kernel_numba_cannot_cache_is_compiled_uncached_and_still_runs() -> None:
    # Under the systemd unit's hardening numba may find nowhere to write its cache
    # and refuses cache=True outright; a function with no source file is refused the
    # same way, so it stands in for that here.
    from siteagent.policies import fill as fill_module

    namespace: dict[str, object] = {}
    exec(compile("def nowhere_to_cache(x):\n    return 2 * x + 1\n", "<string>", "exec"), namespace)
    before = list(fill_module.UNCACHED)
    compiled = fill_module.jit(namespace["nowhere_to_cache"])  # type: ignore[arg-type]
    assert compiled(20) == 41
    assert hasattr(compiled, "signatures") and compiled.signatures  # numba compiled it
    assert [*before, "nowhere_to_cache"] == fill_module.UNCACHED
    fill_module.UNCACHED[:] = before


def _run_fresh(script: str) -> None:
    """Run ``script`` in a fresh interpreter (nothing compiled, nothing imported yet)."""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr


def test_the_economic_plan_warms_up_before_a_tick() -> None:
    # In a fresh interpreter (here every kernel may already be compiled by other tests):
    # nothing is compiled before warm_up, every kernel a plan calls is after it.
    script = (
        "from siteagent.policies import economic, fill\n"
        "kernels = (economic._block_loop, fill._kernel)\n"
        "assert not any(k.signatures for k in kernels)\n"
        "economic.warm_up()\n"
        "assert all(k.signatures for k in kernels), [k.signatures for k in kernels]\n"
    )
    _run_fresh(script)


def test_an_agent_on_the_capping_policy_never_imports_numba() -> None:
    # numba and llvmlite cost about 64 MB of RSS; only the economic plan needs them.
    script = (
        "import asyncio, sys\n"
        "import siteagent.agent.api.http, siteagent.agent.tools.cli\n"
        "import siteagent.agent.control.inventory, siteagent.agent.control.prices\n"
        "import siteagent.agent.ops.metrics\n"
        "from siteagent.agent.config import parse_config\n"
        "from siteagent.agent.control.loop import Agent\n"
        "def ticked(policy):\n"
        "    cfg = parse_config({'site': {'cap_w': 1000.0}, 'policy': {'name': policy}})\n"
        "    asyncio.run(Agent(cfg, []).tick())\n"
        "    return 'numba' in sys.modules\n"
        "assert not ticked('efficiency-capping'), 'numba imported by a capping agent'\n"
        "assert ticked('economic'), 'the economic plan ran without numba'\n"
    )
    _run_fresh(script)
