"""Wire models of the egress routes (``/v1/egress/vm/{vm_id}``, ``/v1/egress/session/{sid}``).

The body is the whole new policy, with the keys InstaVM's SDK sends; keys left
out are false or empty (the policy replaces the old one, it does not patch it).
``allow_public_repos`` is the SDK's name of ``allow_package_managers``. An
unknown key is a 422 naming it: a client must never believe a rule is in place
that Kiln does not know.
"""

from __future__ import annotations

from pydantic import BaseModel, StrictBool

from kiln.schemas.bodies import RequestBody


class EgressPolicyRequest(RequestBody):
    allow_package_managers: StrictBool | None = None
    allow_public_repos: StrictBool | None = None
    allow_http: StrictBool = False
    allow_https: StrictBool = False
    allowed_domains: list[str] = []
    allowed_cidrs: list[str] = []


class EgressPolicyResponse(BaseModel):
    """The policy in force (or to be, once the VM runs) and what state it is in."""

    vm_id: str
    session_id: str
    allow_package_managers: bool
    # The same flag under the name InstaVM's SDK sends.
    allow_public_repos: bool
    allow_http: bool
    allow_https: bool
    allowed_domains: list[str]
    allowed_cidrs: list[str]
    # applied: the running VM's network enforces it; pending: stored, in force
    # once the VM runs (suspended, being created or resumed); no_network: the VM
    # runs without a network (it reaches nothing); ended: the VM is gone.
    status: str
    # Set when the policy allows something but the host gives the VM no network.
    network_error: str | None = None
