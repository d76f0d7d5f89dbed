"""Site arithmetic (domain.site) and the one clamping rule against their plain specifications."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from site_reference import reference_clamp_w, reference_loads_w

from siteagent.domain import (
    DeviceControls,
    DeviceKind,
    DeviceState,
    DeviceStatus,
    DomainLimit,
    Limits,
)
from siteagent.domain.site import (
    SITE,
    DomainTree,
    by_depth,
    domain_codes,
    domain_loads_w,
    node_loads,
)
from siteagent.domain.types import clamp_power_w
from siteagent.policies.fill import clamp_w as compiled_clamp_w

CAPS = DeviceControls(power_target=False)
DOMAINS = ("site", "feeder-a", "feeder-b", "rack-1", "rack-2", "rack-3", "nowhere")


def device(i: int, domain: str) -> DeviceStatus:
    return DeviceStatus(
        f"d{i}",
        DeviceKind.MINER,
        domain,
        DeviceState.MINING,
        3000.0,
        100.0,
        20.0,
        CAPS,
        0.0,
        0.0,
        True,
    )


@st.composite
def trees(draw: st.DrawFn) -> Limits:
    """A site with feeders under it and racks under feeders (some parents unknown)."""
    feeders = [DomainLimit(f, draw(st.floats(1.0, 1e6))) for f in ("feeder-a", "feeder-b")]
    parents = st.sampled_from(["feeder-a", "feeder-b", None, "gone"])
    racks = [
        DomainLimit(r, draw(st.floats(1.0, 1e6)), draw(parents))
        for r in ("rack-1", "rack-2", "rack-3")
    ]
    return Limits(1e6, draw(st.floats(0.0, 1e6)), "t", domains=tuple(feeders + racks))


watts = st.floats(0.0, 5e4, allow_nan=False) | st.integers(0, 5000).map(float)


@settings(max_examples=300, deadline=None)
@given(
    trees(),
    st.lists(st.tuples(st.sampled_from(DOMAINS), watts), max_size=40),
    st.floats(0.0, 1e5),
)
def test_domain_loads_are_the_per_device_sums(
    limits: Limits, items: list[tuple[str, float]], overhead_w: float
) -> None:
    tree = DomainTree(limits)
    devices = [(device(i, dom), w) for i, (dom, w) in enumerate(items)]
    want = reference_loads_w(tree, devices, overhead_w)
    names, code = domain_codes([dom for dom, _ in items])
    got = domain_loads_w(tree, names, code, [w for _, w in items], overhead_w)
    assert set(got) == set(tree.limit_w)  # every node, 0 where nothing sits below it
    for node in tree.limit_w:
        assert math.isclose(got[node], want.get(node, 0.0), rel_tol=1e-12, abs_tol=1e-6), node
    # The array form, per device (as the economic plan sums), gives the same.
    chains = tree.chains([dom for dom, _ in items])
    per_device = node_loads(
        by_depth(chains, len(tree.names)), np.array([w for _, w in items]), len(tree.names)
    )
    for k, node in enumerate(tree.names):
        expected = want.get(node, 0.0) - (overhead_w if node == SITE else 0.0)
        assert math.isclose(per_device[k], expected, rel_tol=1e-12, abs_tol=1e-6), node


def test_an_unknown_domain_counts_at_the_site_alone() -> None:
    tree = DomainTree(Limits(1e4, 9000.0, "t", domains=(DomainLimit("rack", 5000.0),)))
    names, code = domain_codes(["rack", "elsewhere", "rack"])
    got = domain_loads_w(tree, names, code, [100.0, 40.0, 1.0], 7.0)
    assert got == {"site": 148.0, "rack": 101.0}


bounds = st.none() | st.floats(0.0, 5000.0)


@settings(max_examples=500, deadline=None)
@given(
    st.floats(-100.0, 6000.0),
    bounds,
    bounds,
    st.sampled_from([0.0, -1.0, 1.0, 5.0, 25.0, 0.1]) | st.floats(0.01, 500.0),
)
def test_one_clamping_rule_in_every_form(
    power_w: float, lo_w: float | None, hi_w: float | None, step_w: float
) -> None:
    want = reference_clamp_w(power_w, lo_w, hi_w, step_w)
    lo = math.nan if lo_w is None else lo_w
    hi = math.nan if hi_w is None else hi_w
    caps = DeviceControls(True, lo_w, hi_w, power_target_step_w=step_w)
    assert caps.clamp_power_target_w(power_w) == want
    assert clamp_power_w(power_w, lo, hi, step_w) == want
    # The numba kernels compile the same source: their answer is the same number.
    assert compiled_clamp_w(power_w, lo, hi, step_w) == want
