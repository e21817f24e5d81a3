"""Egress routes (API.md, "Networking"): the policy of a VM, or of a session's VM.

``GET`` answers the policy in force (``status`` says whether the VM's network
enforces it now); ``POST`` replaces it: on a running VM atomically and at once
(422 for a policy the host cannot enforce, 409 if it could not apply it; the
old policy stays either way), on a suspended VM when it resumes. Another
user's VM or session is a 404.
"""

from __future__ import annotations

from fastapi import APIRouter

from kiln.api.deps import CurrentUser, Egress
from kiln.schemas.egress import EgressPolicyRequest, EgressPolicyResponse
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.services.egress import EgressState

router = APIRouter(prefix="/v1/egress", tags=["egress"], responses={401: {"model": ErrorMessage}})

READ_ERRORS = error_responses(404)
WRITE_ERRORS = error_responses(404, 409)


def answer(state: EgressState) -> EgressPolicyResponse:
    policy = state.policy
    return EgressPolicyResponse(
        vm_id=state.vm.id,
        session_id=state.vm.session_id,
        allow_package_managers=policy["allow_package_managers"],
        allow_public_repos=policy["allow_package_managers"],
        allow_http=policy["allow_http"],
        allow_https=policy["allow_https"],
        allowed_domains=policy["allowed_domains"],
        allowed_cidrs=policy["allowed_cidrs"],
        status=state.status,
        network_error=state.vm.network_error,
    )


@router.get("/vm/{vm_id}", responses=READ_ERRORS)
async def get_vm_egress(vm_id: str, user: CurrentUser, egress: Egress) -> EgressPolicyResponse:
    return answer(await egress.of_vm(user.id, vm_id))


@router.post("/vm/{vm_id}", responses=WRITE_ERRORS)
async def set_vm_egress(
    vm_id: str, body: EgressPolicyRequest, user: CurrentUser, egress: Egress
) -> EgressPolicyResponse:
    return answer(await egress.set_for_vm(user.id, vm_id, body.model_dump(exclude_none=True)))


@router.get("/session/{session_id}", responses=READ_ERRORS)
async def get_session_egress(session_id: str, user: CurrentUser, egress: Egress) -> EgressPolicyResponse:
    return answer(await egress.of_session(user.id, session_id))


@router.post("/session/{session_id}", responses=WRITE_ERRORS)
async def set_session_egress(
    session_id: str, body: EgressPolicyRequest, user: CurrentUser, egress: Egress
) -> EgressPolicyResponse:
    return answer(await egress.set_for_session(user.id, session_id, body.model_dump(exclude_none=True)))
