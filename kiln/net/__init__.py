"""Guest networking: a namespace per VM, its links and TAP, Kiln's nftables
rules, address leases, and the guest DNS (served by the egress daemon)."""

from kiln.net.host import NetStatus
from kiln.net.participant import NetError, NetParticipant
from kiln.net.policy import CompiledPolicy, PolicyError

__all__ = ["CompiledPolicy", "NetError", "NetParticipant", "NetStatus", "PolicyError"]
