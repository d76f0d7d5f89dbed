"""Fill nested domain budgets with power segments taken in a fixed order.

The policies cut every device's power above its floor into *segments* and take
them in one order (best first) while every domain above the device has room:

- a *whole* segment (a wake: sleep -> minimum) is all or nothing, and needs
  ``reserve_w`` of room beyond its width;
- any other segment is taken whole if it fits, else cut to the room left,
  rounded down onto the device's power-target step;
- a device's segment is taken only if its previous one was taken whole.

That is a sequential rule: each decision depends on the room every earlier
decision left. One segment at a time in Python it costs about a second at
50,000 devices (150,000 segments), and no vectorised form found makes it cheap:
the last one (a few numpy rounds over bounds on each segment's room) still took
about 40 ms. So the rule is written once, as the plain loop, and compiled with
numba: 7-8 ms for bench/bench_economic_plan.py's 50,000 devices on a quiet
2-core machine whose plain Python sort of them takes about 110 ms. The first call in a process
compiles it (numba keeps the result in ``__pycache__`` where it may write
there); ``policies.economic.warm_up`` does that before the control loop's first
tick. ``NUMBA_DISABLE_JIT=1`` runs the same loop as Python, for a debugger.

tests/test_fill.py checks it, segment for segment, against a loop written
independently over ``DeviceControls.clamp_power_target_w``; both clamp with
``domain.types.clamp_power_w``, the kernel through numba's compiled form of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numba
import numpy as np
import numpy.typing as npt

from siteagent.domain.site import by_depth
from siteagent.domain.types import clamp_power_w

FloatArr = npt.NDArray[np.float64]
IntArr = npt.NDArray[np.intp]
BoolArr = npt.NDArray[np.bool_]

OPEN, WHOLE, CUT, SKIPPED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Segments:
    """Segments, one entry each: in the order they are offered, unless ``fill`` is
    given that order (then ``pred`` and every result index these entries as stored)."""

    device: IntArr  # device index
    width_w: FloatArr  # power the whole segment adds, as tested against the room
    level_w: FloatArr  # the device's level once this segment is taken whole
    added_w: FloatArr  # power the whole segment uses (its level less the one before)
    reserve_w: FloatArr  # room needed beyond the width, for all-or-nothing segments
    all_or_nothing: BoolArr
    pred: IntArr  # entry of the device's previous segment, -1 for its first


@dataclass(frozen=True, slots=True)
class Clamp:
    """Per device: where a cut may land (a power target's range and step, for
    ``domain.types.clamp_power_w``); NaN for none."""

    lo_w: FloatArr
    hi_w: FloatArr
    step_w: FloatArr


@dataclass(frozen=True, slots=True)
class Filled:
    """What ``fill`` decided: per segment its outcome and use, per device its level."""

    status: npt.NDArray[np.int8]  # WHOLE, CUT or SKIPPED per segment
    used_w: FloatArr  # power each segment takes (W)
    level_w: FloatArr  # each device's final level (W)
    bound_node: IntArr  # per device: the node that cut or skipped its last segment, -1 none
    bound_room_w: FloatArr  # room that node had left for it (W)
    avail_w: FloatArr  # each node's room left after the fill (W)


def fill(
    seg: Segments,
    chains: IntArr,
    avail_w: FloatArr,
    start_w: FloatArr,
    clamp: Clamp,
    nodes: IntArr | None = None,
    order: IntArr | None = None,
) -> Filled:
    """Take segments in order under every node's room (``avail_w``, W).

    ``chains[d]`` lists the nodes above device ``d`` (its own domain first, the
    site last, padded by repeating the site); ``start_w[d]`` is its level before
    any segment. ``nodes``, when given, is ``by_depth(chains, len(avail_w))``
    already worked out. ``order``, when given, lists the entries of ``seg`` in the
    order they are offered (else they are offered as stored); per-segment results
    follow ``seg``'s entries. ``avail_w`` is left untouched; the room left is returned.
    """
    n, n_dev, n_nodes = len(seg.device), len(start_w), len(avail_w)
    status = np.zeros(n, np.int8)
    used = np.zeros(n)
    level = np.array(start_w, float)
    bound_node = np.full(n_dev, -1, np.intp)
    bound_room = np.zeros(n_dev)
    if n == 0:
        return Filled(status, used, level, bound_node, bound_room, np.array(avail_w, float))
    # Each device's nodes site first, each once; a chain that ends early is padded
    # with an extra node that never runs out.
    if nodes is None:
        nodes = by_depth(chains, n_nodes)
    room = np.r_[np.asarray(avail_w, float), np.inf]
    if order is None:
        order = np.arange(n)
    _kernel(
        np.asarray(order, np.intp),
        np.asarray(seg.device, np.intp),
        np.asarray(seg.width_w, float),
        np.asarray(seg.level_w, float),
        np.asarray(seg.added_w, float),
        np.asarray(seg.reserve_w, float),
        np.asarray(seg.all_or_nothing, np.bool_),
        np.asarray(seg.pred, np.intp),
        nodes,
        np.asarray(clamp.lo_w, float),
        np.asarray(clamp.hi_w, float),
        np.asarray(clamp.step_w, float),
        room,
        status,
        used,
        level,
        bound_node,
        bound_room,
    )
    return Filled(status, used, level, bound_node, bound_room, room[:n_nodes])


def _fill_loop(
    order: IntArr,
    device: IntArr,
    width: FloatArr,
    level_w: FloatArr,
    added: FloatArr,
    reserve: FloatArr,
    whole_only: BoolArr,
    pred: IntArr,
    nodes: IntArr,
    lo_w: FloatArr,
    hi_w: FloatArr,
    step_w: FloatArr,
    room: FloatArr,
    status: npt.NDArray[np.int8],
    used: FloatArr,
    level: FloatArr,
    bound_node: IntArr,
    bound_room: FloatArr,
) -> None:
    """The rule, one segment at a time; writes ``status``..``bound_room`` and ``room``."""
    depth = nodes.shape[1]
    for t in range(len(order)):
        q = order[t]
        p = pred[q]
        if p >= 0 and status[p] != WHOLE:  # also when offered before its previous one
            status[q] = SKIPPED
            continue
        d = device[q]
        r = np.inf
        at = -1
        for k in range(depth):  # the tightest node, the one nearest the site on a tie
            node = nodes[d, k]
            if room[node] < r:
                r = room[node]
                at = node
        if whole_only[q]:
            if width[q] + reserve[q] <= r:
                status[q] = WHOLE
            else:
                status[q] = SKIPPED
                bound_node[d] = at
                bound_room[d] = r
                continue
        elif width[q] <= r:
            status[q] = WHOLE
        else:
            # Cut to the room (the one clamping rule), never down.
            b = level[d]
            c = clamp_w(b + max(r, 0.0), lo_w[d], hi_w[d], step_w[d])
            status[q] = CUT
            used[q] = max(c, b) - b
            level[d] = b + used[q]
            bound_node[d] = at
            bound_room[d] = r
        if status[q] == WHOLE:
            used[q] = added[q]
            level[d] = level_w[q]
        for k in range(depth):
            room[nodes[d, k]] -= used[q]


# Kernels numba could not cache on disk here (compiled afresh in each process).
UNCACHED: list[str] = []


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled by numba, its machine code cached on disk where numba can write.

    numba caches in ``__pycache__`` beside the source, else in ``NUMBA_CACHE_DIR``
    or the user's cache directory. Under the systemd unit's hardening none of
    those may be writable (read-only ``/opt``, no home), and numba then refuses
    the cached form outright, so compile it uncached: a second or two at start
    (``policies.economic.warm_up``), no less correct.
    """
    try:
        compiled = numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        UNCACHED.append(fn.__name__)
        compiled = numba.njit(cache=False, nogil=True)(fn)
    return cast(Callable[..., Any], compiled)


# The one clamping rule, compiled from its own source for the kernels.
clamp_w = jit(clamp_power_w)
_kernel = jit(_fill_loop)
