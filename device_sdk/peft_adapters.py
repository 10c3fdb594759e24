"""PEFT LoRA adapters in and out: one expert of an adapted model (with the attention LoRA) as a Hugging Face PEFT
LoRA adapter folder, and such a folder back into an adapted model.

With every token on one expert (gate 1, :func:`device_sdk.inject.forced_expert`) a block computes that expert's
MLP: the base MLP with the expert's LoRA on each MLP projection, in both mixing forms. That is exactly a PEFT LoRA
model on the same targets, so the folder ``PeftModel.from_pretrained(base, folder)`` loads gives the same logits. The
router (the token-level choice between experts) has no PEFT counterpart and is not written.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path in the Hugging Face model>.lora_A.weight`` (r, D_in) and ``.lora_B.weight``
(D_out, r): our factors' own layouts, for ``nn.Linear`` and GPT-2's ``Conv1D`` alike (``fan_in_fan_out`` only tells
PEFT how to merge into a Conv1D weight). Scales: ours is ``alpha / sqrt(r)`` (rank-stabilised, paper eq. 4), which is
PEFT's ``use_rslora=True`` with ``lora_alpha=alpha``; an attention rank other than the expert rank goes into
``rank_pattern``. Reading accepts plain (``lora_alpha / r``) adapters too: the ratio of the two scales is folded into
B, so the adapted model computes what PEFT computes. Only safetensors are read; a pickled ``adapter_model.bin`` is
refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .adapters import atomic_save_safetensors
from .config import lora_scale
from .errors import AdapterFileError
from .fileio import atomic_write_bytes
from .inject import adapter_config, family_spec
from .lora import LoRAExpert, LoRALinear, LoRAMoELinear, RoutedMLP

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
#: Prefix of every key in a PEFT adapter file (``PeftModel.base_model.model`` is the Hugging Face model).
KEY_PREFIX = "base_model.model."
#: PEFT config fields whose adapters compute something a plain LoRA does not (refused when set).
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "fully trained extra modules",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
}


class PeftAdapterError(AdapterFileError):
    """A PEFT adapter folder cannot be read, or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class LoRASite:
    """One LoRA of an adapted model as PEFT sees it.

    Attributes:
        path: module path of the adapted layer in the Hugging Face model (``model.layers.0.mlp.gate_proj``).
        lora: the factors (``lora_A`` (r, D_in), ``lora_B`` (D_out, r)).
        scale: the update's scale ``alpha / sqrt(r)``.
        attention: True for an attention LoRA, False for an MLP expert's.
    """

    path: str
    lora: LoRAExpert
    scale: float
    attention: bool

    @property
    def rank(self) -> int:
        return self.lora.lora_A.shape[0]

    def keys(self) -> tuple[str, str]:
        """The PEFT keys of ``lora_A`` and ``lora_B``."""
        return f"{KEY_PREFIX}{self.path}.lora_A.weight", f"{KEY_PREFIX}{self.path}.lora_B.weight"


def lora_sites(model: nn.Module, expert: int) -> list[LoRASite]:
    """Every attention LoRA and expert ``expert``'s LoRA on every MLP projection, with Hugging Face module paths.

    Our wrappers sit where the base layers were, except that a :class:`RoutedMLP` at ``R`` holds the original MLP
    as ``R.mlp``: ``R.mlp.X`` is ``R.X`` in the Hugging Face model.

    Raises:
        PeftAdapterError: if the model has no expert ``expert``.
    """
    cfg = adapter_config(model)
    if not 0 <= expert < cfg.n_experts:
        raise PeftAdapterError(f"expert {expert} does not exist: the model has {cfg.n_experts} expert(s) per MLP "
                               f"block (0 .. {cfg.n_experts - 1})")
    routed = [name for name, m in model.named_modules() if isinstance(m, RoutedMLP)]

    def hf_path(name: str) -> str:
        for r in routed:
            if name.startswith(f"{r}.mlp."):
                return r + name[len(r) + len(".mlp"):]
        return name

    sites = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            sites.append(LoRASite(hf_path(name), module.lora, module.scale, attention=True))
        elif isinstance(module, LoRAMoELinear):
            sites.append(LoRASite(hf_path(name), module.experts[expert], module.scale, attention=False))
    return sites


