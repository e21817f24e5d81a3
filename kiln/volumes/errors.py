"""What the volume mechanism raises. Every error's ``str()`` is a reason fit to
show a user; the service layer maps the classes to HTTP statuses (the comment
on each says which fits)."""

from __future__ import annotations

from kiln.runtime.errors import RuntimeFailure


class VolumeError(RuntimeFailure):
    """Base class of everything below."""


class VolumeNotFound(VolumeError):
    """No such volume on this host (404)."""


class CheckpointNotFound(VolumeError):
    """No such checkpoint of the volume (404)."""


class VolumeExists(VolumeError):
    """A volume with this id already exists here (409)."""


class VolumeBusy(VolumeError):
    """The volume (or checkpoint) is in use in a way that forbids the operation:
    mounted rw elsewhere, mounted at all for a delete, a checkpoint mounted (409)."""


class VolumeTooSmall(VolumeError):
    """A shrink below what the filesystem holds (409)."""


class InvalidVolumeRequest(VolumeError):
    """A bad size, mount path or id (422)."""


class PathRefused(VolumeError):
    """A volume file path that leaves the volume: '..', or a symlink on the way (400)."""


class VolumeFileNotFound(VolumeError):
    """No such file in the volume (404)."""


class VolumeFileConflict(VolumeError):
    """The file exists and overwrite was not asked, or it is a directory (409)."""


class VolumeFileTooLarge(VolumeError):
    """A file over the download limit (413)."""


class VolumeDamaged(VolumeError):
    """The filesystem check found damage it could not repair (500-class: an
    operator looks at ``volumes/<id>/``; the volume is not mounted meanwhile)."""


class GuestVolumeError(VolumeError):
    """The guest refused or failed a volume operation (mount, unmount, freeze).
    ``code`` is the errno name the guest gave (``EBUSY``, ``ENODEV``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
