"""Export of tiny personalised models to ExecuTorch and ONNX, checked against PyTorch."""

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from device_sdk.adapters import save_adapters
from device_sdk.checkpoint import save_checkpoint
from device_sdk.config import TrainConfig
from device_sdk.train import init_train_state
from export.errors import ExportError, VerificationError
from export.executorch import PteRunner
from export.load import load_personalized
from export.onnx import OnnxRunner
from export.pipeline import ExportOptions, export_checkpoint, update_program_adapters
from export.verify import compare, require

from ...conftest import make_model

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Exported:
    run: Path  # the checkpoint folder that was exported
    out: Path  # the export folder
    model: torch.nn.Module
    manifest: dict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(family)``: one fp32 export (both formats, max_seq 128) per tiny model family with 2 specialists,
    made once per module and shared by the tests that read it: an ExecuTorch lowering takes one to two minutes of
    Python on a 2-core CPU. Tests that change an export work on a copy."""
    made: dict[str, Exported] = {}

    def get(family: str) -> Exported:
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            model = make_model(family, adapter_seed=1, n_specialists=2)  # random B: every expert and router matters
            with torch.no_grad():  # but two equal (zero) tensors in tiny-llama: each must still get its own key
                for name, p in model.named_parameters():
                    if name.endswith("lora_B") and ".layers.0." in name and (".q_proj." in name or ".v_proj." in name):
                        p.zero_()
            save_adapters(model, root / "run" / "adapters", family)
            manifest = export_checkpoint(root / "run", root / "out", ExportOptions(max_seq=128))
            made[family] = Exported(root / "run", root / "out", model.eval(), manifest)
        return made[family]

    return get


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def adapters_dir(request, tmp_path):
    model = make_model(request.param, n_specialists=2)
    save_adapters(model, tmp_path / "run" / "adapters", request.param)
    return tmp_path / "run", model


@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-llama"])
def test_both_formats_match_pytorch_at_two_sequence_lengths(exported, family):
    done = exported(family)
    manifest, model = done.manifest, done.model
    assert set(manifest["verification"]) == {"model.pte", "model.onnx"}
    assert all(v["passed"] and v["seq_lens"] == [16, 64] for v in manifest["verification"].values())
    assert manifest["adapter"]["n_specialists"] == 2 and manifest["base_model"] == family
    assert {"model.pte", "model.onnx", "tokenizer.json"} <= set(manifest["files"])
    assert json.loads((done.out / "manifest.json").read_text()) == manifest

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


def test_a_device_state_folder_exports_with_its_round(tmp_path):
    model = make_model("tiny-llama", n_specialists=1)
    state = init_train_state(model, TrainConfig(steps=1))
    save_checkpoint(tmp_path / "dev" / "checkpoints", model, state, "tiny-llama",
                    {"round": 4, "completed_rounds": 4, "global_version": 4})
    loaded = load_personalized(tmp_path / "dev")
    assert loaded.info["round"] == 4 and loaded.adapter.n_specialists == 1
    manifest = export_checkpoint(tmp_path / "dev", tmp_path / "out", ExportOptions(formats=("onnx",), max_seq=64))
    assert manifest["round"] == 4 and list(manifest["verification"]) == ["model.onnx"]


def test_a_failed_parity_check_raises_with_the_numbers(adapters_dir):
    run, _ = adapters_dir
    loaded = load_personalized(run)
    tokens = torch.randint(0, 257, (200,)).numpy()
    result = compare(loaded.model, lambda x: loaded.model(x) + 0.5, tokens, "broken")
    assert not result.passed and result.max_abs_logit_diff == pytest.approx(0.5, rel=1e-3)
    with pytest.raises(VerificationError, match=r"broken does not match PyTorch: max \|logit diff\| 0.5"):
        require(result)


def test_malformed_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load_personalized(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no adapter files"):
        load_personalized(tmp_path / "empty")
    model = make_model("tiny-llama", n_specialists=2)
    save_adapters(model, tmp_path / "a", "tiny-llama")
    (tmp_path / "a" / "specialist.safetensors").unlink()
    with pytest.raises(ExportError, match=r"lacks \['specialist'\]"):
        load_personalized(tmp_path / "a")
    (tmp_path / "a" / "generalist.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="malformed checkpoint"):
        load_personalized(tmp_path / "a")


@pytest.mark.parametrize("kwargs,message", [
    ({"formats": ("tflite",)}, "formats must be"),
    ({"quantize": "int8"}, "quantize 'int8' is not supported"),
    ({"max_seq": 1}, "max_seq must be"),
])
def test_unsupported_options_fail_clearly(kwargs, message):
    with pytest.raises(ExportError, match=message):
        ExportOptions(**kwargs)


def test_update_adapters_after_a_round_keeps_program_and_base_file(exported, tmp_path):
    first = exported("tiny-llama")
    phone = tmp_path / "phone"
    shutil.copytree(first.out, phone)
    program, base = (phone / "model.pte").read_bytes(), (phone / "base.ptd").read_bytes()
    keys = json.loads((phone / "adapter_keys.json").read_text())
    assert len(set(keys.values())) == len(keys)  # the zero B matrices kept keys of their own

    newer = make_model("tiny-llama", adapter_seed=2, n_specialists=2)  # the next round's adapters
    save_adapters(newer, tmp_path / "round2", "tiny-llama")
    update_program_adapters(phone, tmp_path / "round2")
    assert (phone / "model.pte").read_bytes() == program
    assert (phone / "base.ptd").read_bytes() == base
    runner = PteRunner(phone / "model.pte")
    x = torch.randint(0, 257, (1, 21))
    newer.eval()
    with torch.no_grad():
        expected = newer(input_ids=x).logits
        assert not torch.allclose(expected, first.model(input_ids=x).logits, atol=1e-3)
    torch.testing.assert_close(runner(x), expected, rtol=1e-4, atol=1e-4)

    export_checkpoint(tmp_path / "round2", tmp_path / "phone2", ExportOptions(formats=("pte",), max_seq=128))
    assert (tmp_path / "phone2" / "base.ptd").read_bytes() == base  # base data identical across rounds


def test_update_adapters_rejects_a_different_shape(exported, tmp_path):
    phone = tmp_path / "phone"
    shutil.copytree(exported("tiny-llama").out, phone)
    save_adapters(make_model("tiny-llama", n_specialists=1), tmp_path / "b", "tiny-llama")
    before = (phone / "adapters.ptd").read_bytes()
    with pytest.raises(ExportError, match="do not fit the program"):
        update_program_adapters(phone, tmp_path / "b")
    assert (phone / "adapters.ptd").read_bytes() == before


def test_int4_onnx_quantises_base_matmuls_only_and_holds_quality(tmp_path):
    model = make_model("tiny-llama", n_specialists=2)
    save_adapters(model, tmp_path / "a", "tiny-llama")
    manifest = export_checkpoint(tmp_path / "a", tmp_path / "out",
                                 ExportOptions(formats=("onnx",), quantize="int4", max_seq=64))
    import onnx

    from export.onnx import adapter_matmuls

    quantized = onnx.load(str(tmp_path / "out" / "model.int4.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in quantized.graph.node) == 2 * (4 + 3)  # base projections
    # attention A/B, 3 experts' A/B on 3 projections, routers: fp32 MatMul (besides each int4 node's offset term)
    kept = [n for n in adapter_matmuls(quantized, 8) if "_int4_" not in n]
    assert len(kept) == 2 * 4 * 2 + 2 * 3 * 3 * 2 + 2
    assert sorted(kept) == sorted(adapter_matmuls(onnx.load(str(tmp_path / "out" / "model.onnx")), 8))
    check = manifest["verification"]["model.int4.onnx"]
    assert check["passed"] and check["ppl_rel_diff"] < 0.05
    assert manifest["files"]["model.int4.onnx"]["bytes"] < manifest["files"]["model.onnx"]["bytes"]
    assert "[onnx]" in _phone(tmp_path / "out", "--runtime", "onnx", "--onnx-file", "model.int4.onnx")
    with pytest.raises(ExportError, match="add the onnx format"):
        ExportOptions(formats=("pte",), quantize="int4")


def test_8da4w_program_shrinks_the_base_file_and_holds_quality(exported, tmp_path):
    fp32 = exported("tiny-llama")
    q = export_checkpoint(fp32.run, tmp_path / "q", ExportOptions(formats=("pte",), quantize="8da4w", max_seq=128))
    assert q["verification"]["model.pte"]["passed"] and q["export"]["quantize"] == "8da4w"
    assert q["files"]["base.ptd"]["bytes"] < 0.5 * fp32.manifest["files"]["base.ptd"]["bytes"]
    assert q["files"]["adapters.ptd"]["bytes"] == fp32.manifest["files"]["adapters.ptd"]["bytes"]  # adapters: fp32
    with pytest.raises(ExportError, match="add the pte format"):
        ExportOptions(formats=("onnx",), quantize="8da4w")


def test_8da8w_program_holds_quality_with_int8_weights(exported, tmp_path):
    q = export_checkpoint(exported("tiny-llama").run, tmp_path / "q",
                          ExportOptions(formats=("pte",), quantize="8da8w", max_seq=64))
    result = q["verification"]["model.pte"]
    assert result["passed"] and q["export"]["quantize"] == "8da8w"
    assert abs(result["ppl_exported"] / result["ppl_pytorch"] - 1) < 0.05
    out = _phone(tmp_path / "q", "--runtime", "pte")
    assert "[pte]" in out and "tokens/s" in out
    assert not (tmp_path / "q" / ".merged.ptd").exists()  # the runtime's merged data file does not linger


def _phone(folder, *args) -> str:
    """Run the phone stand-in (examples/phone_inference.py) on an export folder; returns its stdout."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "phone_inference.py"), "--model-dir", str(folder),
                           "--prompt", "ab", "--tokens", "4", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_8da4w_refuses_gpt2_conv1d_clearly(tmp_path):
    save_adapters(make_model("tiny-gpt2", n_specialists=1), tmp_path / "g", "tiny-gpt2")
    with pytest.raises(ExportError, match="GPT-2 uses Conv1D"):
        export_checkpoint(tmp_path / "g", tmp_path / "out", ExportOptions(formats=("pte",), quantize="8da4w"))
