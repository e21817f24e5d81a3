"""Secrets at rest and signed values: the master key, AES-GCM sealing, share links,
and the checks of Kiln's own credentials that processes other than the API need."""
