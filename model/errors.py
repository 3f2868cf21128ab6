"""The errors a user can cause in `model/`, and the one way an exception's message is cut
to a line, in a module that imports nothing (torch included), so that the CLI can catch
them by class without importing torch first."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value a user gave is wrong; the message names it and what it accepts."""


class DeviceError(ValueError):
    """The asked-for device does not exist on this machine."""


class DataError(RuntimeError):
    """MNIST is missing, unreadable or not what it claims to be; the message says what to do."""


class CheckpointError(RuntimeError):
    """The file is not a checkpoint this program wrote, or it was altered."""


class CheckpointMissing(CheckpointError):
    """There is no file at the checkpoint's path."""


def first_line(exc: BaseException) -> str:
    """The first line of the exception's message that is not blank, else its type's name:
    libraries put what went wrong first and the detail (the SQL, a traceback) below."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
