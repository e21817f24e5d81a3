"""Settings, read from the environment with the prefix ``KILN_`` (see CONTRACT.md)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


def _host_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


class Settings(BaseSettings):
    # CONTRACT.md also names KILN_SHARE_DOMAIN, KILN_MASTER_KEY, KILN_UPLINK,
    # KILN_DNS_UPSTREAM and KILN_EGRESS_CA_BUNDLE: they arrive with the networking
    # and vault features that read them.
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    data_dir: Path = Path("./var")
    cache_dir: Path = Path("~/.cache/kiln").expanduser()
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    pool_size: int = 0

    # Admission limits: the whole host. None means "derive from the host".
    max_vms: int | None = None
    max_memory_mb: int | None = None
    max_vcpus: int | None = None

    # Per-VM policy: defaults and allowed ranges for create requests.
    default_memory_mb: int = 512
    default_vcpu_count: int = 2
    default_lifetime_seconds: int = 300
    min_memory_mb: int = 128
    vm_max_memory_mb: int = 8192
    vm_max_vcpus: int = 8
    max_lifetime_seconds: int = 7 * 24 * 3600

    # Bearer tokens from POST /v1/auth/token.
    token_ttl_seconds: int = 3600

    # How long a create may wait for the guest agent before the VM is failed.
    boot_timeout_seconds: float = 60.0

    # Snapshots: a snapshot's disk is written on top of its parent's; past this
    # many snapshot layers it is flattened (in the background) onto the image.
    max_disk_chain: int = 8

    # Volumes (kiln/volumes/README.md). The bounds of a volume's size (its quota).
    volume_min_bytes: int = 16 * 1024 * 1024
    volume_max_bytes: int = 1024**4
    # Layers of a volume's qcow2 chain (one per checkpoint kept, or deleted and
    # not merged yet): reads walk the chain, so it stays short.
    volume_max_layers: int = 32
    # The unprivileged user e2fsprogs run as on volume images (they parse what
    # a guest wrote).
    volume_tools_user: str = "nobody"

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir.resolve() / 'kiln.db'}"

    @property
    def admission_max_vms(self) -> int:
        return self.max_vms if self.max_vms is not None else 100

    @property
    def admission_max_memory_mb(self) -> int:
        # Leave a quarter of the host (at least 1 GiB) to the host itself.
        if self.max_memory_mb is not None:
            return self.max_memory_mb
        total = _host_memory_mb()
        return max(total - max(total // 4, 1024), 256)

    @property
    def admission_max_vcpus(self) -> int:
        # Memory is the real bound, not vCPUs. Guest RAM a VM has touched stays
        # with its QEMU process (an idle VM: ~106 MB RSS, ~52 MB PSS for 256 MB),
        # and overcommitting it ends with the host's OOM killer taking a VM; a vCPU
        # is a host thread that only costs CPU when the guest runs (an idle TCG
        # guest: ~0.6% of a core), and overcommitting CPU only slows busy VMs
        # down. So vCPUs overcommit far: this cap only stops a runaway number of
        # busy threads per host CPU (2 CPUs: 128 vCPUs; the memory limit admits
        # ~70 VMs of 256 MB on a 24 GB host first).
        if self.max_vcpus is not None:
            return self.max_vcpus
        return (os.cpu_count() or 1) * 64

    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def volumes_dir(self) -> Path:
        return self.data_dir / "volumes"

    @property
    def images_dir(self) -> Path:
        return self.cache_dir / "images"


@lru_cache
def get_settings() -> Settings:
    return Settings()
