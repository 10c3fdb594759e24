"""Health and status."""

from fastapi import APIRouter

from ..deps import FederationDep
from ..schemas import RoundState, RoundSummary, Status

router = APIRouter(tags=["status"])


@router.get("/health")
def health() -> dict:
    return {"status": "ok"}


@router.get("/status", response_model=Status)
def status(federation: FederationDep) -> Status:
    """Current round, devices, and the history of rounds with participation and mean reported metrics."""
    store = federation.store
    config = federation.config()
    ready = store.latest_global_version() is not None
    current = store.current_round() if ready else None
    history = []
    participation = store.participation()  # one query, not one per round: anyone may poll this page
    for r in store.rounds():
        participants, tokens = participation.get(r.round, ([], 0))
        summary = r.summary or {}
        metrics = summary.get("mean_metrics") or {}
        history.append(RoundSummary(round=r.round, status=r.status, base_version=r.base_version,
                                    participants=participants, tokens=tokens, mean_metrics=metrics,
                                    opened_at=r.opened_at, closed_at=r.closed_at,
                                    rule=(r.summary or {}).get("rule"), failure=r.failure))
    state = None
    if current is not None:
        state = RoundState(round=current.round, status=current.status, base_version=current.base_version,
                           deadline=current.deadline, reported=store.count_updates(current.round, active_only=True),
                           expected=federation.expected_devices(), failure=current.failure)
    return Status(ready=ready, config=config, devices=store.count_devices(), current_round=state, history=history)
