"""HTTPS for custom domains: the certificate of each handshake picked by its SNI name.

The certificate files are the server's (``kiln.domains.certs``: key and full
chain in one file, replaced whole). Each handshake looks at the file of its
name (one ``stat``): a new or renewed certificate is served from the next
handshake on, without a restart; a removed one is no longer served. A name
with no certificate ends the handshake with ``unrecognized_name``.
"""

from __future__ import annotations

import logging
import os
import ssl

from kiln.domains.certs import CertificateFiles
from kiln.domains.names import BadDomain, normalize

log = logging.getLogger(__name__)

ALPN = ["http/1.1"]
FileKey = tuple[int, int, int]  # inode, size, mtime: a replaced file differs in one


class SniCertificates:
    def __init__(self, files: CertificateFiles) -> None:
        self._files = files
        self._contexts: dict[str, tuple[FileKey, ssl.SSLContext]] = {}

    def server_context(self) -> ssl.SSLContext:
        """The listening socket's context: it holds no certificate itself, every
        handshake is handed the context of its name."""
        context = _context()
        context.sni_callback = self._pick
        return context

    def context_for(self, server_name: str) -> ssl.SSLContext | None:
        try:
            domain = normalize(server_name)
        except BadDomain:
            return None
        path = self._files.path(domain)
        try:
            status = os.stat(path)
        except OSError:
            self._contexts.pop(domain, None)
            return None
        key = (status.st_ino, status.st_size, status.st_mtime_ns)
        cached = self._contexts.get(domain)
        if cached is not None and cached[0] == key:
            return cached[1]
        context = _context()
        try:
            context.load_cert_chain(path)
        except (OSError, ssl.SSLError, ValueError) as error:
            log.warning("the certificate of %s does not load: %s", domain, error)
            self._contexts.pop(domain, None)
            return None
        self._contexts[domain] = (key, context)
        return context

    def _pick(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> int | None:
        context = self.context_for(server_name) if server_name else None
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        connection.context = context
        return None


def _context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    return context
