"""The ``kiln`` command (CONTRACT.md, "CLI").

``serve`` runs the API. ``users`` and ``keys`` work on the database directly
(migrating it first), so they work before the first start and next to a running
server. ``images`` drives the image store. ``vm`` is an HTTP client of a running
server (``KILN_URL``, ``KILN_API_KEY``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kiln.config import get_settings
from kiln.services.errors import ServiceError
from kiln.services.users import UserService
from kiln.store.db import Database

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
# What `kiln images publish` takes for a snapshot id rather than an image variant.
SNAPSHOT_ID_PREFIXES = ("snap-", "base-")
CLIENT_TIMEOUT_SECONDS = 600.0

app = typer.Typer(no_args_is_help=True, help="Kiln: self-hosted microVM sandboxes.")
users_app = typer.Typer(no_args_is_help=True, help="Manage users (works on the database).")
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (works on the database).")
images_app = typer.Typer(no_args_is_help=True, help="Build and list image variants.")
vm_app = typer.Typer(no_args_is_help=True, help="VMs, through a running server's API.")
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(images_app, name="images")
app.add_typer(vm_app, name="vm")

err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


# -- serve ------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (KILN_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (KILN_PORT).")] = None,
) -> None:
    """Run the API server in the foreground. SIGTERM stops it and leaves VMs running."""
    import uvicorn

    from kiln.api import logs
    from kiln.api.app import TOKEN_SECRET_FILE, create_app
    from kiln.services.auth import InvalidTokenSecret, load_or_create_secret

    settings = get_settings()
    logs.configure(settings.log_level, settings.log_format)
    try:
        # Checked here too (the app's start-up does it again) so that an unusable
        # secret ends the command with its message, not uvicorn's traceback.
        load_or_create_secret(settings.data_dir / TOKEN_SECRET_FILE)
    except InvalidTokenSecret as error:
        fail(str(error))
    from kiln.services.egress_policy import EgressPolicies, PackageManagersFileError

    try:
        EgressPolicies.load(settings.egress_package_managers_file)  # so is the package-manager group
    except PackageManagersFileError as error:
        fail(str(error))
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        # Logging is configured above (kiln.api.logs): one redacting handler.
        log_config=None,
        log_level=settings.log_level,
        # Connections still open after this are cut; the VMs themselves keep running.
        timeout_graceful_shutdown=10,
    )


# -- users and keys -----------------------------------------------------------------


def on_database(work: Callable[[UserService], Awaitable[T]]) -> T:
    """Run ``work`` against the migrated database; service errors end the command."""

    async def run() -> T:
        db = Database(get_settings().database)
        try:
            await db.migrate()
            return await work(UserService(db))
        finally:
            await db.close()

    try:
        return asyncio.run(run())
    except ServiceError as error:
        fail(str(error))


@users_app.command("create")
def create_user(
    name: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read a password from the first line of stdin.")
    ] = False,
) -> None:
    """Create a user and print its id."""
    password = read_password(name, True) if password_stdin else None
    user = on_database(lambda users: users.create_user(name, password))
    print(user.id)


def read_password(name: str, from_stdin: bool) -> str:
    """The first line of stdin (--password-stdin), or asked twice without echo."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            fail("no password on stdin")
        return password
    password = typer.prompt(f"New password for {name}", hide_input=True, confirmation_prompt=True)
    if not password:
        fail("the password must not be empty")
    return str(password)


@users_app.command("passwd")
def set_password(
    name: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
    ] = False,
) -> None:
    """Set a user's password (for POST /v1/auth/token); asks for it unless --password-stdin.

    Bearer tokens issued before keep working until they expire (KILN_TOKEN_TTL_SECONDS)."""
    password = read_password(name, password_stdin)
    on_database(lambda users: users.set_password(name, password))
    err.print(f"password of {name!r} changed")


@keys_app.command("ls")
def list_keys(
    user: Annotated[str, typer.Option("--user", help="The user whose keys to list.")],
) -> None:
    """List a user's API keys (ids, names and the first characters; never the keys)."""

    async def work(users: UserService) -> list[Any]:
        owner = await users.get_user_by_name(user)
        return await users.list_api_keys(owner.id)

    table = Table("id", "name", "prefix", "created at", "last used at")
    for key in on_database(work):
        table.add_row(
            str(key.id), key.name, key.prefix + "...", str(key.created_at), str(key.last_used_at or "")
        )
    Console().print(table)


