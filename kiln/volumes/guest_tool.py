"""Volume work inside a guest: find a disk by serial, mount, unmount, freeze,
grow, usage, and file operations that never follow a symlink.

This file runs in the guest, not on the host: the host loads its source once
per VM into a persistent interpreter of the agent (``python_exec``, a session
of its own) and then calls ``answer(<JSON request>)``, which prints one JSON
answer; run as a script it reads the request from stdin. So it imports the
standard library only (the guest has Python 3.9+ and nothing else of Kiln's),
lazily where a module is slow to import under TCG, and it calls the kernel
directly (``mount(2)``, ``ioctl``) because the default image has neither
util-linux's ``mount`` nor e2fsprogs.

Answers: ``{"ok": true, "value": ...}`` or ``{"ok": false, "error": CODE,
"message": ...}``. The host side is ``kiln.volumes.guest.ExecGuestVolumes``.
Until the agent's own ``mount``/``umount``/``fsfreeze``/``fsthaw``/``disk_usage``
ops replace the first ops here, this is the only code that touches a volume
inside a guest.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
import sys
import time

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
EXT4_IOC_RESIZE_FS = 0x40086610  # _IOW('f', 16, __u64)
SYS_BLOCK = "/sys/block"
POLL_SECONDS = 0.02
# Where a freeze leaves its token; a watchdog thaws a freeze nobody thawed.
FREEZE_DIR = "/run/kiln-volumes"
UPLOAD_PREFIX = ".kiln-upload-"


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refuse_oserror(error: OSError, what: str) -> Refused:
    code = errno.errorcode.get(error.errno or 0, "EIO")
    return Refused(code, f"{what}: {os.strerror(error.errno or errno.EIO)}")


# ---- disks


def disk_serial(name: str) -> str | None:
    """The SCSI unit serial number (VPD page 0x80) of /sys/block/<name>."""
    try:
        with open(f"{SYS_BLOCK}/{name}/device/vpd_pg80", "rb") as file:
            page = file.read()
    except OSError:
        return None
    if len(page) < 4:
        return None
    length = int.from_bytes(page[2:4], "big")
    return page[4 : 4 + length].decode("ascii", "replace").strip(" \0")


def find_disk(serial: str) -> str | None:
    try:
        names = sorted(os.listdir(SYS_BLOCK))
    except OSError:
        return None
    for name in names:
        if name.startswith("sd") and disk_serial(name) == serial:
            return name
    return None


def wait_for_disk(serial: str, wait: float) -> str:
    """The disk's name (``sdb``), waiting up to ``wait`` s for a hot-added one
    to be scanned, with its /dev node made if devtmpfs did not make it."""
    deadline = time.monotonic() + wait
    while True:
        name = find_disk(serial)
        if name is not None:
            ensure_device_node(name)
            return name
        if time.monotonic() >= deadline:
            raise Refused(
                "ENODEV", f"no disk with serial {serial} appeared within {wait:g}s"
            )
        time.sleep(POLL_SECONDS)


def ensure_device_node(name: str) -> None:
    path = f"/dev/{name}"
    if os.path.exists(path):
        return
    with open(f"{SYS_BLOCK}/{name}/dev") as file:
        major, minor = (int(part) for part in file.read().split(":"))
    os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(major, minor))


def device_number(name: str) -> str:
    with open(f"{SYS_BLOCK}/{name}/dev") as file:
        return file.read().strip()


# ---- mounts


def unescape_mount_field(field: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as \\ooo."""
    out = []
    index = 0
    while index < len(field):
        if (
            field[index] == "\\"
            and field[index + 1 : index + 4].isdigit()
            and index + 3 < len(field)
        ):
            out.append(chr(int(field[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def mount_table() -> list[dict]:
    """Each mount: mount point, device number (major:minor), options, fs type."""
    entries = []
    with open("/proc/self/mountinfo") as file:
        for line in file:
            left, _, right = line.partition(" - ")
            fields = left.split()
            tail = right.split()
            if len(fields) < 6 or not tail:
                continue
            entries.append(
                {
                    "mount_path": unescape_mount_field(fields[4]),
                    "dev": fields[2],
                    "read_only": "ro" in fields[5].split(","),
                    "fstype": tail[0],
                }
            )
    return entries


def mounted_at(path: str) -> dict | None:
    found = None
    for entry in mount_table():
        if entry["mount_path"] == path:
            found = entry  # the last one is the one on top
    return found


_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes  # slow to import under TCG: only the mount ops need it

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def last_errno() -> int:
    import ctypes

    return ctypes.get_errno()


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    result = libc().mount(
        source.encode(), target.encode(), fstype.encode(), flags, data.encode()
    )
    if result != 0:
        number = last_errno()
        raise refuse_oserror(
            OSError(number, os.strerror(number)), f"mount {source} on {target}"
        )


def sys_umount(target: str, flags: int) -> int:
    """0, or the errno of umount2(2)."""
    if libc().umount2(target.encode(), flags) != 0:
        return last_errno()
    return 0


def make_mount_point(path: str) -> None:
    """Create ``path`` and make sure no component of it is a symlink: a link
    could move the mount anywhere (over /opt/kiln, say)."""
    os.makedirs(path, exist_ok=True)
    if os.path.realpath(path) != path:
        raise Refused(
            "ELOOP", f"{path} leads through a symlink to {os.path.realpath(path)}"
        )
    if not os.path.isdir(path):
        raise Refused("ENOTDIR", f"{path} is not a directory")


def op_mount(args: dict) -> dict:
    serial = args["serial"]
    path = args["mount_path"]
    read_only = bool(args.get("read_only", False))
    wait = float(args.get("wait", 10))
    deadline = time.monotonic() + wait
    name = wait_for_disk(serial, wait)
    dev = device_number(name)
    current = mounted_at(path)
    if current is not None:
        if current["dev"] == dev:
            return {"device": f"/dev/{name}", "mount_path": path, "already": True}
        raise Refused("EBUSY", f"something else is mounted at {path}")
    make_mount_point(path)
    flags = MS_NODEV | MS_NOSUID | (MS_RDONLY if read_only else 0)
    while True:
        try:
            # noload: a read-only mount must not replay a journal (it could not write it back).
            sys_mount(f"/dev/{name}", path, "ext4", flags, "noload" if read_only else "")
            break
        except Refused as refusal:
            # A disk just hot-added is listed (serial read) a moment before it
            # can be opened (seen under load: ENXIO), and one with the same
            # serial just deleted may still be listed: look for it again.
            if refusal.code not in ("ENXIO", "ENODEV") or time.monotonic() >= deadline:
                raise
            time.sleep(POLL_SECONDS)
            name = wait_for_disk(serial, max(deadline - time.monotonic(), 0))
    return {"device": f"/dev/{name}", "mount_path": path, "already": False}


def op_umount(args: dict) -> dict:
    path = args["mount_path"]
    serial = args.get("serial")
    force = bool(args.get("force", False))
    name = find_disk(serial) if serial else None
    os.sync()
    current = mounted_at(path)
    if current is not None and (name is None or current["dev"] == device_number(name)):
        failure = sys_umount(path, 0)
        if failure == errno.EBUSY and force:
            # Open files keep a lazily detached fs alive until they close; what
            # was written is synced above, and the device goes away below.
            failure = sys_umount(path, MNT_DETACH)
        if failure not in (0, errno.EINVAL, errno.ENOENT):
            raise refuse_oserror(
                OSError(failure, os.strerror(failure)), f"umount {path}"
            )
    if name is not None:
        if not force and any(
            entry["dev"] == device_number(name) for entry in mount_table()
        ):
            raise Refused("EBUSY", f"/dev/{name} is still mounted elsewhere")
        delete_disk(name, float(args.get("wait", 10)))
    return {}


def delete_disk(name: str, wait: float) -> None:
    """Tell the guest's SCSI layer the disk is gone (flushing its cache), so the
    host can unplug it without the guest ever seeing I/O errors."""
    with open(f"{SYS_BLOCK}/{name}/device/delete", "w") as file:
        file.write("1")
    deadline = time.monotonic() + wait
    while os.path.exists(f"{SYS_BLOCK}/{name}"):
        if time.monotonic() >= deadline:
            raise Refused("EBUSY", f"/dev/{name} did not go away within {wait:g}s")
        time.sleep(POLL_SECONDS)


def op_mounts(args: dict) -> dict:
    """The SCSI disks with a serial, and where each is mounted."""
    by_dev: dict[str, list[dict]] = {}
    for entry in mount_table():
        by_dev.setdefault(entry["dev"], []).append(entry)
    disks = []
    for name in sorted(os.listdir(SYS_BLOCK)):
        if not name.startswith("sd"):
            continue
        serial = disk_serial(name)
        mounts = by_dev.get(device_number(name), [])
        disks.append(
            {
                "device": f"/dev/{name}",
                "serial": serial,
                "mounts": [
                    {"mount_path": m["mount_path"], "read_only": m["read_only"]}
                    for m in mounts
                ],
            }
        )
    return {"disks": disks}


# ---- freeze


def freeze_token_path(path: str) -> str:
    return os.path.join(FREEZE_DIR, path.strip("/").replace("/", "%") or "%")


def op_freeze(args: dict) -> dict:
    """Freeze the filesystem at ``mount_path``. A watchdog thaws it after
    ``max_seconds`` unless a thaw came first: a host that dies mid-checkpoint
    must not leave the guest's writers blocked forever."""
    path = args["mount_path"]
    max_seconds = float(args.get("max_seconds", 60))
    os.makedirs(FREEZE_DIR, exist_ok=True)
    token = os.urandom(8).hex()
    with open(freeze_token_path(path), "w") as file:
        file.write(token)
    fs_ioctl(path, FIFREEZE, errno.EBUSY, "freeze")  # EBUSY: frozen already
    start_watchdog(path, token, max_seconds)
    return {}


def start_watchdog(path: str, token: str, max_seconds: float) -> None:
    child = os.fork()
    if child != 0:
        os.waitpid(child, 0)  # the first child exits at once; its child lives on
        return
    # The child: detach, wait, thaw if this freeze is still the current one.
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        # Hold none of the parent's files: its output and control pipes must
        # close when it ends, not when this watchdog does.
        os.closerange(0, 65536)
        time.sleep(max_seconds)
        try:
            with open(freeze_token_path(path)) as file:
                current = file.read()
        except OSError:
            current = None
        if current == token:
            thaw(path)
            os.unlink(freeze_token_path(path))
    finally:
        os._exit(0)


def thaw(path: str) -> None:
    fs_ioctl(path, FITHAW, errno.EINVAL, "thaw")  # EINVAL: not frozen


def fs_ioctl(path: str, request: int, harmless: int, doing: str) -> None:
    """``request`` on the filesystem mounted at ``path``; the errno ``harmless``
    means it is in that state already."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as error:
        if error.errno != harmless:
            raise refuse_oserror(error, f"{doing} {path}") from None
    finally:
        os.close(fd)


def op_thaw(args: dict) -> dict:
    path = args["mount_path"]
    try:
        os.unlink(freeze_token_path(path))
    except OSError:
        pass
    thaw(path)
    return {}


# ---- usage and growth


def usage(path: str) -> dict:
    info = os.statvfs(path)
    return {
        "used_bytes": (info.f_blocks - info.f_bfree) * info.f_frsize,
        "total_bytes": info.f_blocks * info.f_frsize,
        "free_bytes": info.f_bavail * info.f_frsize,
    }


def op_usage(args: dict) -> dict:
    return usage(args["path"])


def op_grow(args: dict) -> dict:
    """The host made the disk ``size_bytes`` long: let the guest see the new
    size (a SCSI rescan) and grow the mounted ext4 over it online."""
    serial = args["serial"]
    path = args["mount_path"]
    size = int(args["size_bytes"])
    name = wait_for_disk(serial, 0)
    with open(f"{SYS_BLOCK}/{name}/device/rescan", "w") as file:
        file.write("1")
    deadline = time.monotonic() + float(args.get("wait", 10))
    while disk_bytes(name) < size:
        if time.monotonic() >= deadline:
            raise Refused(
                "EIO", f"/dev/{name} still shows {disk_bytes(name)} bytes, not {size}"
            )
        time.sleep(POLL_SECONDS)
    block_size = os.statvfs(path).f_bsize
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("Q", size // block_size))
    except OSError as error:
        raise refuse_oserror(error, f"grow the filesystem at {path}") from None
    finally:
        os.close(fd)
    return usage(path)


def disk_bytes(name: str) -> int:
    with open(f"{SYS_BLOCK}/{name}/size") as file:
        return int(file.read()) * 512


# ---- files, relative to a volume's root, never through a symlink


def components(path: str) -> list[str]:
    """A path inside the volume as its components; '' and '/' are the root.
    Refuses '..', NUL and anything that is not a plain name."""
    if "\0" in path:
        raise Refused("EINVAL", "a path may not contain NUL")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    for part in parts:
        if part == "..":
            raise Refused("EINVAL", f"'..' is not allowed in a volume path: {path}")
    return parts


def open_dir(parent_fd: int, name: str) -> int:
    try:
        return os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd
        )
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and is_symlink(parent_fd, name):
            raise Refused(
                "ELOOP", f"{name} is a symlink; volume paths never follow links"
            ) from None
        raise


def is_symlink(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(
            os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode
        )
    except OSError:
        return False


def walk_to_parent(root: str, parts: list[str], create: bool) -> int:
    """An fd of the directory that holds the last component, reached one
    component at a time with O_NOFOLLOW (so a symlink anywhere is refused,
    even one swapped in while we walk)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in parts[:-1]:
            try:
                child = open_dir(fd, name)
            except FileNotFoundError:
                if not create:
                    raise Refused("ENOENT", f"no such directory: {name}") from None
                os.mkdir(name, 0o755, dir_fd=fd)
                child = open_dir(fd, name)
            except NotADirectoryError:
                raise Refused("ENOTDIR", f"{name} is not a directory") from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def entry_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def describe(relative: str, info: os.stat_result) -> dict:
    kind = entry_kind(info.st_mode)
    return {
        "path": relative,
        "size": info.st_size if kind == "file" else 0,
        "is_dir": kind == "dir",
        "kind": kind,
        "modified_at": info.st_mtime,
    }


def op_file_stat(args: dict) -> dict:
    """{"root", "path"} -> the entry (a symlink is described, never followed), or ENOENT."""
    parts = components(args["path"])
    if not parts:
        return describe("", os.stat(args["root"]))
    fd = walk_to_parent(args["root"], parts, create=False)
    try:
        info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        raise Refused("ENOENT", f"no such file: {'/'.join(parts)}") from None
    finally:
        os.close(fd)
    return describe("/".join(parts), info)


def op_file_open_read(args: dict) -> dict:
    """{"root", "path"} -> {"guest_path", "size"} of a regular file: the host
    then reads it with the agent's read_file. Refused for a symlink, a
    directory or a device."""
    parts = components(args["path"])
    if not parts:
        raise Refused("EISDIR", "the volume's root is a directory")
    fd = walk_to_parent(args["root"], parts, create=False)
    try:
        info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        raise Refused("ENOENT", f"no such file: {'/'.join(parts)}") from None
    finally:
        os.close(fd)
    kind = entry_kind(info.st_mode)
    if kind == "symlink":
        raise Refused(
            "ELOOP", f"{'/'.join(parts)} is a symlink; volume paths never follow links"
        )
    if kind != "file":
        raise Refused(
            "EISDIR" if kind == "dir" else "EINVAL",
            f"{'/'.join(parts)} is not a regular file",
        )
    return {"guest_path": os.path.join(args["root"], *parts), "size": info.st_size}


def op_file_begin_write(args: dict) -> dict:
    """{"root", "path", "overwrite"} -> {"guest_path": a new temporary file next
    to the target}, after making the missing parent directories. The host
    writes the data there with write_file and then commits it."""
    parts = components(args["path"])
    if not parts:
        raise Refused("EISDIR", "the volume's root is a directory")
    fd = walk_to_parent(args["root"], parts, create=True)
    try:
        check_replaceable(fd, parts, bool(args.get("overwrite", False)))
        temporary = f"{UPLOAD_PREFIX}{os.urandom(8).hex()}"
        os.close(
            os.open(
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                0o644,
                dir_fd=fd,
            )
        )
    finally:
        os.close(fd)
    return {
        "guest_path": os.path.join(args["root"], *parts[:-1], temporary),
        "temporary": temporary,
    }


def check_replaceable(parent_fd: int, parts: list[str], overwrite: bool) -> None:
    try:
        info = os.stat(parts[-1], dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    kind = entry_kind(info.st_mode)
    if kind == "dir":
        raise Refused("EISDIR", f"{'/'.join(parts)} is a directory")
    if kind == "symlink":
        raise Refused(
            "ELOOP", f"{'/'.join(parts)} is a symlink; volume paths never follow links"
        )
    if not overwrite:
        raise Refused(
            "EEXIST", f"{'/'.join(parts)} exists (pass overwrite to replace it)"
        )


def op_file_commit_write(args: dict) -> dict:
    """{"root", "path", "temporary", "overwrite"} -> the entry: renames the
    written temporary file over the target (so a reader sees the old file or
    the whole new one), and syncs it."""
    parts = components(args["path"])
    temporary = args["temporary"]
    if not temporary.startswith(UPLOAD_PREFIX) or "/" in temporary:
        raise Refused("EINVAL", "not an upload's temporary file")
    fd = walk_to_parent(args["root"], parts, create=False)
    try:
        check_replaceable(fd, parts, bool(args.get("overwrite", False)))
        file_fd = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            os.fsync(file_fd)
        finally:
            os.close(file_fd)
        os.rename(temporary, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
        os.fsync(fd)
        info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)
    return describe("/".join(parts), info)


def op_file_abort_write(args: dict) -> dict:
    parts = components(args["path"])
    temporary = args["temporary"]
    if not temporary.startswith(UPLOAD_PREFIX) or "/" in temporary:
        raise Refused("EINVAL", "not an upload's temporary file")
    fd = walk_to_parent(args["root"], parts, create=False)
    try:
        os.unlink(temporary, dir_fd=fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
    return {}


def op_file_delete(args: dict) -> dict:
    """{"root", "path", "recursive"} -> {}: removes a file or a symlink (the
    link itself), or a directory (with everything in it when ``recursive``)."""
    parts = components(args["path"])
    if not parts:
        raise Refused("EINVAL", "the volume's root cannot be deleted")
    fd = walk_to_parent(args["root"], parts, create=False)
    try:
        try:
            info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise Refused("ENOENT", f"no such file: {'/'.join(parts)}") from None
        if stat.S_ISDIR(info.st_mode):
            if args.get("recursive"):
                import shutil

                # rmtree with dir_fd walks by file descriptors and never follows links.
                shutil.rmtree(parts[-1], dir_fd=fd)
            else:
                try:
                    os.rmdir(parts[-1], dir_fd=fd)
                except OSError as error:
                    if error.errno == errno.ENOTEMPTY:
                        raise Refused(
                            "ENOTEMPTY", f"{'/'.join(parts)} is not empty"
                        ) from None
                    raise
        else:
            os.unlink(parts[-1], dir_fd=fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {}


def op_file_list(args: dict) -> dict:
    """{"root", "prefix", "recursive", "limit"} -> {"entries", "truncated"}.

    Entries whose path (relative to the root) starts with ``prefix``: the
    listing starts in the deepest directory the prefix names entirely
    (``logs/2024-`` lists ``logs`` and keeps the names starting ``2024-``), and
    with ``recursive`` goes on into matching directories, breadth-first, never
    into a symlink. Sorted by path; at most ``limit``."""
    prefix = args.get("prefix") or ""
    recursive = bool(args.get("recursive", False))
    limit = int(args.get("limit", 1000))
    if "\0" in prefix:
        raise Refused("EINVAL", "a prefix may not contain NUL")
    directory_parts = components(
        prefix if prefix.endswith("/") else prefix.rpartition("/")[0]
    )
    name_prefix = "" if prefix.endswith("/") else prefix.rpartition("/")[2]
    wanted_prefix = (
        "/".join([*directory_parts, name_prefix]) if directory_parts else name_prefix
    )
    try:
        start = walk_to_parent(args["root"], [*directory_parts, ""], create=False)
    except Refused as refusal:
        if refusal.code == "ENOENT":
            return {"entries": [], "truncated": False}
        raise
    entries: list[dict] = []
    pending: list[tuple[int, list[str]]] = [(start, directory_parts)]
    truncated = False
    try:
        while pending:
            fd, parts = pending.pop(0)
            try:
                names = sorted(os.listdir(fd))
                for name in names:
                    relative = "/".join([*parts, name])
                    if not relative.startswith(wanted_prefix):
                        continue
                    if name.startswith(UPLOAD_PREFIX):
                        continue  # an upload in progress
                    try:
                        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue
                    if len(entries) >= limit:
                        truncated = True
                        break
                    entries.append(describe(relative, info))
                    if recursive and stat.S_ISDIR(info.st_mode):
                        try:
                            pending.append((open_dir(fd, name), [*parts, name]))
                        except (OSError, Refused):
                            pass
            finally:
                os.close(fd)
            if truncated:
                break
    finally:
        for fd, _ in pending:
            os.close(fd)
    entries.sort(key=lambda entry: entry["path"])
    return {"entries": entries, "truncated": truncated}


OPS = {
    "mount": op_mount,
    "umount": op_umount,
    "mounts": op_mounts,
    "freeze": op_freeze,
    "thaw": op_thaw,
    "usage": op_usage,
    "grow": op_grow,
    "file_stat": op_file_stat,
    "file_open_read": op_file_open_read,
    "file_begin_write": op_file_begin_write,
    "file_commit_write": op_file_commit_write,
    "file_abort_write": op_file_abort_write,
    "file_delete": op_file_delete,
    "file_list": op_file_list,
}


def answer(text: str) -> None:
    """Run one JSON request; print the JSON answer as one line."""
    try:
        request = json.loads(text or "{}")
        handler = OPS.get(request.get("op"))
        if handler is None:
            raise Refused("EINVAL", f"unknown op {request.get('op')!r}")
        result = {"ok": True, "value": handler(request.get("args") or {})}
    except Refused as refusal:
        result = {"ok": False, "error": refusal.code, "message": refusal.message}
    except OSError as error:
        failure = refuse_oserror(error, str(error.filename or "volume operation"))
        result = {"ok": False, "error": failure.code, "message": failure.message}
    except (KeyError, ValueError, TypeError) as error:
        result = {"ok": False, "error": "EINVAL", "message": f"bad request: {error!r}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    answer(sys.stdin.read())
