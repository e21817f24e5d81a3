"""Vaults' mechanisms: the master key and sealed values, service hosts, auth
shapes, the injections a VM's feed carries, the egress CA, the catalog, and
the journal of injected calls. Rules of who owns what are in kiln.services."""
