"""Planning policies, chosen by name from one registry; every one has the same interface.

A policy is pure: snapshot, limits, prices and its own state in; a plan (a
reason per setpoint) and its next state out. No IO, no clock reads, no globals:
what a policy derives between ticks lives in the ``PolicyState`` it returns,
which the agent keeps and hands back with the next snapshot. The agent never
branches on which policy it runs.

A policy's module is imported only when the policy is chosen: the economic
policy brings numba and llvmlite (about 64 MB of RSS), which an agent on the
capping policy never needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, get_args

if TYPE_CHECKING:
    from siteagent.domain import Limits, Plan, Snapshot
    from siteagent.policies.capping import CappingParams
    from siteagent.policies.economic_params import EconomicParams
    from siteagent.policies.prices import Prices

# The names a configuration may choose (``policy.name``); ``POLICIES`` has one entry each.
PolicyName = Literal["efficiency-capping", "economic"]
POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What a policy carries from one plan to the next.

    ``previous`` is the plan the agent adopted last (hysteresis and incumbents
    are measured against it); ``derived`` is what the policy worked out and may
    reuse (its own object, opaque to the agent; None at first).
    """

    previous: Plan | None = None
    derived: object = None


@dataclass(frozen=True, slots=True)
class PolicyParams:
    """Every policy's parameters; each policy reads its own."""

    capping: CappingParams
    economic: EconomicParams


class Policy(Protocol):
    """A planning policy: the one interface the agent and the backtest call."""

    @property
    def name(self) -> str:
        """The name it is registered under."""
        ...

    @property
    def reads_prices(self) -> bool:
        """Whether its plans read prices: the agent reads its price feed (which raises the
        stale-prices alarm) only for a policy that does, and passes None otherwise."""
        ...

    def plan(
        self, snapshot: Snapshot, limits: Limits, prices: Prices | None, state: PolicyState
    ) -> tuple[Plan, PolicyState]:
        """The plan for ``snapshot`` under ``limits`` at ``prices``, and the next state."""
        ...


PolicyFactory = Callable[[PolicyParams], Policy]


def _capping(params: PolicyParams) -> Policy:
    from siteagent.policies.capping import CappingPolicy

    return CappingPolicy(params.capping)


def _economic(params: PolicyParams) -> Policy:
    # Imported here: numba and llvmlite come with it.
    from siteagent.policies.economic import EconomicPolicy

    return EconomicPolicy(params.economic)


POLICIES: dict[str, PolicyFactory] = {
    "efficiency-capping": _capping,
    "economic": _economic,
}


def get_policy(name: str, params: PolicyParams) -> Policy:
    """The policy registered as ``name``, made with ``params``; KeyError naming the choices."""
    factory = POLICIES.get(name)
    if factory is None:
        raise KeyError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
    return factory(params)
