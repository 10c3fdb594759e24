"""Attach LoRA (attention) and LoRA-MoE (MLP) adapters to a Hugging Face causal LM, in place."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .config import AdapterConfig
from .errors import InjectionError
from .lora import LoRALinear, LoRAMoELinear, RoutedMLP, RoutingSlot, linear_dims, routed_blocks
from .mixture import GPT2_MLP, LLAMA_MLP, ExpertMLPs, MLPForm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilySpec:
    """Where adapters go in one model family, and how its MLP computes (``None``: unknown, projection mixing
    only)."""

    attention_targets: tuple[str, ...]
    mlp_module: str
    mlp_targets: tuple[str, ...]
    mlp_form: MLPForm | None = None


GPT2 = FamilySpec(("attn.c_attn", "attn.c_proj"), "mlp", ("c_fc", "c_proj"), GPT2_MLP)
LLAMA = FamilySpec(
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp",
    ("gate_proj", "up_proj", "down_proj"),
    LLAMA_MLP,
)
FAMILIES: dict[str, FamilySpec] = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA}

ADAPTER_CONFIG_ATTR = "device_sdk_adapter_config"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def family_spec(model: nn.Module, cfg: AdapterConfig) -> FamilySpec:
    """The targets for ``model``: the config's explicit targets, else its family's defaults.

    Raises:
        InjectionError: for an unknown family without explicit targets.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = FAMILIES.get(model_type)
    if default is None and None in (cfg.attention_targets, cfg.mlp_module, cfg.mlp_targets):
        raise InjectionError(
            f"no default adapter targets for model type {model_type!r} (known: {sorted(FAMILIES)}); pass "
            "attention_targets, mlp_module and mlp_targets in AdapterConfig"
        )
    spec = FamilySpec(
        attention_targets=cfg.attention_targets or default.attention_targets,
        mlp_module=cfg.mlp_module or default.mlp_module,
        mlp_targets=cfg.mlp_targets or default.mlp_targets,
        mlp_form=default.mlp_form if default is not None else None,
    )
    if cfg.mixing == "mlp" and cfg.n_experts > 1:
        form = spec.mlp_form
        if form is None:
            raise InjectionError(
                f"mixing='mlp' needs to know how a {model_type!r} MLP block computes (known: {sorted(FAMILIES)}); "
                "use AdapterConfig(mixing='projection') for this model")
        if set(spec.mlp_targets) != {*form.inputs, form.output}:
            raise InjectionError(
                f"mixing='mlp' makes each expert the whole MLP, so every MLP projection {[*form.inputs, form.output]} "
                f"needs a LoRA; got mlp_targets={list(spec.mlp_targets)}. Target all of them or use "
                "AdapterConfig(mixing='projection')")
    return spec


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze ``model`` and wrap its attention projections with LoRA and its MLP blocks with LoRA-MoE.

    Every MLP block gets one router over ``cfg.n_experts`` experts shared by all its target projections; base
    weights stay single and frozen (experts add low-rank updates only). Experts have rank ``cfg.rank`` and scale
    ``cfg.scale``; attention LoRAs rank ``cfg.attention_lora_rank`` and scale ``cfg.attention_scale``.

    Args:
        model: a Hugging Face causal LM (GPT-2 and Llama families, or any model with explicit targets).
        cfg: adapter shape.

    Returns:
        The same model object, modified in place, with ``cfg`` recorded on it.

    Raises:
        InjectionError: if the model already has adapters, or a target list matches no module (the message
            names what was searched).
    """
    if getattr(model, ADAPTER_CONFIG_ATTR, None) is not None:
        raise InjectionError("this model already has adapters; load a fresh base model to inject again")
    spec = family_spec(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)

    names = [name for name, _ in model.named_modules()]
    attention = [n for n in names if any(_matches(n, t) for t in spec.attention_targets)]
    mlps = [n for n in names if _matches(n, spec.mlp_module)]
    if not attention:
        raise InjectionError(
            f"attention targets {list(spec.attention_targets)} matched no module; module names look like "
            f"{names[1:6]}. Pass AdapterConfig(attention_targets=...)"
        )
    if not mlps:
        raise InjectionError(
            f"MLP module {spec.mlp_module!r} matched no module; module names look like {names[1:6]}. "
            "Pass AdapterConfig(mlp_module=...)"
        )

    for name in attention:  # rank and scale of their own (HetLoRA / FlexLoRA scale only the MLP rank)
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), cfg.attention_lora_rank,
                                               cfg.attention_scale))

    n_projections = 0
    for mlp_name in mlps:
        mlp = model.get_submodule(mlp_name)
        children = [n for n, _ in mlp.named_modules() if n and any(_matches(n, t) for t in spec.mlp_targets)]
        if not children:
            raise InjectionError(
                f"MLP targets {list(spec.mlp_targets)} matched nothing inside {mlp_name!r} (children: "
                f"{[n for n, _ in mlp.named_children()]}). Pass AdapterConfig(mlp_targets=...)"
            )
        slot = RoutingSlot()
        d_model = linear_dims(mlp.get_submodule(children[0]))[0]
        for child in children:
            base = mlp.get_submodule(child)
            wrapped = LoRAMoELinear(base, cfg.rank, cfg.scale, cfg.n_generalists, cfg.n_specialists, slot,
                                    cfg.sparse)
            _set_submodule(mlp, child, wrapped)
            n_projections += 1
        experts = ExpertMLPs(mlp, spec.mlp_form) if cfg.mixing == "mlp" and cfg.n_experts > 1 else None
        routed = RoutedMLP(mlp, d_model, cfg.n_experts, cfg.k, cfg.router_init_std, slot, experts)
        _set_submodule(model, mlp_name, routed)

    setattr(model, ADAPTER_CONFIG_ATTR, cfg)
    log.info("injected LoRA into %d attention projections and %d-expert LoRA-MoE into %d MLP projections "
             "of %d blocks", len(attention), cfg.n_experts, n_projections, len(mlps))
    return model


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The :class:`AdapterConfig` a model was injected with.

    Raises:
        InjectionError: if the model has no adapters.
    """
    cfg = getattr(model, ADAPTER_CONFIG_ATTR, None)
    if cfg is None:
        raise InjectionError("this model has no adapters; call inject_adapters first")
    return cfg


