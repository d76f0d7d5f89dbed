"""Contract floors within the caps: the one rule every policy keeps them by.

A floor is power a device must keep for a customer (``Limits.floors``, per tick:
the larger of a node's contracted watts and what its demand needs; and the
economic policy's static ``contract_floor_w``). A cap always wins over a floor:
every movable device's own minimum counts first, then each floor above its
device's minimum is kept, in the policy's fixed order, only as far as every
domain above the device has room under its *limit* (not the capping target),
cut down onto the device's step. What could not be kept is *broken*; the plan
names those devices (``Plan.broken_floors``) and the agent raises the alarm.

Numpy and plain Python only: the capping policy, which never loads numba, uses it
as the economic policy does. Contracted devices are few, so the walk over them is
a plain loop; tests/economic_reference.py states the same rule over objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from siteagent.domain import Limits
from siteagent.domain.types import clamp_power_w

FloatArr = npt.NDArray[np.float64]
IntArr = npt.NDArray[np.intp]
BoolArr = npt.NDArray[np.bool_]


def floor_map_w(limits: Limits, static_w: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per device id, the floor (W) in force: the larger of ``static_w`` and the limits'."""
    out = dict(static_w or {})
    for f in limits.floors:
        if f.power_w > out.get(f.device_id, 0.0):
            out[f.device_id] = f.power_w
    return out


def wanted_floor_w(
    ids: Sequence[str],
    rows: IntArr,
    lo_w: FloatArr,
    clamp: tuple[FloatArr, FloatArr, FloatArr],
    floors_w: Mapping[str, float],
) -> FloatArr:
    """Per device of ``rows`` (W): its floor clamped onto its range and step, never below
    its own minimum ``lo_w`` (the minimum where it has no floor)."""
    want = lo_w[rows].copy()
    if not floors_w:
        return want
    c_lo, c_hi, c_step = clamp
    for k, i in enumerate(rows.tolist()):
        w = floors_w.get(ids[i], 0.0)
        if w > want[k]:
            clamped = clamp_power_w(w, float(c_lo[i]), float(c_hi[i]), float(c_step[i]))
            want[k] = max(float(clamped), float(want[k]))
    return want


def floors_within(
    rows: IntArr,
    lo_w: FloatArr,
    want_w: FloatArr,
    clamp: tuple[FloatArr, FloatArr, FloatArr],
    nodes: IntArr,
    room_w: FloatArr,
) -> tuple[FloatArr, BoolArr]:
    """The floors (W; one per ``rows``, in that fixed order) cut to fit every node's room,
    and which were cut.

    ``lo_w`` and ``want_w`` are per row of ``rows``: the device's own minimum and its
    floor. ``nodes`` is ``by_depth`` of every device's chain (padded with the node
    count); ``room_w`` is each node's limit less what the plan does not move and less
    every movable device's own minimum. A floor that does not fit its least room is
    kept up to that room, cut down onto its step, never below its minimum.
    """
    kept = want_w.copy()
    extra = np.flatnonzero(want_w > lo_w)
    if not extra.size:
        return kept, np.zeros(len(rows), bool)
    hard = np.append(np.asarray(room_w, float), np.inf).tolist()
    c_lo, c_hi, c_step = clamp
    for k in extra.tolist():
        i = int(rows[k])
        chain = nodes[i].tolist()
        room = min(hard[n] for n in chain)
        lo, want = float(lo_w[k]), float(want_w[k])
        if want - lo <= room:
            w = want
        else:
            w = clamp_power_w(lo + max(room, 0.0), float(c_lo[i]), float(c_hi[i]), float(c_step[i]))
        w = max(w, lo)
        kept[k] = w
        for n in chain:
            hard[n] -= w - lo
    return kept, kept < want_w - 1e-6
