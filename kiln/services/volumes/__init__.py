"""Volumes, as users see them: records, checkpoints, the disk quota
(``service``), files (``files``), mounts in VMs and their rules (``mounts``,
``rules``), snapshots of VMs with volumes (``captures``), and the mechanism's
errors as service errors (``errors``). The host side is ``kiln.volumes``,
reached through the node (``kiln.node.volumes``)."""