def peft_config(model: nn.Module, base_model: str) -> dict:
    """The ``adapter_config.json`` of an adapted model's LoRAs (any one expert: all experts share the shape).

    Targets are the family's module suffixes (PEFT matches a list entry by exact name or ``.endswith("." + t)``, as
    :func:`device_sdk.inject.inject_adapters` does); the MLP targets are prefixed with the MLP module's name.
    """
    cfg = adapter_config(model)
    spec = family_spec(model, cfg)
    attention = list(spec.attention_targets)
    mlp = [f"{spec.mlp_module}.{t}" for t in spec.mlp_targets]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": True,  # scale alpha / sqrt(r), paper eq. 4
        "rank_pattern": {t: cfg.attention_lora_rank for t in attention} if cfg.attention_lora_rank != cfg.rank else {},
        "alpha_pattern": {},
        "target_modules": attention + mlp,
        "fan_in_fan_out": model_type == "gpt2",  # GPT-2's Conv1D stores its weight (D_in, D_out)
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def peft_state_dict(model: nn.Module, expert: int) -> dict[str, torch.Tensor]:
    """``{PEFT key: tensor}`` (float32 CPU copies) of the attention LoRA and expert ``expert``'s MLP LoRAs."""
    out = {}
    for site in lora_sites(model, expert):
        key_a, key_b = site.keys()
        out[key_a] = site.lora.lora_A.detach().to("cpu", torch.float32).clone()
        out[key_b] = site.lora.lora_B.detach().to("cpu", torch.float32).clone()
    return out


def save_peft_adapter(model: nn.Module, folder: Path, base_model: str, expert: int) -> list[Path]:
    """Write expert ``expert`` (with the attention LoRA) as a PEFT LoRA adapter folder.

    Returns:
        The written files: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Raises:
        PeftAdapterError: if the model has no expert ``expert``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    atomic_save_safetensors(peft_state_dict(model, expert), weights, {"format": "pt"})
    atomic_write_bytes(config, (json.dumps(peft_config(model, base_model), indent=2) + "\n").encode())
    return [config, weights]


def read_peft_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT LoRA adapter folder (safetensors only).

    Raises:
        PeftAdapterError: for a missing or unreadable folder, a pickled weights file, another PEFT method than
            LoRA, or LoRA variants a plain LoRA cannot represent (:data:`UNSUPPORTED`).
    """
    folder = Path(folder)
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise PeftAdapterError(f"{folder} is not a PEFT adapter folder: it has no {CONFIG_FILE}")
    if not weights.is_file():
        why = (f"only {PICKLE_FILE}, a pickle, which is never loaded; convert it to safetensors (load it with PEFT "
               "and save_pretrained(..., safe_serialization=True))") if (folder / PICKLE_FILE).is_file() else \
            "no weights file"
        raise PeftAdapterError(f"{folder} has no {WEIGHTS_FILE}: {why}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise PeftAdapterError(f"{config_path} is not readable JSON: {err}") from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise PeftAdapterError(f"{config_path} holds a {got!r} adapter; only PEFT LoRA adapters (peft_type LORA) "
                               "can be loaded")
    used = [f"{k} ({what})" for k, what in UNSUPPORTED.items() if config.get(k)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r} (trained biases)")
    if used:
        raise PeftAdapterError(f"{config_path} uses {', '.join(used)}: not representable as the plain LoRA of "
                               "this SDK")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise PeftAdapterError(f"{weights} is not a readable safetensors file: {err}") from err
    return config, tensors


def pattern_value(patterns: dict, path: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``): the first key
    ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)`` gives the value, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def peft_scale(config: dict, path: str, rank: int) -> float:
    """The scale PEFT applies to the LoRA at ``path``: ``alpha / sqrt(r)`` with ``use_rslora``, else ``alpha / r``
    (``alpha`` from ``alpha_pattern`` or ``lora_alpha``)."""
    alpha = float(pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8)))
    return lora_scale(alpha, rank) if config.get("use_rslora") else alpha / rank


