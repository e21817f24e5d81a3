"""Tables. Every row that belongs to a user carries ``owner_id``.

The schema itself is created by the Alembic migrations in ``migrations/``; these
classes must describe the same tables (tests/unit/test_store.py compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utc_now() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC when read back.

    SQLite has no time zones: it would hand back naive datetimes, PostgreSQL
    aware ones. Normalising here keeps comparisons and JSON output identical.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # None: the user can only authenticate with API keys (e.g. the bootstrap admin).
    password_hash: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    # The first characters of the key, shown in listings so a user can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 hex of the whole key; the key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class SandboxSession(Base):
    """A session id names the VM a client works with; ids are per-owner namespaces."""

    __tablename__ = "sessions"

    owner_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class Vm(Base):
    __tablename__ = "vms"
    __table_args__ = (
        ForeignKeyConstraint(
            ["owner_id", "session_id"], ["sessions.owner_id", "sessions.id"], ondelete="CASCADE"
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    session_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), index=True)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    vcpu_count: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    image_variant: Mapped[str] = mapped_column(String(64))
    # "metadata" is reserved by SQLAlchemy's declarative base, hence the attribute name.
    labels: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    env_status: Mapped[str] = mapped_column(String(16), default="none")
    env_error: Mapped[str | None] = mapped_column(Text)
    egress_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Egress (migration 0005): set when the policy allows something but the host
    # gives the VM no network at all (it then reaches nothing); says why.
    network_error: Mapped[str | None] = mapped_column(Text)
    share: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    custom_domain: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    vault_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    snapshot_on_terminate: Mapped[bool] = mapped_column(Boolean, default=False)
    snapshot_name: Mapped[str | None] = mapped_column(String(255))
    auto_suspend: Mapped[bool] = mapped_column(Boolean, default=False)
    auto_resume: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now, onupdate=utc_now)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    terminated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Snapshots (migration 0003). The snapshot the VM was created from, if any.
    snapshot_id: Mapped[str | None] = mapped_column(String(64))
    # The snapshot whose disk the VM's own overlay is written on top of: while the
    # VM lives, that snapshot (and so its ancestors) cannot be deleted.
    disk_snapshot_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # The snapshot taken when the VM was terminated (snapshot_on_terminate).
    terminate_snapshot_id: Mapped[str | None] = mapped_column(String(64))
    # Its volume mounts (migration 0009), read with the VM: its record shows them.
    mounts: Mapped[list[VolumeMount]] = relationship(
        lazy="selectin", order_by="VolumeMount.id", viewonly=True
    )


class ExecutionTask(Base):
    """A code run started by ``POST /execute_async``; its result is kept after it ends."""

    __tablename__ = "execution_tasks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    session_id: Mapped[str] = mapped_column(String(128))
    vm_id: Mapped[str] = mapped_column(String(64))
    language: Mapped[str] = mapped_column(String(16))
    command: Mapped[str] = mapped_column(Text)
    # running, then complete (it ran, whatever its exit code) or failed (it could not run
    # to its end: the VM or the server went away); see kiln.services.execution.
    status: Mapped[str] = mapped_column(String(16), index=True)
    stdout: Mapped[str] = mapped_column(Text, default="")
    stderr: Mapped[str] = mapped_column(Text, default="")
    exit_code: Mapped[int | None] = mapped_column(Integer)
    cpu_time: Mapped[float | None] = mapped_column(Float)
    execution_time: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Snapshot(Base):
    """A saved VM: memory, device state and disk, in ``directory``.

    ``type`` is ``user`` (POST /v1/vms/{id}/snapshot), ``auto`` (taken at
    terminate), ``base`` (an image booted once, shared by every user: no owner),
    ``system`` (published by the operator for every user: no owner), ``suspend``
    (a suspended VM's state; never listed, removed with its VM), ``layer`` or
    ``staging`` (a build on its way to a system snapshot; never listed).
    """

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str | None] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(16), index=True)
    status: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    vcpu_count: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    image_variant: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    source_vm_id: Mapped[str | None] = mapped_column(String(64))
    # The snapshot whose disk this one's disk is written on top of.
    parent_id: Mapped[str | None] = mapped_column(String(64), index=True)
    directory: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    # The volume drives the saved VM had (migration 0009): each drive's mount
    # and where it sat, and the checkpoint of its volume that holds what it
    # held at the save (``kiln.node.participant.SavedDrive``); a restore
    # mounts those volumes again.
    mounts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # A snapshot built from build_args (migration 0014): what the build did so
    # far, step by step with each step's output (its tail); None for the others.
    build_log: Mapped[str | None] = mapped_column(Text, default=None)


class Volume(Base):
    """A persistent volume: an ext4 filesystem of at most ``quota_bytes``
    (``kiln.volumes`` keeps its files under the data dir, by this id)."""

    __tablename__ = "volumes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    quota_bytes: Mapped[int] = mapped_column(BigInteger)
    # As last counted (the guest's statfs, or the image's superblock).
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now, onupdate=utc_now)


class VolumeCheckpoint(Base):
    """A user's checkpoint of a volume (its content at one moment, copy-on-write)."""

    __tablename__ = "volume_checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(255))
    # What its own layer takes on the host when it was made (the changes since the one before).
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class VolumeMount(Base):
    """A volume mounted in a VM (at create, or hot), for as long as the VM
    lives or until it is unmounted. ``status``: attaching, mounted, detaching,
    or failed (a background attach that did not work; ``failure_reason``)."""

    __tablename__ = "volume_mounts"
    __table_args__ = (UniqueConstraint("vm_id", "mount_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id", ondelete="CASCADE"), index=True)
    mount_path: Mapped[str] = mapped_column(String(1024))
    mode: Mapped[str] = mapped_column(String(2))  # rw or ro
    checkpoint_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class HostResourceRow(Base):
    """One thing Kiln made on the host for a VM (a run dir, a process, a cgroup,
    a network namespace...), recorded before it is made and deleted after it is
    gone (``kiln.node.participant.HostResource``). ``owner_id`` is informative
    (no foreign key): rows outlive users and VMs until the host is clean."""

    __tablename__ = "host_resources"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    vm_id: Mapped[str] = mapped_column(String(64), index=True)
    owner_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class Share(Base):
    """A VM's port served by the share router at ``<id>.<KILN_SHARE_DOMAIN>``.

    ``status`` is ``active`` or ``revoked`` (the router answers 404 for a
    revoked share; a deleted one has no row)."""

    __tablename__ = "shares"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(64), index=True)
    port: Mapped[int] = mapped_column(Integer)
    is_public: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class CustomDomain(Base):
    """A domain of a user's, served by the share router over HTTPS for one share.

    ``status``: ``pending`` (records shown, not checked), ``verifying`` (records
    published/checked, the certificate ordered), ``issued``, ``failed`` (with
    ``last_error``). ``dns_credentials`` is sealed (``kiln.crypto.sealing``) and
    never returned. ``acme_order`` is the ACME order in progress (no secret)."""

    __tablename__ = "custom_domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    domain: Mapped[str] = mapped_column(String(253), unique=True)
    share_id: Mapped[str] = mapped_column(String(64), index=True)
    vm_id: Mapped[str] = mapped_column(String(64), index=True)
    # Made by POST /v1/vms with custom_domain (shown in that VM's record).
    made_with_vm: Mapped[bool] = mapped_column(Boolean, default=False)
    dns_provider: Mapped[str] = mapped_column(String(32))
    dns_credentials: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    dns_records: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # The records the provider published (removed when the domain goes).
    published: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    last_error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[str | None] = mapped_column(Text)
    acme_order: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    certificate: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    verified_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    issued_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # When the certificate in force runs out (the renewal loop's index).
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)


