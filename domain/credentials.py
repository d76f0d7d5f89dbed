"""A miner's login as plain values: what the agent loads and the drivers use.

The password lives in a ``Secret`` whose ``repr`` and ``str`` are ``***``, so a
login can be logged, put in an exception, rendered by the API or dumped with
the config without the password in it; only ``reveal()`` gives it, and only a
driver handing it to the vendor library calls that.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that never shows itself: ``repr`` / ``str`` / format give ``***``."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        """The secret itself, for the vendor call that needs it (and nothing else)."""
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"


@dataclass(frozen=True, slots=True)
class Login:
    """One miner's credentials for its firmware; ``None`` keeps pyasic's default.

    ``source`` says where to change them (a file and its section), for the
    error that names it when the miner refuses them.
    """

    username: str | None = None
    password: Secret | None = None
    source: str = "pyasic's default password (no credentials file configured)"
