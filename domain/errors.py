"""The few device errors the rest of the project sees.

Drivers translate every vendor exception into one of these, raised ``from`` the
original, so the agent never has to know pyasic's, grpclib's or NVML's errors.
"""


class DeviceError(Exception):
    """Base class: something went wrong talking to one device."""


class DeviceUnreachable(DeviceError):
    """The device did not answer (refused, reset, timed out)."""


class DeviceFaulted(DeviceError):
    """The device answered, but with something we cannot use (garbage, missing fields)."""


class DeviceRefused(DeviceError):
    """The device understood a command and refused it (out of range, wrong state)."""


class DevicePermissionError(DeviceError):
    """We may read the device but not control it."""


class DeviceLost(DeviceError):
    """The device is gone (GPU fell off the bus, miner replaced)."""
