"""Simulated devices started and stopped as one: a site of miners, a site of GPU nodes."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self


class Device(Protocol):
    """A simulated device with listeners to open and close."""

    async def start(self) -> None:
        """Open its listeners."""

    async def stop(self) -> None:
        """Close its listeners."""


class DeviceGroup(abc.ABC):
    """Starts and stops its devices together; an async context manager."""

    @abc.abstractmethod
    def devices(self) -> Sequence[Device]:
        """The devices of the group."""

    async def start(self) -> None:
        """Start every device; if one fails, stop them all and raise its error."""
        try:
            await asyncio.gather(*(d.start() for d in self.devices()))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every device (one failing to stop does not keep the others open)."""
        await asyncio.gather(*(d.stop() for d in self.devices()), return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