class SshKey(Base):
    """A public key its owner logs in to the SSH gateway with (``/v1/ssh-keys``).

    ``fingerprint`` is OpenSSH's ``SHA256:<base64>`` of the key blob; one owner
    registers a key once (another user may register the same public key: it
    opens only VMs of the user whose VM is named at login)."""

    __tablename__ = "ssh_keys"
    __table_args__ = (UniqueConstraint("owner_id", "fingerprint", name="uq_ssh_keys_owner_fingerprint"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    fingerprint: Mapped[str] = mapped_column(String(128), index=True)
    key_type: Mapped[str] = mapped_column(String(64))
    # The key as one OpenSSH line: "<type> <base64>" (the comment apart).
    public_key: Mapped[str] = mapped_column(Text)
    comment: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class Event(Base):
    """One thing that happened (the audit log, and the outbox webhooks are fed from).

    Written in the same transaction as the change it records, so a crash never
    loses one nor invents one. ``owner_id`` is the user the event belongs to
    (None for the host's own events, e.g. a login for an unknown name); no
    foreign key: the log outlives the users it names. The id orders events and
    is the cursor of ``GET /v1/audit/events``."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now, index=True)
    owner_id: Mapped[int | None] = mapped_column(Integer, index=True)
    # user (a request of the owner's), system (the server's own loops), anonymous.
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str | None] = mapped_column(String(128))
    event_group: Mapped[str] = mapped_column(String(32), index=True)
    event_type: Mapped[str] = mapped_column(String(64), index=True)
    # success, failure, denied (a refusal: quota, login).
    status: Mapped[str] = mapped_column(String(16))
    vm_id: Mapped[str | None] = mapped_column(String(64), index=True)
    session_id: Mapped[str | None] = mapped_column(String(128))
    resource_type: Mapped[str | None] = mapped_column(String(32))
    resource_id: Mapped[str | None] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error_message: Mapped[str | None] = mapped_column(Text)


class WebhookEndpoint(Base):
    """Where a user wants their events sent (``/v1/webhooks/endpoints``).

    ``secret`` is sealed (``kiln.crypto.sealing``, bound to the row) and shown
    only when made or rotated; ``secret_hint`` is its last characters."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    # fnmatch patterns of event types ("vm.*", "snapshot.ready"); ["*"]: every type.
    event_patterns: Mapped[list[str]] = mapped_column(JSON, default=list)
    timeout_seconds: Mapped[int] = mapped_column(Integer)
    max_retries: Mapped[int] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    secret: Mapped[str] = mapped_column(Text)
    secret_hint: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    verified_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class WebhookDelivery(Base):
    """One event to send to one endpoint, and every attempt made (the outbox's
    other half: made with the event, so a restart finds what is still due).

    ``status``: ``pending`` (due at ``next_attempt_at``), ``succeeded`` (a 2xx),
    ``failed`` (``max_retries`` used up, or the endpoint gone or disabled)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    # No foreign key: events are pruned after their retention, deliveries may stay.
    event_id: Mapped[int | None] = mapped_column(Integer)
    event_type: Mapped[str] = mapped_column(String(64))
    # The event as it is sent (the body is made from it at each attempt).
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    # [{"at", "status_code", "error", "duration_ms"}], oldest first.
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    replay_of: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class UsageInterval(Base):
    """The usage ledger: one row per stretch of time a VM ran (or was suspended) with its shape.

    Opened when the VM enters ``running`` (or ``suspended``) and closed when it leaves it, in the
    transaction of the transition; ``ended_at`` is None while it runs. Rows
    outlive their VM (no foreign key to ``vms``): usage is history."""

    __tablename__ = "usage_intervals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str] = mapped_column(String(128))
    vcpu_count: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    # What the VM's disk may grow to, plus its saved memory while suspended
    # (a suspended VM's interval has no vCPUs or memory: migration 0014_usage_disk).
    disk_mb: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
# ---- vaults (migration 0010_vaults)


class Vault(Base):
    """A named set of credentials and the services they are injected into."""

    __tablename__ = "vaults"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now, onupdate=utc_now)


class VaultCredential(Base):
    """A secret of a vault, sealed under the master key's vault purpose key (``kiln.crypto``);
    its plaintext is never stored and never returned."""

    __tablename__ = "vault_credentials"
    __table_args__ = (UniqueConstraint("vault_id", "name", name="uq_vault_credentials_name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    vault_id: Mapped[str] = mapped_column(ForeignKey("vaults.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    credential_type: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    sealed_value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    rotated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class VaultServiceBinding(Base):
    """A host a vault's credential goes to (the API's "service"), and how (``auth_config``)."""

    __tablename__ = "vault_services"
    __table_args__ = (UniqueConstraint("vault_id", "host", name="uq_vault_services_host"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    vault_id: Mapped[str] = mapped_column(ForeignKey("vaults.id", ondelete="CASCADE"), index=True)
    host: Mapped[str] = mapped_column(String(255))
    auth_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str | None] = mapped_column(Text)
    template_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class VaultCall(Base):
    """A request the egress proxy injected one of the vault's credentials into
    (``request-logs``; from the proxy's journal, ``kiln.vault.journal``)."""

    __tablename__ = "vault_calls"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    vault_id: Mapped[str] = mapped_column(ForeignKey("vaults.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(64))
    service_id: Mapped[str] = mapped_column(String(64))
    credential_id: Mapped[str] = mapped_column(String(64))
    credential_name: Mapped[str] = mapped_column(String(128))
    host: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
