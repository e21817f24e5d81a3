"""A devbox template's manifest (``instavm.yaml``) as the SDK's
``templates.publish`` and the CLI's ``template publish`` read it, and the name
of the system snapshot publish looks for before it builds one."""

from __future__ import annotations

from pathlib import Path

MANIFEST = """\
schema_version: 2
kind: devbox
slug: {slug}
name: Kiln contract
version: "{version}"
audience: devbox
vm:
  memory_mb: 256
  vcpus: 1
runtime: []
terminal:
  command: bash
  tmux_session: main
  cwd: /root
"""


def template_snapshot_name(slug: str, version: str = "1") -> str:
    """The system snapshot ``templates.publish`` reuses instead of building one."""
    return f"template/{slug}:{version}"


def write_manifest(directory: Path, slug: str, version: str = "1") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "instavm.yaml").write_text(MANIFEST.format(slug=slug, version=version))
    return directory