@contextmanager
def forced_expert(model: nn.Module, expert: int) -> Iterator[nn.Module]:
    """Route every token of every MLP block to expert ``expert`` with gate 1 while the context is open.

    The block then computes exactly that expert: its base MLP with the expert's LoRAs (both mixing forms), plus
    the attention LoRA, i.e. a plain LoRA model (what a PEFT export of that expert holds). The routers still run
    (``router_probs`` stays meaningful); the previous setting is restored on exit.

    Args:
        model: an adapted model (:func:`inject_adapters`).
        expert: ``0 <= expert < n_experts`` (experts are ordered generalists first, then specialists).

    Returns:
        A context manager yielding ``model``.

    Raises:
        InjectionError: if the model has no adapters or no such expert.
    """
    cfg = adapter_config(model)
    if not 0 <= expert < cfg.n_experts:
        raise InjectionError(f"expert {expert} does not exist: this model has {cfg.n_experts} expert(s) per MLP "
                             f"block (0 .. {cfg.n_experts - 1})")
    blocks = routed_blocks(model)
    before = [b.forced_expert for b in blocks]
    for b in blocks:
        b.forced_expert = expert
    try:
        yield model
    finally:
        for b, previous in zip(blocks, before):
            b.forced_expert = previous


def use_export_form(model: nn.Module) -> nn.Module:
    """Switch every routed MLP block of ``model`` to the export form and return it.

    The model then computes the same function (to float tolerance) from ops an exported graph can delegate as a
    whole: every expert on every token weighted by its dense gate (zero outside the top k), each expert with its own
    LoRA weights (so each adapter tensor keeps its own key in a program's data file), no data-dependent shapes.
    Blocks compiled for training (:func:`device_sdk.compiled.compile_blocks`) run eager again: an exporter traces
    the module code itself.
    """
    from .compiled import compile_blocks

    compile_blocks(model, enabled=False)
    for block in routed_blocks(model):
        block.use_export_form()
    return model
