"""Exceptions the services raise; ``kiln.api.errors`` maps each to an HTTP answer.

Services know nothing of HTTP: they say *what* went wrong, the API layer picks
the status code.
"""

from __future__ import annotations

from dataclasses import dataclass

Location = tuple[str | int, ...]


class ServiceError(Exception):
    """Base class: ``str()`` is a message fit to show the client."""


@dataclass(frozen=True)
class FieldProblem:
    """One invalid input field; ``loc`` is the path inside the request body."""

    loc: Location
    msg: str


class InvalidRequest(ServiceError):
    """Input that passed the wire schema but breaks a server rule (422)."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, p.loc))}: {p.msg}" for p in problems))
        self.problems = problems

    @classmethod
    def single(cls, loc: Location, msg: str) -> InvalidRequest:
        return cls([FieldProblem(loc, msg)])


class NotFound(ServiceError):
    """A resource that does not exist or belongs to someone else (404)."""


class Forbidden(ServiceError):
    """A resource the caller may see but not change, or an operation that is
    the operator's (403)."""


class Conflict(ServiceError):
    """The resource is in a state that does not allow the operation (409)."""


class Unauthenticated(ServiceError):
    """Missing, unknown, expired or malformed credentials (401)."""


class CapacityExhausted(ServiceError):
    """The host cannot take this VM now (503); nothing was started."""


class QuotaExceeded(ServiceError):
    """The user is at a per-user limit (429); the message names the quota."""


class ImageNotBuilt(ServiceError):
    """The requested image variant has no built image on this host (503)."""


class VmStartFailed(ServiceError):
    """A waited-for VM failed while starting (503); it is recorded as failed."""

    def __init__(self, vm_id: str, reason: str) -> None:
        super().__init__(f"vm {vm_id} failed to start: {reason}")
        self.vm_id = vm_id
        self.reason = reason


class GuestUnavailable(ServiceError):
    """The VM's guest agent did not answer (503): the VM is gone or failing."""


class GuestRefused(ServiceError):
    """The guest refused an operation because of what was asked (400), e.g. a bad path."""


class GuestTimedOut(ServiceError):
    """An operation in the guest ran past its own time limit (504)."""


class OutOfSpace(ServiceError):
    """A disk is full: the VM's own, or the host's data disk (507)."""


class TooLarge(ServiceError):
    """The request or the data it asks for is over a size limit (413)."""


class Unsupported(ServiceError):
    """A feature this server does not have yet (400); the message names it."""


class WaitTimedOut(ServiceError):
    """A wait the caller asked for ran out of its own time limit (408, as the SDK expects)."""


class PolicyRefused(ServiceError):
    """The VM's own policy (its egress policy) forbids what was asked (403; the message names it)."""


class UpstreamFailed(ServiceError):
    """What the guest reached for outside failed (502): a page that did not load."""
