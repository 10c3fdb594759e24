"""Admin routes: create the federation, upload its initial global tensors, retry or close a failed round, retire a
device."""

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ..deps import AdminDep, BodyDep, DeviceId, FederationDep, RoundNumber
from ..schemas import CreateFederation, DeviceRetired, FederationCreated, RoundState, error_responses
from ..service import Federation
from ..store import Round
from . import SAFETENSORS_BODY

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/federation", response_model=FederationCreated, status_code=201, responses=error_responses(409))
def create_federation(body: CreateFederation, federation: FederationDep, _: AdminDep) -> FederationCreated:
    """Create the federation (once per data directory). Returns the enrollment secret for devices. The same request
    again (same configuration, same enrollment secret) answers the same: a client may retry it."""
    secret = federation.create(body.config, body.enroll_secret)
    return FederationCreated(config=body.config, enroll_secret=secret)


@router.put("/federation/initial", status_code=201, responses=error_responses(409, 422),
            openapi_extra=SAFETENSORS_BODY)
async def set_initial(federation: FederationDep, _: AdminDep, body: BodyDep) -> dict:
    """Upload global version 0 (safetensors body): it fixes the shared tensors and opens round 1. The same tensors
    again answer the same (a client may retry); other tensors get 409."""
    return await run_in_threadpool(federation.set_initial, body)


def _state(federation: Federation, r: Round) -> RoundState:
    return RoundState(round=r.round, status=r.status, base_version=r.base_version, deadline=r.deadline,
                      reported=federation.store.count_updates(r.round, active_only=True),
                      expected=federation.expected_devices(), failure=r.failure)


@router.post("/rounds/{number}/retry", response_model=RoundState, responses=error_responses(404, 409))
async def retry_round(number: RoundNumber, federation: FederationDep, _: AdminDep) -> RoundState:
    """Aggregate a failed round again from its stored uploads, after fixing what made it fail (e.g. a full disk).

    The round ends `closed` with a new global version, or `failed` again with the new reason (a deterministic
    failure such as a NaN global fails again: close the round instead). Answers the current round afterwards.
    404: no such round; 409: the round is not a failed round awaiting the admin.
    """
    return _state(federation, await run_in_threadpool(federation.retry, number))


@router.post("/rounds/{number}/close", response_model=RoundState, responses=error_responses(404, 409))
async def close_failed_round(number: RoundNumber, federation: FederationDep, _: AdminDep) -> RoundState:
    """Close a failed round without a new global version and open the next round.

    The failed round's uploads are kept (listed in `/status`) but not used; the next round opens on the global
    version the failed round started from (its `base_version` unchanged), so devices train from the last published
    global again. Answers the new current round. 404: no such round; 409: the round is not the current failed round.
    """
    return _state(federation, await run_in_threadpool(federation.close_failed, number))


@router.delete("/devices/{device_id}", response_model=DeviceRetired, responses=error_responses(404))
async def retire_device(device_id: DeviceId, federation: FederationDep, _: AdminDep) -> DeviceRetired:
    """Retire a device: its token stops working (401) and rounds stop waiting for it. For a device that lost its
    state and enrolled again, or one that left for good. Its uploads stay part of their rounds; retiring it again
    answers the same. 404: no such device.
    """
    device = await run_in_threadpool(federation.retire, device_id)
    return DeviceRetired(device_id=device.id, name=device.name, retired_at=device.retired_at)
