"""Persistent volumes: ext4 in qcow2 chains, checkpoints, hot attach over
virtio-scsi, and file access that never mounts a user's image on the host.
See README.md."""

from kiln.volumes.attachments import Attachment
from kiln.volumes.checkpoint_ops import CheckpointInfo
from kiln.volumes.errors import (
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
from kiln.volumes.files import FileEntry
from kiln.volumes.helper import HelperBase, HelperVms
from kiln.volumes.participant import VolumeParticipant
from kiln.volumes.volumes import VolumeInfo, Volumes

__all__ = [
    "Attachment",
    "CheckpointInfo",
    "CheckpointNotFound",
    "FileEntry",
    "GuestVolumeError",
    "HelperBase",
    "HelperVms",
    "InvalidVolumeRequest",
    "PathRefused",
    "VolumeBusy",
    "VolumeDamaged",
    "VolumeError",
    "VolumeExists",
    "VolumeFileConflict",
    "VolumeFileNotFound",
    "VolumeFileTooLarge",
    "VolumeInfo",
    "VolumeNotFound",
    "VolumeParticipant",
    "VolumeTooSmall",
    "Volumes",
]
