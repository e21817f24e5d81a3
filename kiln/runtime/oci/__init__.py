"""OCI images: read an image layout, verify it, unpack its layers into a tree,
and pull registry images into layouts.

- ``layout``: the layout and its blobs (``open_layout``, ``open_blob``,
  ``private_dir``), the errors;
- ``layers``: applying layers onto a tree (``unpack``, ``apply_layer``) and
  what is never kept (set-id bits, device nodes, privileged xattrs, ``..``);
- ``tree``: paths inside a tree, resolved as the guest sees them;
- ``pulling``: registry references and ``pull`` (through ``kiln.runtime.registry``).

Every name callers use is here (``from kiln.runtime import oci``; ``oci.unpack``).
Stdlib only (and the ``zstd`` and ``skopeo`` tools); nothing here knows about
VMs, users or HTTP.
"""

from kiln.runtime.oci.layers import (
    BoundedTarInfo,
    UnpackLimits,
    UnpackReport,
    apply_layer,
    decompressed,
    finish_directories,
    unpack,
)
from kiln.runtime.oci.layout import (
    LAYER_MEDIA_TYPES,
    PLATFORM,
    Descriptor,
    DigestMismatch,
    ImageConfig,
    NotALayout,
    OciError,
    OciImage,
    RegistryError,
    blob_path,
    check_content,
    open_blob,
    open_layout,
    parse_config,
    private_dir,
    read_json_blob,
    verify_open_blob,
)
from kiln.runtime.oci.pulling import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    Reference,
    parse_reference,
    pull,
    skopeo_command,
)
from kiln.runtime.oci.tree import (
    ensure_directory,
    entry_path,
    remove_path,
    resolve_in_root,
)

__all__ = [
    "DOCKER_HUB",
    "DOCKER_HUB_API",
    "LAYER_MEDIA_TYPES",
    "PLATFORM",
    "BoundedTarInfo",
    "Descriptor",
    "DigestMismatch",
    "ImageConfig",
    "NotALayout",
    "OciError",
    "OciImage",
    "Reference",
    "RegistryError",
    "UnpackLimits",
    "UnpackReport",
    "apply_layer",
    "blob_path",
    "check_content",
    "decompressed",
    "ensure_directory",
    "entry_path",
    "finish_directories",
    "open_blob",
    "open_layout",
    "parse_config",
    "parse_reference",
    "private_dir",
    "pull",
    "read_json_blob",
    "remove_path",
    "resolve_in_root",
    "skopeo_command",
    "unpack",
    "verify_open_blob",
]
