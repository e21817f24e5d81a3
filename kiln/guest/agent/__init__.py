"""The Kiln guest agent: serves the host's requests inside the VM.

Stdlib only. In a guest, PID 1 starts (and respawns) ``python3 -S -m agent``
with ``/opt/kiln`` on the path, and the agent talks to the host over the
virtio-serial port ``kiln.agent``. On a developer host it serves a unix socket
(``--socket PATH``) or an inherited socket (``--fd N``) instead, which is how
the unit tests drive it. The module map is in ``kiln/guest/README.md``.
"""
