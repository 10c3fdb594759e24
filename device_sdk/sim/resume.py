"""Round-level resume of a simulated run: after every round, each user's adapters and training state (the device
checkpoint format) and the run's curves so far are saved, so a run killed mid-way continues from its last finished
round with the same numbers as an uninterrupted run.

Layout of one run's folder::

    user000/ ... userNNN/   device checkpoints (adapters, optimizer states, sampler state, step, schedule)
    progress.json           round, curves, router scores, train losses, strategy state, seconds so far

``progress.json`` is written last; a folder whose user checkpoints are ahead of it (a kill in between) or that does
not fit the run is ignored and the run starts over.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from torch import nn

from ..checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from ..errors import SDKError
from ..fileio import atomic_write_bytes
from ..train import TrainState

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


def save_progress(folder: Path, round_done: int, models: list[nn.Module], states: list[TrainState],
                  base_model: str, progress: dict) -> None:
    """Checkpoint every user after round ``round_done`` and then record ``progress`` (JSON-able)."""
    folder = Path(folder)
    for i, (model, state) in enumerate(zip(models, states)):
        save_checkpoint(folder / f"user{i:03d}", model, state, base_model, {"round": round_done})
    atomic_write_bytes(folder / PROGRESS, json.dumps({"round": round_done, **progress}).encode())


def load_progress(folder: Path, models: list[nn.Module], states: list[TrainState], base_model: str) -> dict | None:
    """Restore every user from ``folder`` into ``models`` / ``states``; returns the saved progress (with
    ``round``), or ``None`` (nothing is changed) when there is no usable saved round."""
    folder = Path(folder)
    try:
        progress = json.loads((folder / PROGRESS).read_text())
        round_done = int(progress["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        checkpoints = [latest_checkpoint(folder / f"user{i:03d}") for i in range(len(models))]
    except CheckpointError as err:
        log.warning("ignoring the partial run in %s: %s", folder, err)
        return None
    if any(c is None or not c.name.startswith(f"ckpt-{round_done:06d}-") for c in checkpoints):
        log.warning("ignoring the partial run in %s: its user checkpoints are not all at round %d", folder, round_done)
        return None
    try:
        for checkpoint, model, state in zip(checkpoints, models, states):
            load_checkpoint(checkpoint, model, state, base_model)
    except (SDKError, CheckpointError, OSError, ValueError) as err:
        raise SDKError(f"the partial run in {folder} does not fit this run ({err}); delete the folder to start "
                       "over") from err
    return progress


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
