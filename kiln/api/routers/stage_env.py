"""``POST /v1/vms/{vm_id}/stage-env``: values for the VM's next command, never stored
(``kiln.services.staged_env`` says who takes them and when)."""

from __future__ import annotations

from fastapi import APIRouter

from kiln.api.deps import Staged, VmGuest
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.schemas.staged_env import StageEnvRequest, StageEnvResponse
from kiln.services.staged_env import check_entries

router = APIRouter(tags=["vms"], responses={401: {"model": ErrorMessage}})


@router.post("/v1/vms/{vm_id}/stage-env", responses=error_responses(404, 409))
async def stage_env(body: StageEnvRequest, target: VmGuest, staged: Staged) -> StageEnvResponse:
    """The VM must be running (409 otherwise): a value staged for a VM that cannot
    run anything would wait in memory for nothing."""
    env = check_entries([(entry.env_name, entry.value) for entry in body.entries])
    return StageEnvResponse(staged=staged.stage(target.vm.id, env))