@keys_app.command("revoke")
def revoke_key(key_id: Annotated[int, typer.Argument(help="The key's id (see kiln keys ls).")]) -> None:
    """Delete an API key of any user. A running server stops accepting it within
    a few seconds (its cache of checked keys lives that long)."""
    from kiln.services.users import REVOCATION_DELAY_SECONDS

    key = on_database(lambda users: users.revoke_api_key(key_id))
    err.print(
        f"revoked key {key.id} ({key.name!r}, {key.prefix}...); a running server refuses it "
        f"within {REVOCATION_DELAY_SECONDS:g} s"
    )


@keys_app.command("create")
def create_key(
    user: Annotated[str, typer.Option("--user", help="The user the key belongs to.")],
    name: Annotated[str, typer.Option(help="A label to tell keys apart.")] = "cli",
) -> None:
    """Create an API key; the key is the last line printed (and is shown only now)."""

    async def work(users: UserService) -> str:
        owner = await users.get_user_by_name(user)
        return (await users.create_api_key(owner.id, name)).key

    key = on_database(work)
    err.print(f"API key for {user!r} (it is not shown again):")
    print(key)


# -- images --------------------------------------------------------------------------


@images_app.command("build")
def build_images(
    variant: Annotated[str | None, typer.Argument(help="A variant; all of them if omitted.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache has it.")] = False,
    base_snapshot: Annotated[
        bool,
        typer.Option(help="Then boot each image once and save its base snapshot (default shape)."),
    ] = True,
) -> None:
    """Build image variants (cached; fast when nothing changed), and the base
    snapshot of each for the default VM shape: VMs are restored from it."""
    from kiln.runtime.images import ImageStore, UnknownVariant

    store = ImageStore(get_settings())
    built = []
    variants = [variant] if variant else store.variants()
    with Progress(
        TextColumn("[bold]{task.fields[variant]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        for name in variants:
            task = progress.add_task("starting", variant=name, total=None)

            def report(step: str, done: int, total: int, task: Any = task) -> None:
                progress.update(task, description=step, completed=done, total=total)

            try:
                image = store.build(name, force=force, progress=report)
            except UnknownVariant:
                fail(f"unknown image variant {name!r} (known: {', '.join(store.variants())})")
            progress.update(task, description=f"ready: {image.rootfs.parent}")
            built.append(image)
    if base_snapshot:
        for image in built:
            saved = make_base_snapshot(image)
            err.print(f"[bold]{image.variant}[/bold]: base snapshot {saved.directory}")


def make_base_snapshot(image: Any) -> Any:
    """The image's base snapshot for the default shape (a cold boot if not cached).
    The build's VM comes up through the node's pipeline, confined like every
    VM (no network: its card is unwired)."""
    from kiln.browser.guest import WARM_UPS
    from kiln.node.host import build_node
    from kiln.node.launcher import PipelineLauncher
    from kiln.node.ledger import MemoryLedger
    from kiln.runtime.qemu import QemuHypervisor
    from kiln.runtime.snapshots import BaseSnapshots, Shape

    settings = get_settings().model_copy(update={"networking": "off"})
    shape = Shape(settings.default_memory_mb, settings.default_vcpu_count)
    hypervisor = QemuHypervisor(settings)

    async def make() -> Any:
        node = build_node(settings, hypervisor, MemoryLedger())
        await node.start_host()
        return await BaseSnapshots(settings, hypervisor, PipelineLauncher(node), WARM_UPS).ensure(image, shape)

    err.print(f"[bold]{image.variant}[/bold]: making its base snapshot ({shape}) ...")
    return asyncio.run(make())


@images_app.command("ls")
def list_images() -> None:
    """List image variants and their builds."""
    from kiln.runtime.images import ImageStore

    rows = ImageStore(get_settings()).describe()
    table = Table("variant", "built", "stale", "size", "built at", "path")
    for row in rows:
        size = f"{row['size'] / 2**20:.0f} MiB" if row.get("size") else ""
        table.add_row(
            row["variant"],
            "yes" if row.get("built") else "no",
            {True: "yes", False: "no"}.get(bool(row["stale"]), "") if "stale" in row else "",
            size,
            str(row.get("built_at") or ""),
            str(row.get("path") or ""),
        )
    Console().print(table)
    from kiln.runtime.qemu import QemuHypervisor
    from kiln.runtime.snapshots import BaseSnapshots

    settings = get_settings()
    snapshots = Table("base snapshot", "memory", "vcpus", "size", "path")
    for row in BaseSnapshots(settings, QemuHypervisor(settings)).describe():
        snapshots.add_row(
            row["key"],
            f"{row['memory_mb']} MB",
            str(row["vcpu_count"]),
            f"{row['size'] / 2**20:.0f} MiB",
            row["path"],
        )
    Console().print(snapshots)


@images_app.command("prune")
def prune_images(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go; remove nothing.")] = False,
    data_dir: Annotated[
        list[Path] | None,
        typer.Option(help="Another data dir sharing this cache, whose VMs and snapshots must keep theirs."),
    ] = None,
) -> None:
    """Remove image builds and base snapshots nothing needs (the current build of each variant stays)."""
    from kiln.runtime.prune import prune_cache

    settings = get_settings()
    # Waits for an image build that is running (it holds the cache).
    plan, freed = prune_cache(settings, [settings.data_dir, *(data_dir or [])], dry_run=dry_run, wait=True)
    for path, why in sorted(plan.keep.items()):
        err.print(f"keep   {path.name}: {why}")
    for path in plan.remove:
        err.print(f"{'would remove' if dry_run else 'remove'} {path.name}")
    print(f"{'would free' if dry_run else 'freed'} {freed / 2**20:.0f} MiB ({len(plan.remove)} directories)")


@images_app.command("publish")
def publish_image(
    source: Annotated[str, typer.Argument(help="An image variant, or one of the admin's snapshots (snap-...).")],
    name: Annotated[str | None, typer.Option(help="The system snapshot's name (users find it by it).")] = None,
    memory_mb: Annotated[int | None, typer.Option("--memory", help="A variant's shape: memory in MB.")] = None,
    vcpus: Annotated[int | None, typer.Option(help="A variant's shape: vCPUs.")] = None,
) -> None:
    """Publish a system snapshot every user can list and create VMs from (through the
    running server, with the admin's key in KILN_API_KEY)."""
    body: dict[str, Any] = {"name": name, "memory_mb": memory_mb, "vcpu_count": vcpus}
    body["snapshot_id" if source.startswith(SNAPSHOT_ID_PREFIXES) else "image_variant"] = source
    print_json(api_request("POST", "/v1/system-snapshots", json={k: v for k, v in body.items() if v is not None}))


@images_app.command("unpublish")
def unpublish_image(snapshot_id: Annotated[str, typer.Argument(help="The system snapshot's id.")]) -> None:
    """Remove a system snapshot (refused while a VM or snapshot builds on it)."""
    print_json(api_request("DELETE", f"/v1/system-snapshots/{snapshot_id}"))


# -- vm: a client of a running server ----------------------------------------------------


def api_endpoint() -> tuple[str, str]:
    """The server's URL and the API key, from KILN_URL and KILN_API_KEY."""
    url = os.environ.get("KILN_URL", DEFAULT_URL).rstrip("/")
    key = os.environ.get("KILN_API_KEY")
    if not key:
        fail("set KILN_API_KEY (the admin's is in $KILN_DATA_DIR/admin-api-key)")
    return url, key


def error_detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return detail if isinstance(detail, str) else json.dumps(detail)


def api_request(method: str, path: str, **kwargs: Any) -> Any:
    url, key = api_endpoint()
    try:
        response = httpx.request(
            method,
            url + path,
            headers={"X-API-Key": key},
            timeout=CLIENT_TIMEOUT_SECONDS,
            **kwargs,
        )
    except httpx.HTTPError as error:
        fail(f"cannot reach {url}: {error}")
    if response.is_error:
        fail(f"{response.status_code}: {error_detail(response)}")
    return response.json()


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator:
            fail(f"--env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


@vm_app.command("create")
def create_vm(
    memory_mb: Annotated[int | None, typer.Option("--memory", help="Memory in MB.")] = None,
    vcpus: Annotated[int | None, typer.Option(help="Number of vCPUs.")] = None,
    lifetime: Annotated[int | None, typer.Option(help="Lifetime in seconds.")] = None,
    image: Annotated[str | None, typer.Option(help="Image variant.")] = None,
    session: Annotated[str | None, typer.Option(help="Session id to bind the VM to.")] = None,
    env: Annotated[list[str], typer.Option(help="NAME=VALUE, repeatable.")] = [],  # noqa: B006
    metadata: Annotated[str | None, typer.Option(help="A JSON object.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the VM runs.")] = True,
) -> None:
    """Create a VM and print the answer."""
    body: dict[str, Any] = {
        "memory_mb": memory_mb,
        "vcpu_count": vcpus,
        "vm_lifetime_seconds": lifetime,
        "image_variant": image,
        "session_id": session,
        "env": parse_env(env) or None,
        "metadata": json.loads(metadata) if metadata else None,
    }
    body = {key: value for key, value in body.items() if value is not None}
    print_json(api_request("POST", "/v1/vms", params={"wait": str(wait).lower()}, json=body))


@vm_app.command("ls")
def list_vms(
    all_: Annotated[bool, typer.Option("--all", help="Include ended VMs.")] = False,
) -> None:
    """List VMs (live ones unless --all)."""
    vms = api_request("GET", "/v1/vms/" if all_ else "/v1/vms")
    table = Table("vm_id", "status", "session_id", "vcpus", "memory", "image", "expires_at")
    for vm in vms:
        table.add_row(
            vm["vm_id"],
            vm["status"],
            vm["session_id"],
            str(vm["vcpu_count"]),
            f"{vm['memory_mb']} MB",
            vm["image_variant"],
            vm["expires_at"],
        )
    Console().print(table)


@vm_app.command("get")
def get_vm(vm_id: str) -> None:
    """Print a VM's record."""
    print_json(api_request("GET", f"/v1/vms/{vm_id}"))


@vm_app.command("rm")
def remove_vm(vm_id: str) -> None:
    """Terminate a VM."""
    print_json(api_request("DELETE", f"/v1/vms/{vm_id}"))


def server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream, one per blank-line-ended block."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", list[str]()
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].removeprefix(" "))


@vm_app.command("exec")
def exec_in_vm(
    vm_id: str,
    command: Annotated[list[str], typer.Argument(help="After --: the command and its arguments.")],
    language: Annotated[str, typer.Option(help="bash or python.")] = "bash",
    timeout: Annotated[float | None, typer.Option(help="Seconds before it is killed.")] = None,
) -> None:
    """Run a command in a VM, printing its output as it comes; exits with its exit code.

    One argument is a shell command line (kiln vm exec VM -- 'ls | wc -l'); several
    are quoted as separate words (kiln vm exec VM -- ls -l /app).
    """
    url, key = api_endpoint()
    body = {
        "command": command[0] if len(command) == 1 else shlex.join(command),
        "language": language,
        "timeout": timeout,
    }
    exit_code = 1
    try:
        with httpx.stream(
            "POST",
            f"{url}/v1/vms/{vm_id}/execute/stream",
            headers={"X-API-Key": key},
            json=body,
            timeout=httpx.Timeout(CLIENT_TIMEOUT_SECONDS, read=None),
        ) as response:
            if response.is_error:
                response.read()
                fail(f"{response.status_code}: {error_detail(response)}")
            for event, data in server_sent_events(response.iter_lines()):
                if event in ("stdout", "stderr"):
                    stream = sys.stdout if event == "stdout" else sys.stderr
                    stream.write(json.loads(data))
                    stream.flush()
                elif event == "exit":
                    code = json.loads(data)["exit_code"]
                    # A signal's death (-9) as a shell reports it (137).
                    exit_code = code if code >= 0 else 128 - code
                elif event == "error":
                    fail(json.loads(data)["detail"])
    except httpx.HTTPError as error:
        fail(f"cannot reach {url}: {error}")
    raise typer.Exit(exit_code)


# -- bench ------------------------------------------------------------------------------


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="Few samples; finishes in under 3 minutes.")] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the figures as JSON to this file.")
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(help="Comma-separated phases to run, e.g. raw,exec (see bench/README.md)."),
    ] = None,
) -> None:
    """Benchmark kiln against raw QEMU in the same run (see bench/README.md)."""
    # The suite lives in the checkout's bench/ (next to kiln/), not in the
    # installed package: put the checkout on the path to import it.
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "bench" / "suite.py").is_file():
        fail(f"no bench/ next to {checkout / 'kiln'}: kiln bench runs from a source checkout")
    sys.path.insert(0, str(checkout))
    from bench.suite import main as run_bench

    raise typer.Exit(run_bench(quick, json_file, only))


if __name__ == "__main__":
    app()
