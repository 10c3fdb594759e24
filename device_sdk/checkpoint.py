"""Atomic device checkpoints: adapters, optimizer states, schedule, sampler and round counter.

Layout of a checkpoint folder::

    LATEST                 name of the newest complete checkpoint (replaced atomically)
    ckpt-000003-00000040/  adapters/*.safetensors, optim.safetensors, state.json (round 3, step 40; saved again at
                           the same round and step: ckpt-000003-00000040-r2)

A new checkpoint is written into a fresh folder (never one that exists), fsynced, and only then named in
``LATEST``; older folders are removed afterwards. A crash at any moment leaves ``LATEST`` naming a complete
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .adapters import atomic_save_safetensors, load_adapters, save_adapters
from .errors import SDKError
from .fileio import fsync_dir
from .train import TrainState, expert_parameters, router_parameters

LATEST = "LATEST"
log = logging.getLogger(__name__)


class CheckpointError(SDKError):
    """A checkpoint folder is missing or does not fit the model."""


def _optimizer_tensors(model: nn.Module, state: TrainState) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {"generator": state.generator.get_state()}
    for prefix, opt in (("expert", state.expert_opt), ("router", state.router_opt)):
        if opt is None:
            continue
        for p, s in opt.state.items():
            for key, value in s.items():
                out[f"{prefix}/{names[id(p)]}/{key}"] = torch.as_tensor(value).detach().to("cpu").clone()
    return out


def save_checkpoint(folder: Path, model: nn.Module, state: TrainState, base_model: str, info: dict) -> Path:
    """Write a new checkpoint and make it the latest. ``info`` (JSON) must hold at least ``round``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = stem = f"ckpt-{int(info['round']):06d}-{state.step:08d}"
    revision = 1
    while (folder / name).exists():  # the same round and step saved again (a final sync, a restart): a new folder,
        revision += 1                # never the one LATEST names, which a crash mid-replace would leave half-deleted
        name = f"{stem}-r{revision}"
    target = folder / name
    tmp = folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adapters(model, tmp / "adapters", base_model)
    atomic_save_safetensors(_optimizer_tensors(model, state), tmp / "optim.safetensors", {"format": "optim/1"})
    meta = {**info, "step": state.step, "schedule_epoch": state.schedule.last_epoch,
            "lr_experts": state.expert_opt.param_groups[0]["lr"], "base_model": base_model}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    with open(tmp / "state.json", "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(tmp)
    os.replace(tmp, target)
    latest_tmp = folder / f".{LATEST}.tmp"
    latest_tmp.write_text(name)
    with open(latest_tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(latest_tmp, folder / LATEST)
    fsync_dir(folder)
    for old in folder.glob("ckpt-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _order(path: Path) -> tuple[int, int, int]:
    """``(round, step, revision)`` of a checkpoint folder's name (``ckpt-000003-00000040-r2``)."""
    parts = path.name.split("-")
    try:
        return int(parts[1]), int(parts[2]), int(parts[3][1:]) if len(parts) > 3 else 1
    except (IndexError, ValueError):
        return -1, -1, -1


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``LATEST`` names; if it is gone or incomplete (files lost outside the SDK's control), the
    newest complete one, with a warning; ``None`` if the folder holds no checkpoint at all.

    Raises:
        CheckpointError: ``LATEST`` names a checkpoint that is not there and no other complete one is.
    """
    folder = Path(folder)
    pointer = folder / LATEST
    if pointer.is_file():
        path = folder / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    complete = sorted((p for p in folder.glob("ckpt-*") if (p / "state.json").is_file()), key=_order)
    if complete:
        log.warning("%s names no complete checkpoint; resuming from the newest complete one, %s", pointer,
                    complete[-1].name)
        return complete[-1]
    if pointer.is_file():
        raise CheckpointError(f"{pointer} names {pointer.read_text().strip()!r}, which is gone or incomplete, and "
                              f"{folder} holds no other checkpoint; move {folder} away to start this device afresh "
                              "(its training so far is lost)")
    return None


def load_checkpoint(path: Path, model: nn.Module, state: TrainState, base_model: str) -> dict:
    """Restore adapters and training state from a checkpoint folder into ``model`` / ``state``; returns its info.

    Raises:
        CheckpointError: if the checkpoint does not fit the model.
    """
    path = Path(path)
    info = json.loads((path / "state.json").read_text())
    if info.get("base_model") != base_model:
        raise CheckpointError(f"checkpoint {path} was made for base model {info.get('base_model')!r}, "
                              f"not {base_model!r}")
    load_adapters(model, path / "adapters", base_model)
    tensors = load_file(str(path / "optim.safetensors"))
    state.generator.set_state(tensors.pop("generator"))
    names = dict(model.named_parameters())
    for prefix, opt, params in (("expert", state.expert_opt, expert_parameters(model)),
                                ("router", state.router_opt, router_parameters(model))):
        if opt is None:
            continue
        ids = {id(p) for p in params}
        for key, value in tensors.items():
            if not key.startswith(prefix + "/"):
                continue
            _, pname, field = key.split("/", 2)
            p = names.get(pname)
            if p is None or id(p) not in ids:
                raise CheckpointError(f"checkpoint {path} has optimizer state for unknown parameter {pname}")
            # moments follow their parameter's device (a GPU run); AdamW keeps its step counter on the CPU
            opt.state[p][field] = value if field == "step" else value.to(p.device)
    state.step = int(info["step"])
    state.schedule.last_epoch = int(info["schedule_epoch"])
    for group in state.expert_opt.param_groups:
        group["lr"] = float(info["lr_experts"])
    state.schedule._last_lr = [g["lr"] for g in state.expert_opt.param_groups]
    return info
