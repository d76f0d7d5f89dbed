"""Site arithmetic: the power-delivery tree and the one rule that sums power into it.

Every domain's load is the power of the devices below it; the site's also holds
the overhead (cooling, auxiliaries). The planners, the safe ordering, the
metrics, the API and the backtest all count loads this way, so the rule is
written once, over arrays (``node_loads``), and ``domain_loads_w`` gives it by
domain name. tests/site_reference.py holds the same rule written per device, as
its specification.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from siteagent.domain.types import Limits

SITE = "site"

FloatArr = npt.NDArray[np.float64]
IntArr = npt.NDArray[np.intp]


class DomainTree:
    """The power-delivery tree: each domain's limit (W) and its ancestors up to the site."""

    def __init__(self, limits: Limits) -> None:
        self.limit_w: dict[str, float] = {SITE: limits.effective_cap_w}
        self._parent: dict[str, str] = {}
        for d in limits.domains:
            self.limit_w[d.domain_id] = d.limit_w
            self._parent[d.domain_id] = d.parent or SITE
        self._chains: dict[str, tuple[str, ...]] = {}
        # A plan asks for the same domains' chains several times (layout, loads, ledger).
        self._chain_tables: dict[tuple[str, ...], IntArr] = {}
        # Node i is names[i]; the site is node 0.
        self.names: tuple[str, ...] = tuple(self.limit_w)
        self.index: dict[str, int] = {k: i for i, k in enumerate(self.names)}

    def chain(self, domain: str) -> tuple[str, ...]:
        """The domain and all above it, the site last; unknown domains sit under the site."""
        cached = self._chains.get(domain)
        if cached is not None:
            return cached
        out: list[str] = []
        node: str | None = domain if domain in self.limit_w else SITE
        while node is not None and node not in out:
            out.append(node)
            node = self._parent.get(node) if node != SITE else None
        if out[-1] != SITE:
            out.append(SITE)
        self._chains[domain] = tuple(out)
        return self._chains[domain]

    def chains(self, domains: Sequence[str]) -> IntArr:
        """Per domain, its chain as node indices (the site last), padded by repeating the site.

        A parent the limits do not list has no limit to keep and no index: left out.
        """
        key = tuple(domains)
        table = self._chain_tables.get(key)
        if table is None:
            table = self._chain_tables[key] = self._chain_table(key)
            table.flags.writeable = False  # shared by every caller
        return table

    def _chain_table(self, domains: Sequence[str]) -> IntArr:
        index = self.index
        rows = [[index[k] for k in self.chain(dom) if k in index] for dom in domains]
        depth = max((len(c) for c in rows), default=1)
        if not rows:
            return np.zeros((0, depth), np.intp)
        return np.array([c + [c[-1]] * (depth - len(c)) for c in rows], np.intp)


def domain_codes(domains: Sequence[str]) -> tuple[tuple[str, ...], IntArr]:
    """The distinct domains (first seen first), and each entry's index into them."""
    uniq = {dom: i for i, dom in enumerate(dict.fromkeys(domains))}
    return tuple(uniq), np.fromiter(map(uniq.__getitem__, domains), np.intp, len(domains))


def by_depth(chains: IntArr, n_nodes: int) -> IntArr:
    """Each row's nodes by depth below the site (site first), with ``n_nodes`` where its
    chain ended.

    Each node then sits in one column, so a column grouped by node groups every
    row under that node.
    """
    length = 1 + np.argmax(chains == chains[:, -1:], axis=1)  # up to the first site entry
    rows = np.arange(len(chains))
    cols = [
        np.where(k < length, chains[rows, np.maximum(length - 1 - k, 0)], n_nodes)
        for k in range(chains.shape[1])
    ]
    return np.ascontiguousarray(np.stack(cols, axis=1), np.intp)


def node_loads(nodes: IntArr, w: FloatArr, n_nodes: int) -> FloatArr:
    """Per node: the sum of ``w`` (W, one value per row) over the rows below it.

    ``nodes`` is ``by_depth`` of the rows' chains.
    """
    out = np.zeros(n_nodes + 1)
    for k in range(nodes.shape[1]):
        out += np.bincount(nodes[:, k], weights=w, minlength=n_nodes + 1)
    return out[:n_nodes]


def domain_loads_w(
    tree: DomainTree,
    names: Sequence[str],
    code: IntArr,
    w: FloatArr | Sequence[float],
    overhead_w: float = 0.0,
) -> dict[str, float]:
    """Every node's load (W): ``w`` per device summed into every domain above it, the
    overhead at the site.

    Device ``i`` sits in domain ``names[code[i]]`` (``domain_codes`` makes these);
    every node of the tree is in the answer, 0 where nothing sits below it.
    """
    per_domain: FloatArr = np.bincount(code, np.asarray(w, np.float64), len(names)).astype(
        np.float64, copy=False
    )
    n_nodes = len(tree.names)
    loads = node_loads(by_depth(tree.chains(names), n_nodes), per_domain, n_nodes)
    out = dict(zip(tree.names, loads.tolist(), strict=True))
    out[SITE] += overhead_w
    return out
