"""Settings, read from the environment with the prefix ``KILN_`` (see CONTRACT.md)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _host_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    data_dir: Path = Path("./var")
    cache_dir: Path = Path("~/.cache/kiln").expanduser()
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    pool_size: int = 0
    # Pool VMs run a bash and a python3 once when made, so a claimed VM's first
    # exec does not pay for translating them (TCG: 300-500 ms; kiln.node.pool).
    pool_warm_up: bool = True

    # Admission limits: the whole host. None means "derive from the host".
    max_vms: int | None = None
    max_memory_mb: int | None = None
    max_vcpus: int | None = None

    # Memory (kiln/services/memory_pressure.py). Admission counts each VM at its
    # size; idle VMs hold a fraction of it, so the operator may admit this many
    # times the memory limit. The host's real state guards it: below the floor
    # (MemAvailable) no new VM starts; below the reclaim floor the idlest running
    # VMs are suspended until it is above again.
    memory_overcommit: float = Field(default=1.0, ge=1.0, le=20.0)
    memory_floor_mb: int = Field(default=1024, ge=0)
    memory_reclaim_floor_mb: int = Field(default=512, ge=0)

    # Per-user quotas (VMs that hold resources or a saved state, their vCPUs and
    # memory, snapshots and the disk they take). None: the host's limit.
    quota_vms: int | None = None
    quota_vcpus: int | None = None
    quota_memory_mb: int | None = None
    quota_snapshots: int = 100
    # Base snapshots (one per image build and VM shape, made by a cold boot the
    # first time a shape is asked for): at most this many shapes per image
    # build; a create of another shape boots cold and caches nothing.
    max_base_shapes: int = 8
    quota_disk_mb: int | None = None

    # Kiln keeps this much of the data disk free: creates and saves that would
    # eat into it (counting what running VMs may still write) are refused.
    disk_floor_mb: int = 1024

    # Per-VM policy: defaults and allowed ranges for create requests.
    default_memory_mb: int = 512
    default_vcpu_count: int = 2
    default_lifetime_seconds: int = 300
    min_memory_mb: int = 128
    vm_max_memory_mb: int = 8192
    vm_max_vcpus: int = 8
    max_lifetime_seconds: int = 7 * 24 * 3600

    # Browser sessions (kiln/services/browser.py): each is a VM of the browser
    # image of this shape (Chromium wants memory), ended after this lifetime.
    browser_memory_mb: int = 1024
    browser_vcpu_count: int = 2
    browser_lifetime_seconds: int = 1800

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
    # text: a line per record; json: one JSON object per line, with the request id.
    log_format: Literal["text", "json"] = "text"

    # OCI imports (POST /v1/snapshots with oci_image). Comma-separated in the
    # environment. Empty: no local layout and no registry may be imported from.
    oci_import_roots: Annotated[list[Path], NoDecode] = []
    oci_registries: Annotated[list[str], NoDecode] = []
    # What one import may unpack: bytes of file content, and tar entries.
    oci_max_unpacked_bytes: int = 16 * 1024**3
    oci_max_entries: int = 1_000_000

    # Image builds (POST /v1/snapshots with build_args): the mirrors the builder
    # VM's package managers use, written into its apt sources, pip.conf and
    # .npmrc; its egress then reaches exactly those hosts. Unset: the public
    # registries, through the package-manager group. The apt mirror is a URL
    # with its distribution and components ("bookworm main"; "./" for a flat
    # repository); trusted: its Release file is not checked (an unsigned repository).
    apt_mirror: str | None = None
    apt_mirror_dist: str = "bookworm main"
    apt_mirror_trusted: bool = False
    pip_index_url: str | None = None
    npm_registry: str | None = None
    # How long one step of a build (an install, a clone, post_build_cmd) may run.
    build_step_timeout_seconds: float = 1800.0
    # The largest root disk a build's disk_size_gb may ask for (GiB).
    max_build_disk_gb: int = 32

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

    # QEMU as the unprivileged VM user in a cgroup per VM ("off": as Kiln's own
    # user, no cgroups; seccomp stays on). VM cgroups are made under <the
    # server's own cgroup>/<cgroup_parent> in each hierarchy.
    confinement: Literal["auto", "off"] = "auto"
    cgroup_parent: str = "kiln"

    # Guest networking (kiln.net) and the egress daemon (kiln.proxy). "off": VMs
    # get no network at all (an unwired card), whatever the host can do.
    networking: Literal["auto", "off"] = "auto"
    # The host interface allowed VM egress is routed and NATed out of; empty:
    # no VM traffic leaves the host at all.
    uplink: str = ""
    # IP[:PORT] the guest DNS asks for allowed names; empty: the host's first resolver.
    dns_upstream: str = ""
    # The registry domains an egress policy's allow_package_managers opens (over
    # HTTP and HTTPS): a TOML file in the format of the one Kiln ships
    # (kiln/services/package_managers.toml), which is used when this is unset.
    # Read at server start.
    egress_package_managers_file: Path | None = None
    # Every name Kiln makes on the host (namespaces <prefix>ns-<n>, veths
    # <prefix>v<n>) starts with this; at most 9 characters (IFNAMSIZ).
    net_prefix: str = "kiln"
    # The nftables table (family inet) that holds every VM's rules.
    net_nft_table: str = "kiln"
    # Each VM's address outside its namespace is one address of this pool.
    net_outside_pool: str = "198.18.0.0/16"
    # The host's address on every VM link: the guest DNS and the egress proxy
    # listen here (not inside the pool).
    net_host_address: str = "198.19.0.1"
    # The same in every VM's namespace: the guest is the last usable address of
    # this subnet, its gateway (and DNS server) the first.
    net_guest_subnet: str = "198.19.255.252/30"
    net_mtu: int = 1500
    net_dns_port: int = 53
    net_proxy_port: int = 15001
    # Owner of each VM's TAP when the VM's confinement names no user.
    net_tap_uid: int = 0
    # DNS answers the guest gets live at most this long (seconds); the kernel
    # admits their addresses this much longer, so a guest that uses a cached
    # answer until its TTL ends still reaches it.
    net_dns_max_ttl: int = 300
    net_dns_grace_seconds: int = 60
    # Firewall mark of the egress proxy's upstream connections (they may only
    # leave through the uplink).
    net_egress_mark: int = 0x4B494C4E
    # The CA bundle the egress proxy verifies vault services' certificates
    # against; None: the host's trust store.
    egress_ca_bundle: Path | None = None
    # Never reachable from a VM unless one of its allowed CIDRs lies inside
    # them; DNS answers in them are dropped (no rebinding onto internal hosts).
    net_blocked_cidrs: list[str] = [
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    ]  # fmt: skip

    # Volumes (kiln/volumes/README.md). The bounds of a volume's size (its quota).
    volume_min_bytes: int = 16 * 1024 * 1024
    volume_max_bytes: int = 1024**4
    # Layers of a volume's qcow2 chain (one per checkpoint kept, or deleted and
    # not merged yet): reads walk the chain, so it stays short.
    volume_max_layers: int = 32
    # The unprivileged user e2fsprogs run as on volume images (they parse what
    # a guest wrote).
    volume_tools_user: str = "nobody"

    # Shares (kiln.router, kiln/router/README.md). A share is served at
    # <share-id>.<share_domain>; a domain with ":port" is served (by a proxy in
    # front) on that port, else the URL names the router's own HTTP port.
    share_router: bool = True  # false: no router process (tests of the API alone)
    share_domain: str = "kiln.localhost"
    share_host: str = ""  # empty: the API's host (KILN_HOST)
    share_http_port: int = 8080
    # Signed links of private shares live this long unless the request says.
    share_link_ttl_seconds: int = 3600
    share_link_max_ttl_seconds: int = 30 * 24 * 3600
    # auto_suspend: a VM with no exec, no terminal and no share traffic for this
    # long is suspended.
    auto_suspend_idle_seconds: int = 300
    # 64 hex digits; empty: the key file $KILN_DATA_DIR/master-key, made on first start.
    master_key: str = ""

    # Custom domains (kiln.domains, kiln/domains/README.md). The router serves
    # them over HTTPS on this port (SNI picks the certificate; 0: no HTTPS).
    share_https_port: int = 8443
    # Where a custom domain must point: the router's public address (an IP: an
    # A/AAAA record; a name: a CNAME). Empty: no such record is asked for or checked.
    share_public_address: str = ""
    # ACME directory URL for custom-domain certificates (DNS-01); empty: none are issued.
    acme_directory: str = ""
    # CA bundle that verifies the ACME server's own HTTPS (empty: the system's).
    acme_ca_bundle: str = ""
    acme_email: str = ""
    # A certificate is renewed when it has less than this left; checked this often.
    acme_renew_before_days: float = 30.0
    acme_renew_check_seconds: float = 3600.0
    # IP[:PORT] of the resolver that finds a domain's authoritative servers
    # (its records are then asked of them directly); empty: the host's resolvers.
    domains_resolver: str = ""
    # How long published records may take to be served by every authoritative server.
    domains_propagation_seconds: float = 120.0
    # Let rfc2136 updates go to private, loopback or link-local DNS servers.
    domains_allow_private_dns: bool = False
    # Custom domains one user may hold.
    quota_custom_domains: int = 20
    # The SSH gateway (kiln.sshd, kiln/sshd/README.md): `ssh <vm_id>@<ssh_host> -p <ssh_port>`.
    # It listens there, and VM records name it. Empty host: the API's (KILN_HOST).
    ssh_gateway: bool = True  # false: no gateway process (tests of the API alone)
    ssh_host: str = ""
    ssh_port: int = 2222
    # The event stream (audit log, webhooks): events older than this are removed (hourly).
    events_retention_days: int = Field(default=30, ge=1)
    # Rows of things that ended (terminated and failed VMs, finished async tasks,
    # webhook deliveries that succeeded or failed) are removed this long after (hourly).
    rows_retention_days: int = Field(default=30, ge=1)
    # The automatic `kiln images prune` pass of a running server, every this many
    # seconds (0: never; the command still works).
    image_prune_interval_seconds: float = Field(default=3600.0, ge=0)
    # Webhooks (kiln/services/webhooks): endpoints on loopback, private or link-local
    # addresses are refused unless this is set (tests set it for their receiver).
    webhook_allow_private: bool = False
    webhook_poll_seconds: float = Field(default=1.0, gt=0)
    # The wait before retry n is base * 2^(n-1) seconds, at most the max.
    webhook_retry_base_seconds: float = Field(default=5.0, gt=0)
    webhook_retry_max_seconds: float = Field(default=600.0, gt=0)
    quota_webhook_endpoints: int = Field(default=20, ge=0)
    # GET /metrics takes `Authorization: Bearer <this>` (a scraper's credential) or
    # the admin's key; empty: the admin's key only.
    metrics_token: str = ""
    # Prices of the usage breakdown (GET /v1/users/me/usage-breakdown); 0: no cost shown.
    usage_dollars_per_vcpu_hour: float = Field(default=0.0, ge=0)
    usage_dollars_per_gib_hour: float = Field(default=0.0, ge=0)
    usage_dollars_per_disk_gib_hour: float = Field(default=0.0, ge=0)

    @property
    def share_listen_host(self) -> str:
        return self.share_host or self.host

    @property
    def ssh_listen_host(self) -> str:
        return self.ssh_host or self.host

    @property
    def sshd_state_dir(self) -> Path:
        """The SSH gateway's pid, log, settings, host key and the relay socket (0700)."""
        return self.data_dir / "sshd"

    @property
    def router_state_dir(self) -> Path:
        """The share router's pid, log, settings and the two control sockets (0700)."""
        return self.data_dir / "router"

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

    @property
    def domains_dir(self) -> Path:
        """Custom domains' certificates, order keys and the ACME account (0700)."""
        return self.data_dir / "domains"

    @property
    def net_state_dir(self) -> Path:
        """Each VM's egress policy for the egress daemon, its control socket (0700)."""
        return self.data_dir / "net"


@lru_cache
def get_settings() -> Settings:
    return Settings()
