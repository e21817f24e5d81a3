"""The one place the volume mechanism's errors become service errors (each
``kiln.volumes.errors`` class says which HTTP status fits it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kiln.runtime.errors import AgentTimeout, AgentUnavailable
from kiln.services.errors import (
    Conflict,
    GuestRefused,
    GuestTimedOut,
    GuestUnavailable,
    InvalidRequest,
    NotFound,
    OutOfSpace,
    TooLarge,
)
from kiln.volumes import (
    CheckpointNotFound,
    GuestVolumeError,
    InvalidVolumeRequest,
    PathRefused,
    VolumeBusy,
    VolumeDamaged,
    VolumeError,
    VolumeExists,
    VolumeFileConflict,
    VolumeFileNotFound,
    VolumeFileTooLarge,
    VolumeNotFound,
    VolumeTooSmall,
)


@contextmanager
def volume_errors(field: str | None = None) -> Iterator[None]:
    """Turn volume and guest failures inside the block into service errors.
    ``field``: the request field a bad value came in (422 ``loc``)."""
    try:
        yield
    except (VolumeNotFound, CheckpointNotFound, VolumeFileNotFound) as error:
        raise NotFound(str(error)) from error
    except (VolumeBusy, VolumeExists, VolumeTooSmall, VolumeFileConflict) as error:
        raise Conflict(str(error)) from error
    except InvalidVolumeRequest as error:
        raise InvalidRequest.single((field or "body",), str(error)) from error
    except PathRefused as error:
        raise GuestRefused(f"refused: {error}") from error
    except VolumeFileTooLarge as error:
        raise TooLarge(str(error)) from error
    except GuestVolumeError as error:
        if error.code == "ENOSPC":
            raise OutOfSpace(f"the volume is full: {error.message}") from error
        if error.code == "EBUSY":
            raise Conflict(str(error)) from error
        if error.code == "ETIMEDOUT":
            raise GuestTimedOut(str(error)) from error
        raise GuestRefused(str(error)) from error
    except AgentTimeout as error:
        raise GuestTimedOut(f"the VM that holds the volume did not answer in time: {error}") from error
    except (AgentUnavailable, VolumeDamaged) as error:
        raise GuestUnavailable(str(error)) from error
    except VolumeError as error:
        raise GuestUnavailable(f"the host could not do this to the volume: {error}") from error
