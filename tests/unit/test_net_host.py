"""When the host cannot filter, it says why (and VMs get no network)."""

from __future__ import annotations

import pytest

from kiln.config import Settings
from kiln.net import host


def test_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    status, plan = host.probe(Settings())
    assert not status.available and "root" in status.reason and plan is not None


def test_missing_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.os, "geteuid", lambda: 0)
    monkeypatch.setattr(host.shutil, "which", lambda tool: None if tool == "conntrack" else f"/usr/sbin/{tool}")
    status, _ = host.probe(Settings())
    assert status.mode == "off" and "conntrack" in status.reason


def test_bad_settings() -> None:
    status, plan = host.probe(Settings(net_blocked_cidrs=["10.0.0.0/33"]))
    assert status.mode == "off" and "networking settings" in status.reason and plan is None


def test_unknown_uplink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.os, "geteuid", lambda: 0)
    monkeypatch.setattr(host.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    monkeypatch.setattr(host.nft, "run", lambda commands: {})
    monkeypatch.setattr(host.Path, "exists", lambda self: "no-such-uplink" not in str(self))
    status, _ = host.probe(Settings(uplink="no-such-uplink"))
    assert status.mode == "off" and "KILN_UPLINK" in status.reason
