"""Intercepting a VM's connection to a vault service host.

The transparent proxy hands over a connection once it knows the VM, the name
(SNI or Host) and that the guest DNS gave this VM this address for it, and the
VM's vaults cover the name. For HTTPS the interceptor terminates TLS with a
leaf certificate for the name signed by the egress CA (``kiln.vault.ca``);
then ``kiln.proxy.relay`` carries the requests, each with the credential of
the VM's service for that name at that moment, opened from its sealed form
(``kiln.crypto.sealing``, the master key's vault purpose key) only for that request. The service is reached at the
address the guest DNS gave, over TLS verified against the host's trust store
or ``KILN_EGRESS_CA_BUNDLE`` for HTTPS. Each call is logged (never a value)
and appended to the call journal for ``request-logs``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from kiln.crypto.sealing import SealError, unseal
from kiln.net.registry import KnownVm, VmRegistry
from kiln.proxy.relay import Credential, Relay
from kiln.proxy.streams import ByteStream, PlainStream, TlsServerStream, reset
from kiln.proxy.upstream import connect_service
from kiln.vault.binding import Injection, credential_context
from kiln.vault.ca import EgressCa
from kiln.vault.journal import Call, CallJournal, request_path

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0


class Interceptor:
    def __init__(
        self,
        registry: VmRegistry,
        ca: EgressCa,
        key: bytes,
        journal: CallJournal,
        *,
        upstream_tls: ssl.SSLContext,
        mark: int,
    ) -> None:
        self.registry = registry
        self.ca = ca
        self._key = key  # the master key's VAULT_PURPOSE key
        self.journal = journal
        self.upstream_tls = upstream_tls
        self.mark = mark

    async def serve(
        self,
        vm: KnownVm,
        name: str,
        scheme: str,
        destination: tuple[str, int],
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Relay the connection's requests, each with its credential, until it ends."""
        address, port = destination
        client: ByteStream
        if scheme == "https":
            tls = TlsServerStream(reader, writer, self.ca.server_context(name), head)
            try:
                await asyncio.wait_for(tls.handshake(), HANDSHAKE_SECONDS)
            except (ssl.SSLError, OSError, TimeoutError) as error:
                # Typically a client that does not trust the egress CA.
                log.info("VM %s -> %s: TLS with the guest failed: %s", vm.vm_id, name, error)
                reset(writer)
                return
            client, already_read = tls, b""
        else:
            client, already_read = PlainStream(reader, writer), head
        upstream_tls = self.upstream_tls if scheme == "https" else None

        async def connect() -> ByteStream:
            return await connect_service(address, port, self.mark, name=name, tls=upstream_tls)

        def record(injection: Injection, method: str, target: str, status: int | None, error: str | None) -> None:
            self._record(vm.vm_id, name, injection, method, target, status, error)

        relay = Relay(client, name, connect=connect, current=lambda: self.current(vm.vm_id, name), record=record)
        await relay.run(already_read)

    def current(self, vm_id: str, name: str) -> Credential | None:
        """The credential the VM's vaults inject into a request to ``name`` now, opened."""
        vm = self.registry.by_id(vm_id)
        injection = vm.injection_for(name) if vm is not None else None
        if injection is None:
            return None
        try:
            value = unseal(self._key, injection.sealed_value, credential_context(injection.credential_id))
        except SealError as error:
            log.error("VM %s: credential %s of vault %s cannot be opened: %s",
                      vm_id, injection.credential_name, injection.vault_id, error)  # fmt: skip
            return None
        return Credential(injection, value)

    def _record(
        self,
        vm_id: str,
        name: str,
        injection: Injection,
        method: str,
        target: str,
        status: int | None,
        error: str | None,
    ) -> None:
        path = request_path(target)
        log.info(
            "VM %s: %s %s%s -> %s (credential %s of vault %s)",
            vm_id, method, name, path, status if status is not None else error, injection.credential_name,
            injection.vault_id,
        )  # fmt: skip
        call = Call.new(
            vm_id=vm_id, vault_id=injection.vault_id, service_id=injection.service_id,
            credential_id=injection.credential_id, credential_name=injection.credential_name,
            host=name, method=method, path=path, status=status, error=error,
        )  # fmt: skip
        try:
            self.journal.append(call)
        except OSError as failure:
            log.error("cannot record a vault call: %s", failure)
