"""Settings, read from the environment with the prefix ``KILN_`` (see CONTRACT.md)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


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

    # Per-user quotas (VMs that hold resources or a saved state, their vCPUs and
    # memory, snapshots and the disk they take). None: the host's limit.
    quota_vms: int | None = None
    quota_vcpus: int | None = None
    quota_memory_mb: int | None = None
    quota_snapshots: int = 100
    quota_disk_mb: int | None = None

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
    # How long a call to a guest agent may take when it names no time limit of
    # its own (file chunks, terminals, env); a wedged guest answers 503 after it.
    agent_deadline_seconds: float = 30.0

    # Snapshots: a snapshot's disk is written on top of its parent's; past this
    # many snapshot layers it is flattened (in the background) onto the image.
    max_disk_chain: int = 8

    # Logging of `kiln serve` (secrets are redacted at every level: kiln.api.logs).
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # OCI imports (POST /v1/snapshots with oci_image). Comma-separated in the
    # environment. Empty: no local layout and no registry may be imported from.
    oci_import_roots: Annotated[list[Path], NoDecode] = []
    oci_registries: Annotated[list[str], NoDecode] = []
    # What one import may unpack: bytes of file content, and tar entries.
    oci_max_unpacked_bytes: int = 16 * 1024**3
    oci_max_entries: int = 1_000_000

    # Request and transfer limits (413 past them). A request body (counted as it
    # arrives, chunked or not), except POST /upload, whose body may be as large
    # as the upload limit plus the multipart framing.
    max_request_bytes: int = 16 * 1024 * 1024
    max_upload_bytes: int = 1024**3
    max_download_bytes: int = 1024**3

    @field_validator("oci_import_roots", "oci_registries", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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
