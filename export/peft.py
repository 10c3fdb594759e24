"""``python -m export --format peft``: a device's experts as Hugging Face PEFT LoRA adapters.

Layout of the output folder (PEFT's own multi-adapter layout: the first adapter at the top, the others in
subfolders named after them)::

    adapter_config.json  adapter_model.safetensors     expert 0 (the generalist) + the attention LoRA
    specialist-1/        adapter_config.json  adapter_model.safetensors     expert G + the attention LoRA
    specialist-2/ ...    (generalist-2/ ... for devices with several generalists)
    experts.json         which folder holds which expert, and the verification numbers

``PeftModel.from_pretrained(base, OUT)`` loads the generalist; ``peft_model.load_adapter(OUT / "specialist-1",
adapter_name="specialist-1")`` and ``set_adapter`` switch to a specialist. What is lost: the router. PEFT applies
one adapter to every token; our model mixes the top-k experts per token. Each adapter equals our model with every
token forced onto that expert (:func:`device_sdk.inject.forced_expert`), which the export checks when PEFT is
installed. The key names and scales are described in :mod:`device_sdk.peft_adapters`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from device_sdk.config import AdapterConfig
from device_sdk.fileio import atomic_write_bytes
from device_sdk.inject import forced_expert
from device_sdk.peft_adapters import lora_sites, save_peft_adapter

from .errors import ExportError
from .load import Personalized, load_personalized
from .verify import Tolerance, compare, require

log = logging.getLogger(__name__)

INDEX = "experts.json"
#: The same fp32 arithmetic (our dense mixture only adds exact zeros for the other experts): logits were bit-identical
#: on the tiny models and on SmolLM2-135M (max |diff| 0.0); the margin allows other BLAS summation orders.
PEFT_TOL = Tolerance(max_abs_logit_diff=1e-4, min_argmax_agreement=0.999, max_ppl_rel_diff=1e-5)


def adapter_names(cfg: AdapterConfig) -> list[str]:
    """The adapter name of each expert, in expert order: ``generalist`` (``generalist-2`` ...), then
    ``specialist-1`` ... (1-based among the specialists)."""
    generalists = ["generalist" if g == 0 else f"generalist-{g + 1}" for g in range(cfg.n_generalists)]
    return generalists + [f"specialist-{s + 1}" for s in range(cfg.n_specialists)]


def export_peft(checkpoint: Path, out: Path, data: Path | None = None, verify: bool = True,
                tol: Tolerance = PEFT_TOL) -> dict:
    """Write every expert of a device's checkpoint as a PEFT LoRA adapter (expert 0 at the top of ``out``, the
    others in subfolders), check each against our model forced onto that expert, and write ``experts.json``.

    Args:
        checkpoint: a device state folder, checkpoint folder or ``train-local`` output (as the other formats).
        out: the output folder.
        data: a user folder whose test text is used for the check (default: the built-in sample).
        verify: load every adapter with PEFT on a fresh base model and compare logits (skipped with a warning when
            ``peft`` is not installed).
        tol: the tolerance of that comparison.

    Returns:
        The contents of ``experts.json``.

    Raises:
        ExportError: a bad checkpoint, or PEFT does not adapt the same layers. VerificationError: an adapter does
            not match (the numbers are in the message; the files stay for inspection, ``experts.json`` is not
            written).
    """
    loaded = load_personalized(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, model = loaded.adapter, loaded.model.model
    names = adapter_names(cfg)
    adapters = {}
    for expert, name in enumerate(names):
        folder = out if expert == 0 else out / name
        save_peft_adapter(model, folder, loaded.base_model, expert)
        adapters[name] = {"expert": expert, "role": "generalist" if expert < cfg.n_generalists else "specialist",
                          "path": "." if expert == 0 else name}
    log.info("wrote %d PEFT adapter(s) to %s: %s", len(names), out, ", ".join(names))
    verification = verify_peft(loaded, out, names, data, tol) if verify else {}
    index = {
        "format": "device_sdk.peft/1",
        "base_model": loaded.base_model,
        "adapter": cfg.to_dict(),
        "default": names[0],
        "adapters": adapters,
        "lost": "the router: PEFT applies one adapter to every token, the device mixes its top-k experts per token",
        "round": loaded.info.get("round"),
        "global_version": loaded.info.get("global_version"),
        "verified": bool(verification),
        "verification": verification,
    }
    atomic_write_bytes(out / INDEX, (json.dumps(index, indent=1) + "\n").encode())
    return index


def verify_peft(loaded: Personalized, out: Path, names: list[str], data: Path | None = None,
                tol: Tolerance = PEFT_TOL) -> dict:
    """Load the adapters in ``out`` with PEFT on a fresh base model; each must adapt exactly our LoRA layers and
    give our model's logits with every token forced onto its expert.

    Returns:
        ``{adapter name: parity numbers}`` (empty if PEFT is not installed).

    Raises:
        ExportError: PEFT adapts other layers. VerificationError: logits differ beyond ``tol``.
    """
    try:
        from peft import PeftModel
    except ImportError:
        log.warning("peft is not installed: the PEFT adapters in %s were not checked (peft comes with the export "
                    "extra: pip install -e '.[export]')", out)
        return {}
    import torch

    from device_sdk.models import load_base_model

    from .pipeline import verification_tokens

    base = load_base_model(loaded.base_model).model
    peft_model = PeftModel.from_pretrained(base, str(out), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(out / name), adapter_name=name)
    peft_model.eval()
    ours = {s.path for s in lora_sites(loaded.model.model, 0)}
    theirs = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
              if hasattr(m, "lora_A") and names[0] in m.lora_A}
    if ours != theirs:
        raise ExportError(f"PEFT adapts other layers than the device's model: missing {sorted(ours - theirs)[:3]}, "
                          f"extra {sorted(theirs - ours)[:3]}")
    tokens = verification_tokens(loaded, data)
    results = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        return peft_model(input_ids=x, use_cache=False).logits

    for expert, name in enumerate(names):
        peft_model.set_adapter(name)
        with forced_expert(loaded.model.model, expert):
            result = compare(loaded.model, run, tokens, f"PEFT adapter {name}", tol=tol)
        log.info("PEFT %s: max |logit diff| %.2e, argmax agreement %.4f", name, result.max_abs_logit_diff,
                 result.argmax_agreement)
        require(result, tol)
        results[name] = result.to_dict()
    return results


__all__ = ["INDEX", "PEFT_TOL", "adapter_names", "export_peft", "verify_peft"]
