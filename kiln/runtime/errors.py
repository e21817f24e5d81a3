"""Runtime failures, in a leaf module so that every runtime module (and the
services above) can name them without importing each other."""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base class of runtime failures; ``str()`` is a reason fit for ``failure_reason``."""


class BootError(RuntimeFailure):
    """The VM could not be started or its agent never answered."""


class SaveError(RuntimeFailure):
    """A save failed. ``disk_in_use``: the VM already runs on a new overlay whose
    backing file is the saved disk in the save's directory, so that directory
    must be kept for as long as the VM lives (everything else in it is gone)."""

    def __init__(self, message: str, *, disk_in_use: bool) -> None:
        super().__init__(message)
        self.disk_in_use = disk_in_use


class AgentError(RuntimeFailure):
    """The agent answered a request with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AgentUnavailable(RuntimeFailure):
    """There is no working connection to the agent (never came or was lost)."""


class AgentTimeout(RuntimeFailure, TimeoutError):
    """A request got no final answer within its time limit."""
