"""Guest image variants: build, cache and find the kernel, initramfs and rootfs.

A variant is a manifest ``images/<variant>.toml``. A build has three layers, each
cached under ``settings.cache_dir`` so that only what changed is redone:

1. downloads: the kernel and busybox-static ``.deb`` files (``apt-get download``),
   unpacked once per package version;
2. the Debian base system: an ``mmdebstrap`` tarball keyed by suite, mirrors and
   package list (the slow step, about a minute);
3. the image itself: ``settings.images_dir/<variant>-<digest>/`` holding
   ``vmlinuz``, ``initrd.img`` and ``rootfs.ext4``, keyed by a digest of every
   input (manifest, agent, init files, this module, kernel and base versions).
   ``<variant>.current`` is a symlink naming the latest one.

Old image directories are never removed here: VM overlays and snapshots use
their ``rootfs.ext4`` as a backing file (``kiln images prune``, ``prune.py``,
removes the ones nothing names any more).

Building needs root (the base system's file ownership must survive into the
ext4 image) and the host's apt (Debian) for the downloads.
Run it without the CLI as ``python -m kiln.runtime.images build default``.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import gzip
import hashlib
import io
import json
import os
import py_compile
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import kiln
from kiln.config import Settings, get_settings
from kiln.runtime.driver import BootImage
from kiln.runtime.oci import ensure_directory, remove_path, resolve_in_root

Progress = Callable[[str, int, int], None]

REPO_IMAGES_DIR = Path(kiln.__file__).resolve().parent.parent / "images"
GUEST_DIR = Path(kiln.__file__).resolve().parent / "guest"

# Quiet, panics power off (QEMU runs with -no-reboot), no PCI bus on microvm.
KERNEL_CMDLINE = "console=ttyS0 root=/dev/vda rw quiet panic=-1 pci=off random.trust_cpu=on"
DEFAULT_MIRRORS = (
    "deb http://deb.debian.org/debian {suite} main",
    "deb http://deb.debian.org/debian {suite}-updates main",
    "deb http://deb.debian.org/debian-security {suite}-security main",
)
# Left out of the base system: nobody reads them in a sandbox.
DPKG_PATH_FILTERS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
# Bump when the mmdebstrap invocation changes: it is part of the base layer's key.
BASE_LAYER_FORMAT = 1
BUSYBOX_PACKAGE = "busybox-static"
# The guest agent: the package kiln/guest/agent/ and protocol.py beside it, as
# /opt/kiln/agent/ and /opt/kiln/protocol.py (see guest_files).
GUEST_PACKAGE = "agent"
GUEST_MODULES = ("protocol.py",)
INIT_FILES = ("initramfs-init", "rc.sysinit", "inittab")
# In the cache dir: held while a build runs (and by a prune, which must not see a
# build renamed into place before its pointer moves).
BUILD_LOCK_FILE = ".build.lock"
# Where the guest agent's interpreter may be, first match wins; and how old it may be.
GUEST_PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
MIN_GUEST_PYTHON = (3, 9)
# Standard library modules the agent needs that python3-minimal lacks.
GUEST_PYTHON_MODULES = ("json", "asyncio")


class UnknownVariant(KeyError):
    """No manifest ``images/<variant>.toml``."""


class ImageBuildError(RuntimeError):
    """A build step failed; the message says which and why."""


class UnsuitableRootfs(ImageBuildError):
    """A root tree the guest agent cannot run in (no usable python3)."""


@dataclass(frozen=True)
class Manifest:
    variant: str
    description: str
    suite: str
    mirrors: tuple[str, ...]
    mmdebstrap_variant: str
    packages: tuple[str, ...]
    workdir: str
    free_space_mb: int
    kernel_package: str
    kernel_modules: tuple[str, ...]
    source: bytes  # the manifest file itself, hashed into the image key

    @classmethod
    def load(cls, variant: str, path: Path) -> Manifest:
        source = path.read_bytes()
        data = tomllib.loads(source.decode("utf-8"))
        rootfs, kernel = data["rootfs"], data["kernel"]
        suite = rootfs.get("suite", "bookworm")
        return cls(
            variant=variant,
            description=data.get("description", ""),
            suite=suite,
            mirrors=tuple(line.format(suite=suite) for line in rootfs.get("mirrors", DEFAULT_MIRRORS)),
            mmdebstrap_variant=rootfs.get("mmdebstrap_variant", "apt"),
            packages=tuple(sorted(rootfs.get("packages", []))),
            workdir=rootfs.get("workdir", "/root"),
            free_space_mb=int(rootfs.get("free_space_mb", 512)),
            kernel_package=kernel.get("package", "linux-image-cloud-amd64"),
            kernel_modules=tuple(kernel["modules"]),
            source=source,
        )

    def base_layer_key(self) -> str:
        """What the mmdebstrap tarball depends on, and nothing else."""
        return digest_of(
            json.dumps(
                [BASE_LAYER_FORMAT, self.suite, self.mirrors, self.mmdebstrap_variant,
                 self.packages, DPKG_PATH_FILTERS]
            ).encode()
        )


def digest_of(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(hashlib.sha256(part).digest())
    return hasher.hexdigest()


@dataclass(frozen=True)
class Kernel:
    version: str  # the uname -r, e.g. 6.1.0-56-cloud-amd64
    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64=6.1.192-2
    vmlinuz: Path
    modules_dir: Path


class ImageStore:
    """Finds built variants and builds them. Safe to construct without building."""

    def __init__(self, settings: Settings, manifests_dir: Path = REPO_IMAGES_DIR) -> None:
        self.settings = settings
        self.manifests_dir = manifests_dir
        self.images_dir = settings.images_dir
        self.downloads_dir = settings.cache_dir / "downloads"
        self.base_dir = settings.cache_dir / "rootfs-base"

    # ---- queries

    @property
    def init_dir(self) -> Path:
        return self.manifests_dir / "init"

    def guest_busybox(self, variant: str) -> Path:
        """The busybox binary the variant's current build put into its rootfs
        (also what an imported OCI image gets at /opt/kiln/busybox)."""
        info = self._current_build(variant)
        if info is not None:
            unpacked = self.downloads_dir / Path(info[1]["busybox"]).with_suffix("").name / "bin" / "busybox"
            if unpacked.is_file():
                return unpacked
        return self._unpacked(self._download(BUSYBOX_PACKAGE)) / "bin" / "busybox"

    def variants(self) -> list[str]:
        return sorted(path.stem for path in self.manifests_dir.glob("*.toml"))

    def manifest(self, variant: str) -> Manifest:
        path = self.manifests_dir / f"{variant}.toml"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", variant) or not path.is_file():
            raise UnknownVariant(variant)
        return Manifest.load(variant, path)

    def get(self, variant: str) -> BootImage | None:
        """The latest build of a variant, or None if it was never built."""
        self.manifest(variant)  # UnknownVariant for a typo, not a silent None
        info = self._current_build(variant)
        if info is None:
            return None
        directory, build = info
        return BootImage(
            variant=variant,
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.img",
            rootfs=directory / "rootfs.ext4",
            cmdline=build["cmdline"],
        )

    def describe(self) -> list[dict]:
        """One row per variant for ``kiln images ls``.

        ``stale`` means a local input (manifest, agent, init files, this module)
        changed since the build; Debian updates are only seen by a new build."""
        rows = []
        for variant in self.variants():
            info = self._current_build(variant)
            if info is None:
                rows.append({"variant": variant, "built": False, "path": None, "size": None,
                             "built_at": None, "stale": None})
                continue
            directory, build = info
            rows.append({
                "variant": variant,
                "built": True,
                "path": str(directory),
                "size": sum(path.stat().st_blocks * 512 for path in directory.iterdir()),
                "built_at": build["built_at"],
                "stale": build["local_inputs"] != self._local_inputs_digest(self.manifest(variant)),
            })
        return rows

    def _current_build(self, variant: str) -> tuple[Path, dict] | None:
        pointer = self.images_dir / f"{variant}.current"
        try:
            directory = self.images_dir / os.readlink(pointer)
            return directory, json.loads((directory / "build.json").read_text())
        except (OSError, ValueError):
            return None

    def _local_inputs_digest(self, manifest: Manifest) -> str:
        return digest_of(
            manifest.source,
            # Names too: a renamed or added agent module changes the image.
            *(part for name in guest_files() for part in (name.encode(), (GUEST_DIR / name).read_bytes())),
            *((self.manifests_dir / "init" / name).read_bytes() for name in INIT_FILES),
            Path(__file__).read_bytes(),
        )

    # ---- building

    def build(self, variant: str, force: bool = False, progress: Progress | None = None) -> BootImage:
        """Build (or find in the cache) a variant and make it the current one.

        Builds are serialised by a lock in the cache dir: concurrent callers (two
        test sessions, the server and the CLI) wait and then reuse the result."""
        manifest = self.manifest(variant)
        if os.geteuid() != 0:
            raise ImageBuildError("building images needs root (file ownership in the rootfs)")
        self.settings.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.settings.cache_dir / BUILD_LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._build_locked(manifest, force, progress)

    def _build_locked(self, manifest: Manifest, force: bool, progress: Progress | None) -> BootImage:
        variant = manifest.variant
        steps = ["kernel", "busybox", "base system", "initramfs", "rootfs", "install"]
        report = progress or (lambda step, done, total: None)

        def step(index: int) -> None:
            report(steps[index], index, len(steps))

        step(0)
        kernel = self._kernel(manifest.kernel_package)
        step(1)
        busybox_deb = self._download(BUSYBOX_PACKAGE)
        busybox = self._unpacked(busybox_deb) / "bin" / "busybox"
        step(2)
        base_tar = self._base_system(manifest, force)
        inputs = [
            self._local_inputs_digest(manifest).encode(),
            kernel.package.encode(),
            busybox_deb.name.encode(),
            base_tar.name.encode(),
        ]
        if force:
            # A new directory, never the old one rewritten: running VMs and
            # snapshots may use the old rootfs.ext4 as their backing file.
            inputs.append(str(time.time_ns()).encode())
        final_dir = self.images_dir / f"{variant}-{digest_of(*inputs)[:16]}"
        if final_dir.is_dir():
            step(5)
            self._point_current(variant, final_dir.name)
            report("done", len(steps), len(steps))
            return self._current(variant)

        self.images_dir.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix=f".build-{variant}-", dir=self.images_dir))
        work_dir.chmod(0o755)  # QEMU may run as another user than the build
        try:
            step(3)
            modules = resolve_module_order(kernel.modules_dir, manifest.kernel_modules)
            (work_dir / "initrd.img").write_bytes(build_initramfs(
                busybox, kernel.modules_dir, modules, self.manifests_dir / "init" / "initramfs-init"))
            shutil.copyfile(kernel.vmlinuz, work_dir / "vmlinuz")
            step(4)
            self._build_rootfs(manifest, base_tar, busybox, work_dir)
            step(5)
            (work_dir / "build.json").write_text(json.dumps({
                "variant": variant,
                "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "cmdline": KERNEL_CMDLINE,
                "kernel": kernel.package,
                "kernel_version": kernel.version,
                "busybox": busybox_deb.name,
                "base_layer": base_tar.name,
                "modules": modules,
                "local_inputs": self._local_inputs_digest(manifest),
            }, indent=2) + "\n")
            work_dir.rename(final_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        self._point_current(variant, final_dir.name)
        report("done", len(steps), len(steps))
        return self._current(variant)

    def _current(self, variant: str) -> BootImage:
        image = self.get(variant)
        if image is None:
            raise RuntimeError(f"image {variant!r} was built but cannot be read back")
        return image

    def _point_current(self, variant: str, target: str) -> None:
        pointer = self.images_dir / f"{variant}.current"
        temporary = self.images_dir / f".{variant}.current.tmp"
        temporary.unlink(missing_ok=True)
        os.symlink(target, temporary)
        os.replace(temporary, pointer)

    def _download(self, package: str) -> Path:
        """The candidate version's .deb of a package, downloaded once."""
        fields = apt_show(package)
        name = f"{fields['Package']}_{fields['Version'].replace(':', '%3a')}_{fields['Architecture']}.deb"
        target = self.downloads_dir / name
        if not target.exists():
            self.downloads_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.downloads_dir) as scratch:
                # apt drops privileges to _apt for downloads; let it write here.
                os.chmod(scratch, 0o777)
                run(["apt-get", "download", f"{fields['Package']}={fields['Version']}"], cwd=scratch)
                os.replace(Path(scratch) / name, target)
        return target

    def _unpacked(self, deb: Path) -> Path:
        directory = deb.with_suffix("")
        if not directory.is_dir():
            scratch = Path(tempfile.mkdtemp(dir=deb.parent))
            run(["dpkg-deb", "-x", str(deb), str(scratch)])
            scratch.rename(directory)
        return directory

    def _kernel(self, metapackage: str) -> Kernel:
        depends = apt_show(metapackage).get("Depends", "")
        match = re.search(r"(linux-image-[0-9][^\s,(]*)", depends)
        package = match.group(1) if match else metapackage
        deb = self._download(package)
        root = self._unpacked(deb)
        vmlinuz = next((root / "boot").glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise ImageBuildError(f"{deb.name} contains no /boot/vmlinuz-*")
        version = vmlinuz.name.removeprefix("vmlinuz-")
        return Kernel(version=version, package=deb.name, vmlinuz=vmlinuz,
                      modules_dir=root / "lib" / "modules" / version)

    def _base_system(self, manifest: Manifest, force: bool) -> Path:
        tarball = self.base_dir / f"{manifest.suite}-{manifest.base_layer_key()[:16]}.tar"
        if tarball.exists() and not force:
            return tarball
        self.base_dir.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        command = [
            "mmdebstrap",
            "--mode=root",
            f"--variant={manifest.mmdebstrap_variant}",
            "--format=tar",
            *(f"--dpkgopt={rule}" for rule in DPKG_PATH_FILTERS),
        ]
        if manifest.packages:
            command.append("--include=" + ",".join(manifest.packages))
        command += [manifest.suite, str(partial), *manifest.mirrors]
        run(command)
        os.replace(partial, tarball)
        return tarball

    def _build_rootfs(self, manifest: Manifest, base_tar: Path, busybox: Path, work_dir: Path) -> None:
        tree = work_dir / "tree"
        tree.mkdir()
        run(["tar", "--numeric-owner", "-xpf", str(base_tar), "-C", str(tree)])
        install_guest(tree, busybox, self.init_dir, workdir=manifest.workdir)
        make_ext4(tree, work_dir / "rootfs.ext4", manifest.free_space_mb)
        shutil.rmtree(tree)


# ---------------------------------------------------------------- root trees
#
# Shared by the variants built here and by OCI images imported as snapshots
# (kiln.services.snapshots): whatever the tree, the guest gets the same agent,
# busybox and init. A tree may come from an untrusted image, so every path is
# resolved inside it (its symlinks never lead out) and replaced, not written through.


def install_guest(
    tree: Path, busybox: Path, init_dir: Path, *, workdir: str, python: str = GUEST_PYTHON_CANDIDATES[0]
) -> None:
    """Make a root tree bootable as a Kiln guest: the agent (precompiled),
    busybox, rc.sysinit and inittab under /opt/kiln and /etc, hostname and
    hosts, the working directory, and /bin/sh (busybox's) if the tree has none."""
    root = str(tree)
    remove_path(resolve_in_root(root, "opt/kiln", follow_last=False))
    kiln_dir = Path(ensure_directory(root, "opt/kiln"))
    ensure_directory(root, f"opt/kiln/{GUEST_PACKAGE}")
    for name in guest_files():
        shutil.copyfile(GUEST_DIR / name, kiln_dir / name)
        # Compiling the agent costs over half a second under TCG on every
        # boot; the host's CPython 3.11 writes bytecode the guest's can use.
        py_compile.compile(str(kiln_dir / name), doraise=True)
    shutil.copyfile(busybox, kiln_dir / "busybox")
    (kiln_dir / "busybox").chmod(0o755)
    shutil.copyfile(init_dir / "rc.sysinit", kiln_dir / "rc.sysinit")
    if any(char in workdir for char in "#\n\0") or not workdir.startswith("/"):
        raise UnsuitableRootfs(f"the working directory {workdir!r} is not an absolute path fit for the guest")
    agent_args = f"--workdir {shlex.quote(workdir)}"
    inittab = (init_dir / "inittab").read_text()
    _replace_file(root, "etc/inittab", inittab.replace("@PYTHON@", python).replace("@AGENT_ARGS@", agent_args))
    _replace_file(root, "etc/hostname", "kiln\n")
    _replace_file(root, "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 kiln\n::1 localhost\n")
    ensure_directory(root, workdir.lstrip("/"))
    if not os.path.lexists(resolve_in_root(root, "bin/sh")):
        # busybox init starts the agent through /bin/sh (its inittab line has an "=").
        os.symlink("/opt/kiln/busybox", os.path.join(ensure_directory(root, "bin"), "sh"))


def guest_files() -> list[str]:
    """The agent's source files, relative to kiln/guest/ (and to /opt/kiln/ in
    the guest): every module of the agent package, and protocol.py."""
    package = sorted(path.name for path in (GUEST_DIR / GUEST_PACKAGE).glob("*.py"))
    return [f"{GUEST_PACKAGE}/{name}" for name in package] + list(GUEST_MODULES)


def _replace_file(root: str, path: str, text: str) -> None:
    parent, _, name = path.rpartition("/")
    target = os.path.join(ensure_directory(root, parent), name)
    remove_path(target)
    Path(target).write_text(text)
    os.chmod(target, 0o644)


def make_ext4(tree: Path, image: Path, free_space_mb: int) -> None:
    """An ext4 image of the tree (ownership and modes as they are on disk), with
    ``free_space_mb`` to spare."""
    used = sum(entry.stat(follow_symlinks=False).st_size for entry in tree.rglob("*"))
    size_mb = int(used * 1.15) // (1024 * 1024) + free_space_mb + 64
    run([
        "mkfs.ext4", "-q", "-F", "-L", "kiln-root", "-m", "0",
        # Initialise everything now: a lazy init would write to every VM's overlay.
        "-E", "lazy_itable_init=0,lazy_journal_init=0",
        "-d", str(tree), str(image), f"{size_mb}M",
    ])


def find_guest_python(tree: Path) -> str:
    """The guest path of the tree's python3 for the agent; UnsuitableRootfs when
    there is none, it is older than MIN_GUEST_PYTHON, or its standard library
    lacks what the agent imports. Nothing in the tree is run: the version comes
    from the interpreter's file name or its ``lib/python3.N`` directory."""
    root = str(tree)
    wanted = ".".join(map(str, MIN_GUEST_PYTHON))
    for candidate in GUEST_PYTHON_CANDIDATES:
        real = resolve_in_root(root, candidate)
        if not os.path.isfile(real) or not os.access(real, os.X_OK):
            continue
        found = _python_stdlib(root, real)
        if found is None:
            raise UnsuitableRootfs(
                f"the image's {candidate} has no standard library (lib/python3.N) next to it"
            )
        version, stdlib = found
        shown = ".".join(map(str, version))
        if version < MIN_GUEST_PYTHON:
            raise UnsuitableRootfs(
                f"the image's python3 is {shown}; the guest agent needs python3 >= {wanted}"
            )
        missing = [
            module for module in GUEST_PYTHON_MODULES
            if not any((stdlib / module / init).is_file() for init in ("__init__.py", "__init__.pyc"))
        ]
        if missing:
            raise UnsuitableRootfs(
                f"the image's python3 ({shown}) lacks the standard library modules "
                f"{', '.join(missing)} (python3-minimal?); the guest agent needs them"
            )
        return candidate
    raise UnsuitableRootfs(
        f"the image has no python3: the guest agent needs python3 >= {wanted} at "
        f"{' or '.join(GUEST_PYTHON_CANDIDATES[:2])}"
    )


def _python_stdlib(root: str, interpreter: str) -> tuple[tuple[int, int], Path] | None:
    named = re.fullmatch(r"python(\d+)\.(\d+)", os.path.basename(interpreter))
    prefixes = [os.path.dirname(os.path.dirname(interpreter))]
    prefixes += [os.path.join(root, "usr"), os.path.join(root, "usr", "local")]
    found: list[tuple[tuple[int, int], Path]] = []
    for prefix in prefixes:
        for lib in Path(prefix).glob("lib/python3.*"):
            match = re.fullmatch(r"python(\d+)\.(\d+)", lib.name)
            if match and any((lib / name).is_file() for name in ("os.py", "os.pyc")):
                version = (int(match.group(1)), int(match.group(2)))
                if named is None or version == (int(named.group(1)), int(named.group(2))):
                    found.append((version, lib))
        if found:
            break
    return max(found) if found else None


def apt_show(package: str) -> dict[str, str]:
    """The candidate version's control fields, from the host's apt cache."""
    output = run(["apt-cache", "show", "--no-all-versions", package])
    fields: dict[str, str] = {}
    for line in output.splitlines():
        if line and not line[0].isspace() and ":" in line:
            name, _, value = line.partition(":")
            fields.setdefault(name, value.strip())
    if "Version" not in fields:
        raise ImageBuildError(f"apt knows no package {package} (is `apt-get update` done?)")
    return fields


def run(command: list[str], cwd: str | Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ImageBuildError(f"{command[0]} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


# ---------------------------------------------------------------- kernel modules


def module_dependencies(path: Path) -> list[str]:
    """The ``depends=`` list from a module's ELF ``.modinfo`` section.

    The kernel package ships no modules.dep (depmod runs at install time), and
    the host may have no kmod, so read the module's own metadata."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ImageBuildError(f"{path} is not a 64-bit ELF module (compressed modules are not supported)")
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, section_offset + i * entry_size) for i in range(count)]
    names_at = sections[names_index][4]
    for name_offset, _, _, _, offset, size in sections:
        name = data[names_at + name_offset : data.index(b"\0", names_at + name_offset)]
        if name == b".modinfo":
            for entry in data[offset : offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [dep for dep in entry[len(b"depends="):].decode().split(",") if dep]
            return []
    return []


def resolve_module_order(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Module paths (relative to ``modules_dir``, without ``.ko``), dependencies first.

    Built-in modules (listed in modules.builtin) are skipped."""
    by_name: dict[str, Path] = {}
    for path in (modules_dir / "kernel").rglob("*.ko"):
        by_name[path.stem.replace("-", "_")] = path
    builtin_file = modules_dir / "modules.builtin"
    builtin = {
        Path(line).name.removesuffix(".ko").replace("-", "_")
        for line in (builtin_file.read_text().split() if builtin_file.exists() else [])
    }
    ordered: list[Path] = []
    placed: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in builtin or name in placed:
            return
        if name not in by_name:
            raise ImageBuildError(f"kernel module {name} not found in {modules_dir}")
        if name in visiting:
            raise ImageBuildError(f"kernel module dependency cycle at {name}")
        visiting.add(name)
        for dependency in module_dependencies(by_name[name]):
            visit(dependency)
        visiting.discard(name)
        placed.add(name)
        ordered.append(by_name[name])

    for name in wanted:
        visit(name)
    return [str(path.relative_to(modules_dir).with_suffix("")) for path in ordered]


# ---------------------------------------------------------------- initramfs


class CpioWriter:
    """A ``newc`` cpio archive (the initramfs format), written without root:
    device nodes and ownership are declared, not taken from the disk."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.inode += 1
        self.buffer.write(b"070701" + b"".join(b"%08X" % value for value in fields) + encoded)
        self._pad()
        self.buffer.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buffer.write(b"\0" * (-self.buffer.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, permissions: int = 0o644) -> None:
        self._entry(name, 0o100000 | permissions, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buffer.getvalue()


def build_initramfs(busybox: Path, modules_dir: Path, modules: list[str], init_script: Path) -> bytes:
    archive = CpioWriter()
    for directory in ("bin", "dev", "etc", "lib", "lib/modules", "newroot", "proc", "sys"):
        archive.directory(directory)
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    archive.file("init", init_script.read_bytes(), 0o755)
    names = []
    for module in modules:
        name = Path(module).name
        archive.file(f"lib/modules/{name}.ko", (modules_dir / f"{module}.ko").read_bytes())
        names.append(name)
    archive.file("etc/kiln-modules", ("\n".join(names) + "\n").encode())
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.runtime.images")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a variant (or find it in the cache)")
    build.add_argument("variants", nargs="+")
    build.add_argument("--force", action="store_true", help="rebuild every layer")
    commands.add_parser("ls", help="list variants and their builds")
    options = parser.parse_args(argv)
    store = ImageStore(get_settings())
    if options.command == "ls":
        for row in store.describe():
            print(json.dumps(row))
        return 0
    for variant in options.variants:
        started = time.monotonic()

        def progress(step: str, done: int, total: int, variant: str = variant, started: float = started) -> None:
            elapsed = time.monotonic() - started
            print(f"[{variant}] {elapsed:6.1f}s  {done}/{total} {step}", file=sys.stderr, flush=True)

        image = store.build(variant, force=options.force, progress=progress)
        print(f"[{variant}] built in {time.monotonic() - started:.1f}s: {image.rootfs.parent}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
