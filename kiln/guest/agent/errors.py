"""How a failed request is reported: an error code the host can act on, and a message."""

from __future__ import annotations

import errno

# OSErrors of the file and exec ops, by errno; anything else is EINTERNAL.
ERRNO_CODES = {
    errno.ENOENT: "ENOENT",
    errno.EISDIR: "EISDIR",
    errno.ENOTDIR: "ENOTDIR",
    errno.EEXIST: "EEXIST",
    errno.EACCES: "EACCES",
    errno.EPERM: "EACCES",
    errno.EROFS: "EACCES",
    errno.EINVAL: "EINVAL",
    errno.ENAMETOOLONG: "EINVAL",
    errno.ENOSPC: "ENOSPC",
    errno.EDQUOT: "ENOSPC",
    errno.ENOTEMPTY: "ENOTEMPTY",
    errno.ELOOP: "ELOOP",
    errno.EXDEV: "EXDEV",
    errno.ECONNREFUSED: "ECONNREFUSED",
}


class AgentError(Exception):
    """A request failed in a way the host should see as ``{"kind": "error"}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConnectionLost(Exception):
    """The host went away while we were writing to it."""


def error_from_oserror(exc: OSError) -> AgentError:
    code = ERRNO_CODES.get(exc.errno or 0, "EINTERNAL")
    return AgentError(code, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
