"""Shared by the export tests: one fp32 export per model family, mixing form and test module, and the checks run
on it.

An ExecuTorch lowering of a tiny model takes one to two minutes of single-threaded Python on a 2-core CPU, so a
module exports each (family, form) once and its tests read that export (tests that change an export work on a copy).
The export tests are split over two modules so that two pytest workers share the lowerings.

Which mixing form (``AdapterConfig.mixing``) is exported where, each file verified against PyTorch (export/verify.py):

=========================  ===========================================  =============================================
                           test_export.py                               test_export_gpt2_and_int.py
=========================  ===========================================  =============================================
fp32 .pte + .onnx          tiny-llama mlp (gated MLP experts)           tiny-gpt2 mlp (Conv1D, plain MLP experts),
                                                                        tiny-llama projection
adapter update (.pte)      tiny-llama mlp                               a projection program refuses mlp adapters
quantised .pte             8da4w: tiny-llama mlp                        8da8w: tiny-llama projection
int4 .onnx                                                              tiny-llama mlp and projection
=========================  ===========================================  =============================================

Projection mixing is family-independent code (LoRAMoELinear's gated update), so one family covers it; the mlp form
differs per family (gated or not, Linear or Conv1D), so both families run it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from device_sdk.adapters import save_adapters
from export.executorch import PteRunner
from export.onnx import OnnxRunner
from export.pipeline import ExportOptions, export_checkpoint

from ...conftest import make_model

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Exported:
    run: Path  # the checkpoint folder that was exported
    out: Path  # the export folder
    model: torch.nn.Module
    manifest: dict


def personalised_run(family: str, folder: Path, adapter_seed: int = 1,
                     mixing: str = "mlp") -> tuple[Path, torch.nn.Module]:
    """A checkpoint folder with a tiny model's adapters (2 specialists, random B: every expert and router matters;
    ``mixing`` the MoE form), except that tiny-llama's layer-0 q and v LoRA B are zero: equal tensors must still get
    adapter keys of their own."""
    model = make_model(family, adapter_seed=adapter_seed, n_specialists=2, mixing=mixing)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") and ".layers.0." in name and (".q_proj." in name or ".v_proj." in name):
                p.zero_()
    save_adapters(model, folder / "adapters", family)
    return folder, model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(family, mixing="mlp")``: the fp32 export (both formats, max_seq 128) of :func:`personalised_run`,
    made once per module."""
    made: dict[tuple[str, str], Exported] = {}

    def get(family: str, mixing: str = "mlp") -> Exported:
        if (family, mixing) not in made:
            root = tmp_path_factory.mktemp(f"{family}-{mixing}")
            run, model = personalised_run(family, root / "run", mixing=mixing)
            manifest = export_checkpoint(run, root / "out", ExportOptions(max_seq=128))
            assert manifest["adapter"]["mixing"] == mixing
            made[family, mixing] = Exported(run, root / "out", model, manifest)
        return made[family, mixing]

    return get


def check_both_formats(done: Exported) -> None:
    """The manifest says both files passed at two lengths, and both runtimes match PyTorch on other inputs."""
    manifest, model = done.manifest, done.model
    assert set(manifest["verification"]) == {"model.pte", "model.onnx"}
    assert all(v["passed"] and v["seq_lens"] == [16, 64] for v in manifest["verification"].values())
    assert manifest["adapter"]["n_specialists"] == 2
    assert {"model.pte", "model.onnx", "tokenizer.json"} <= set(manifest["files"])
    assert json.loads((done.out / "manifest.json").read_text()) == manifest
    # the base weights live in base.ptd (a few small constants may be folded into the program)
    assert manifest["files"]["base.ptd"]["bytes"] >= 0.95 * base_parameter_bytes(manifest["base_model"])

    pte, onnx = PteRunner(done.out / "model.pte"), OnnxRunner(done.out / "model.onnx")
    for length in (7, 40):
        x = torch.randint(0, 257, (1, length))
        with torch.no_grad():
            ref = model(input_ids=x).logits
        torch.testing.assert_close(pte(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(onnx(x), ref, rtol=1e-4, atol=1e-4)
    x = torch.randint(0, 257, (3, 11))  # ONNX keeps a dynamic batch
    with torch.no_grad():
        torch.testing.assert_close(onnx(x), model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def base_parameter_bytes(family: str) -> int:
    """fp32 bytes of a tiny base model's parameters (tied weights once)."""
    from device_sdk.models import load_base_model

    unique = {id(p): p for p in load_base_model(family).model.parameters()}
    return 4 * sum(p.numel() for p in unique.values())


def phone(folder: Path, *args: str) -> str:
    """Run the phone stand-in (examples/phone_inference.py) on an export folder; returns its stdout."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "phone_inference.py"), "--model-dir", str(folder),
                           "--prompt", "ab", "--tokens", "4", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
