"""Device routes: enroll, follow rounds, download globals, upload shared tensors."""

from fastapi import APIRouter, BackgroundTasks, Response
from starlette.concurrency import run_in_threadpool

from ..deps import BodyDep, DeviceDep, FederationDep, GlobalVersion, RoundNumber
from ..errors import NotFound
from ..schemas import Enrolled, EnrollRequest, RoundState, UploadAccepted, error_responses
from . import SAFETENSORS_BODY

router = APIRouter(tags=["devices"])


@router.post("/enroll", response_model=Enrolled, status_code=201, responses=error_responses(401, 409, 422))
def enroll(body: EnrollRequest, federation: FederationDep) -> Enrolled:
    """Enroll a device with the admin's enrollment secret; the answer holds the device's bearer token (the one the
    device chose, if it sent one: then the same request again answers with the same device)."""
    device_id, token = federation.enroll(body.enroll_secret, body.name, body.capabilities, body.token)
    return Enrolled(device_id=device_id, token=token, config=federation.config())


@router.get("/rounds/current", response_model=RoundState, responses=error_responses(409))
def current_round(federation: FederationDep, device: DeviceDep) -> RoundState:
    r = federation.current()
    reports = federation.store.updates(r.round)
    return RoundState(round=r.round, status=r.status, base_version=r.base_version, deadline=r.deadline,
                      reported=federation.store.count_updates(r.round, active_only=True),
                      expected=federation.expected_devices(),
                      you_reported=any(u.device_id == device.id for u in reports), failure=r.failure)


@router.get("/globals/{version}", response_class=Response, responses={
    200: {"description": "the global version's tensors (safetensors); header X-Sha256: their digest",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(404)})
def get_global(version: GlobalVersion, federation: FederationDep, device: DeviceDep) -> Response:
    """The shared tensors of a global version (safetensors)."""
    blob = federation.store.global_blob(version)
    if blob is None:
        raise NotFound(f"global version {version} does not exist (latest: {federation.store.latest_global_version()})")
    path, digest = blob
    return Response(path.read_bytes(), media_type="application/octet-stream", headers={"X-Sha256": digest})


@router.post("/rounds/{number}/update", response_model=UploadAccepted, responses=error_responses(404, 409, 422),
             openapi_extra=SAFETENSORS_BODY)
async def upload(number: RoundNumber, federation: FederationDep, device: DeviceDep, body: BodyDep,
                 background: BackgroundTasks) -> UploadAccepted:
    """Upload this device's shared tensors for a round (safetensors body; metadata ``tokens`` and ``metrics``)."""
    duplicate, reported = await run_in_threadpool(federation.upload, device, number, body)
    background.add_task(run_in_threadpool, federation.maybe_close)
    return UploadAccepted(round=number, duplicate=duplicate, reported=reported,
                          expected=federation.expected_devices())