def _problems_text(problems: list[str], limit: int = 6) -> str:
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def load_peft_adapter(model: nn.Module, folder: Path, expert: int = 0) -> dict[str, float]:
    """Copy a PEFT LoRA adapter into the attention LoRA and expert ``expert``'s MLP LoRAs of ``model``.

    Everything is checked before anything is copied: the adapter must adapt exactly the model's LoRA layers, with
    the model's ranks (per layer, from ``r`` / ``rank_pattern`` and the tensors) and the base model's layer shapes,
    and hold finite values. Scales are converted, not refused: B is multiplied by ``PEFT scale / our scale`` (1 for
    an rsLoRA adapter of our alpha), so the adapted model with every token on ``expert`` computes what PEFT does.
    Tensors are cast to the model's dtype (float32).

    Args:
        model: an adapted model (:func:`device_sdk.inject.inject_adapters`).
        folder: a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).
        expert: the MLP expert to fill (0: the generalist).

    Returns:
        ``{module path: factor multiplied into B}`` for the layers whose scale was converted (empty if none).

    Raises:
        PeftAdapterError: naming the folder and every mismatch (rank, targets, shapes, values).
    """
    folder = Path(folder)
    config, tensors = read_peft_adapter(folder)
    sites = lora_sites(model, expert)
    cfg = adapter_config(model)
    expected = {k: site for site in sites for k in site.keys()}
    missing = sorted({expected[k].path for k in expected if k not in tensors})
    extra = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"no LoRA for {len(missing)} layer(s) the model adapts, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) for layers or kinds the model does not adapt, e.g. {extra[:3]}")
    if problems:
        adapted = sorted({".".join(s.path.split(".")[-2:]) for s in sites})
        raise PeftAdapterError(
            f"{folder} does not target the model's LoRA layers (its target_modules: {config.get('target_modules')}; "
            f"the model adapts {adapted} in every block): " + _problems_text(problems))

    staged: list[tuple[LoRASite, torch.Tensor, torch.Tensor]] = []
    converted = {}
    for site in sites:
        key_a, key_b = site.keys()
        a, b = tensors[key_a], tensors[key_b]
        ours_a, ours_b = site.lora.lora_A, site.lora.lora_B
        kind = "attention" if site.attention else "MLP expert"
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{site.path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not the factors "
                            "of one LoRA")
            continue
        rank = a.shape[0]
        stated = int(pattern_value(config.get("rank_pattern"), site.path, config.get("r", 8)))
        if rank != stated:
            problems.append(f"{site.path}: the tensors have rank {rank}, adapter_config.json says {stated}")
        if rank != site.rank:
            problems.append(f"rank mismatch at {site.path}: the adapter's LoRA has rank {rank}, the model's {kind} "
                            f"LoRA rank {site.rank} (AdapterConfig rank={cfg.rank}, attention rank "
                            f"{cfg.attention_lora_rank})")
        elif (a.shape[1], b.shape[0]) != (ours_a.shape[1], ours_b.shape[0]):
            problems.append(f"base model shapes differ at {site.path}: the adapter maps {a.shape[1]} -> {b.shape[0]} "
                            f"features, this base model's layer {ours_a.shape[1]} -> {ours_b.shape[0]}")
        elif not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            problems.append(f"{site.path}: contains NaN or Inf")
        else:
            ratio = peft_scale(config, site.path, rank) / site.scale
            if ratio != 1.0:
                converted[site.path] = ratio
                b = (b.double() * ratio)
            staged.append((site, a.to(ours_a.dtype), b.to(ours_b.dtype)))
    if problems:
        raise PeftAdapterError(f"{folder} does not fit the model: " + _problems_text(problems))
    with torch.no_grad():
        for site, a, b in staged:
            site.lora.lora_A.copy_(a)
            site.lora.lora_B.copy_(b)
    if converted:
        log.info("%s: PEFT scale %s differs from ours (alpha / sqrt(r), alpha %s): B of %d layer(s) multiplied by "
                 "e.g. %.6g", folder, "lora_alpha / sqrt(r)" if config.get("use_rslora") else "lora_alpha / r",
                 cfg.alpha, len(converted), next(iter(converted.values())))
    log.info("loaded PEFT adapter %s (base %s) into the attention LoRA and expert %d of %d layer(s)", folder,
             config.get("base_model_name_or_path"), expert, len(sites))
    return converted


__all__ = ["CONFIG_FILE", "KEY_PREFIX", "WEIGHTS_FILE", "LoRASite", "PeftAdapterError", "load_peft_adapter",
           "lora_sites", "peft_config", "peft_scale", "peft_state_dict", "read_peft_adapter", "save_peft_adapter"]
