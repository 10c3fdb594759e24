"""Adapter files: one safetensors file per role, with metadata saying what model and shape they belong to.

Layout of a saved adapter folder::

    attention.safetensors   generalist.safetensors   specialist.safetensors   router.safetensors

Keys are the parameters' qualified names in the adapted model. Metadata (all strings): ``format``, ``role``,
``base_model``, ``rank``, ``attention_rank`` (files without it: ``rank``, the only attention rank before it
existed), ``alpha``, ``n_generalists``, ``n_specialists``, ``top_k``, ``mixing`` (files without it were written by the
projection form, the only one before it existed). Roles without tensors (e.g. specialists of a 1-expert device) are
not written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import nn

from .errors import AdapterFileError
from .federated.errors import InvalidUpload
from .federated.tensors import spec_of, validate
from .fileio import atomic_write_bytes
from .inject import adapter_config
from .parts import Role, role_parameters, role_state_dict

FORMAT = "device_sdk.adapters/1"


def adapter_metadata(model: nn.Module, base_model: str, role: Role) -> dict[str, str]:
    """The metadata written with a role's tensors."""
    cfg = adapter_config(model)
    return {
        "format": FORMAT, "role": role.value, "base_model": base_model, "rank": str(cfg.rank),
        "attention_rank": str(cfg.attention_lora_rank), "alpha": str(cfg.alpha),
        "n_generalists": str(cfg.n_generalists), "n_specialists": str(cfg.n_specialists), "top_k": str(cfg.top_k),
        "mixing": cfg.mixing,
    }


def file_attention_rank(metadata: dict[str, str]) -> int:
    """The attention LoRA rank an adapter file was written with (files from before the setting: its ``rank``).

    Raises:
        KeyError, ValueError: for metadata without a readable rank.
    """
    return int(metadata.get("attention_rank", metadata["rank"]))


def file_mixing(metadata: dict[str, str]) -> str:
    """The mixing form an adapter file was trained with (files from before the setting hold ``projection``)."""
    return metadata.get("mixing", "projection")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that readers see either the old or the new file, never a partial one."""
    atomic_write_bytes(Path(path), save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def save_adapters(model: nn.Module, folder: Path, base_model: str,
                  roles: set[Role] | frozenset[Role] = frozenset(Role)) -> list[Path]:
    """Save the model's adapter tensors, one file per role. Returns the written paths."""
    written = []
    for role in Role:
        if role not in roles:
            continue
        tensors = role_state_dict(model, role)
        if tensors:
            path = Path(folder) / f"{role.value}.safetensors"
            atomic_save_safetensors(tensors, path, adapter_metadata(model, base_model, role))
            written.append(path)
    return written


def read_adapter_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one adapter file.

    Raises:
        AdapterFileError: if the file is missing, not safetensors, or not an adapter file.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not a device_sdk adapter file (format {metadata.get('format')!r}, "
                               f"expected {FORMAT!r})")
    return tensors, metadata


def load_adapters(model: nn.Module, folder: Path, base_model: str,
                  roles: set[Role] | frozenset[Role] = frozenset(Role)) -> list[Role]:
    """Load the adapter files in ``folder`` for ``roles`` into ``model`` (files that are absent are skipped).

    Every file is checked against the model first (base model, rank, attention rank, alpha, key set, shapes,
    dtypes, finite values); nothing is copied unless all files pass.

    Returns:
        The roles that were loaded.

    Raises:
        AdapterFileError: naming the file and the mismatch.
    """
    cfg = adapter_config(model)
    staged: list[tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]] = []
    loaded = []
    for role in Role:
        path = Path(folder) / f"{role.value}.safetensors"
        if role not in roles or not path.is_file():
            continue
        tensors, meta = read_adapter_file(path)
        expected = {"role": role.value, "base_model": base_model, "rank": str(cfg.rank), "alpha": str(cfg.alpha)}
        wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        attention_rank = meta.get("attention_rank", meta.get("rank"))
        if attention_rank != str(cfg.attention_lora_rank):
            wrong["attention_rank"] = (attention_rank, str(cfg.attention_lora_rank))
        if cfg.n_experts > 1 and file_mixing(meta) != cfg.mixing:
            wrong["mixing"] = (file_mixing(meta), cfg.mixing)
        if wrong:
            raise AdapterFileError(f"{path} does not fit this model: " + ", ".join(
                f"{k} is {got!r}, model has {want!r}" for k, (got, want) in wrong.items()))
        params = role_parameters(model, role)
        check_tensors(tensors, {k: p.detach() for k, p in params.items()}, str(path))
        staged.append((params, tensors))
        loaded.append(role)
    with torch.no_grad():
        for params, tensors in staged:
            for name, p in params.items():
                p.copy_(tensors[name])
    return loaded


def check_tensors(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    """Check that ``tensors`` has exactly the keys, shapes and dtypes of ``reference`` and only finite values.

    Raises:
        AdapterFileError: listing the differences.
    """
    try:
        validate(tensors, spec_of(reference))  # the one check of names, shapes, dtypes and finiteness
    except InvalidUpload as err:
        raise AdapterFileError(f"{what} does not match the model: " + "; ".join(err.problems[:6])) from None


def assign_tensors(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``tensors`` into the parameters ``params`` (same names) after :func:`check_tensors`; nothing is changed
    if the check fails.

    Raises:
        AdapterFileError: naming ``what`` and the differences.
    """
    check_tensors(tensors, {k: p.detach() for k, p in params.items()}, what)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
