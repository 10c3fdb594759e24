"""Admin routes: create the federation and upload its initial global tensors."""

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ..deps import AdminDep, BodyDep, FederationDep
from ..schemas import CreateFederation, FederationCreated

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/federation", response_model=FederationCreated, status_code=201)
def create_federation(body: CreateFederation, federation: FederationDep, _: AdminDep) -> FederationCreated:
    """Create the federation (once per data directory). Returns the enrollment secret for devices."""
    secret = federation.create(body.config, body.enroll_secret)
    return FederationCreated(config=body.config, enroll_secret=secret)


@router.put("/federation/initial", status_code=201)
async def set_initial(federation: FederationDep, _: AdminDep, body: BodyDep) -> dict:
    """Upload global version 0 (safetensors body): it fixes the shared tensors and opens round 1."""
    return await run_in_threadpool(federation.set_initial, body)
