"""Export of tiny personalised models to ExecuTorch and ONNX, checked against PyTorch."""

import json
import subprocess
import sys
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
from export.pipeline import ExportOptions, export_checkpoint
from export.verify import compare, require

from ...conftest import make_model

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def adapters_dir(request, tmp_path):
    model = make_model(request.param, n_specialists=2)  # random B: every expert and router matters
    save_adapters(model, tmp_path / "run" / "adapters", request.param)
    return tmp_path / "run", model


def test_both_formats_match_pytorch_at_two_sequence_lengths(adapters_dir, tmp_path):
    run, model = adapters_dir
    manifest = export_checkpoint(run, tmp_path / "out", ExportOptions(max_seq=128))
    assert set(manifest["verification"]) == {"model.pte", "model.onnx"}
    assert all(v["passed"] and v["seq_lens"] == [16, 64] for v in manifest["verification"].values())
    assert manifest["adapter"]["n_specialists"] == 2 and manifest["base_model"] in ("tiny-gpt2", "tiny-llama")
    assert {"model.pte", "model.onnx", "tokenizer.json"} <= set(manifest["files"])
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest

    model.eval()
    pte, onnx = PteRunner(tmp_path / "out" / "model.pte"), OnnxRunner(tmp_path / "out" / "model.onnx")
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


def test_update_adapters_after_a_round_keeps_program_and_base_file(tmp_path):
    model = make_model("tiny-llama", adapter_seed=1, n_specialists=1)
    with torch.no_grad():  # zero B matrices are equal tensors: they must still get keys of their own
        for name, p in model.named_parameters():
            if name.endswith("lora_B") and ".layers.0." in name:
                p.zero_()
    save_adapters(model, tmp_path / "round1", "tiny-llama")
    export_checkpoint(tmp_path / "round1", tmp_path / "phone", ExportOptions(formats=("pte",), max_seq=64))
    program = (tmp_path / "phone" / "model.pte").read_bytes()
    base = (tmp_path / "phone" / "base.ptd").read_bytes()
    keys = json.loads((tmp_path / "phone" / "adapter_keys.json").read_text())
    assert len(set(keys.values())) == len(keys)

    newer = make_model("tiny-llama", adapter_seed=2, n_specialists=1)  # the next round's adapters
    save_adapters(newer, tmp_path / "round2", "tiny-llama")
    from export.pipeline import update_program_adapters

    update_program_adapters(tmp_path / "phone", tmp_path / "round2")
    assert (tmp_path / "phone" / "model.pte").read_bytes() == program
    assert (tmp_path / "phone" / "base.ptd").read_bytes() == base
    runner = PteRunner(tmp_path / "phone" / "model.pte")
    x = torch.randint(0, 257, (1, 21))
    newer.eval()
    with torch.no_grad():
        expected = newer(input_ids=x).logits
    torch.testing.assert_close(runner(x), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, model.eval()(input_ids=x).logits, atol=1e-3)

    export_checkpoint(tmp_path / "round2", tmp_path / "phone2", ExportOptions(formats=("pte",), max_seq=64))
    assert (tmp_path / "phone2" / "base.ptd").read_bytes() == base  # base data identical across rounds


def test_update_adapters_rejects_a_different_shape(tmp_path):
    save_adapters(make_model("tiny-llama", n_specialists=1), tmp_path / "a", "tiny-llama")
    export_checkpoint(tmp_path / "a", tmp_path / "phone", ExportOptions(formats=("pte",), max_seq=32))
    save_adapters(make_model("tiny-llama", n_specialists=2), tmp_path / "b", "tiny-llama")
    from export.pipeline import update_program_adapters

    before = (tmp_path / "phone" / "adapters.ptd").read_bytes()
    with pytest.raises(ExportError, match="do not fit the program"):
        update_program_adapters(tmp_path / "phone", tmp_path / "b")
    assert (tmp_path / "phone" / "adapters.ptd").read_bytes() == before


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


def test_8da4w_program_shrinks_the_base_file_and_holds_quality(tmp_path):
    model = make_model("tiny-llama", n_specialists=1)
    save_adapters(model, tmp_path / "a", "tiny-llama")
    fp32 = export_checkpoint(tmp_path / "a", tmp_path / "fp32", ExportOptions(formats=("pte",), max_seq=64))
    q = export_checkpoint(tmp_path / "a", tmp_path / "q", ExportOptions(formats=("pte",), quantize="8da4w",
                                                                         max_seq=64))
    assert q["verification"]["model.pte"]["passed"] and q["export"]["quantize"] == "8da4w"
    assert q["files"]["base.ptd"]["bytes"] < 0.5 * fp32["files"]["base.ptd"]["bytes"]
    assert q["files"]["adapters.ptd"]["bytes"] == fp32["files"]["adapters.ptd"]["bytes"]  # adapters stay fp32
    with pytest.raises(ExportError, match="add the pte format"):
        ExportOptions(formats=("onnx",), quantize="8da4w")


def test_8da8w_program_holds_quality_with_int8_weights(tmp_path):
    model = make_model("tiny-llama", n_specialists=1)
    save_adapters(model, tmp_path / "a", "tiny-llama")
    q = export_checkpoint(tmp_path / "a", tmp_path / "q", ExportOptions(formats=("pte",), quantize="8da8w",
                                                                         max_seq=64))
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
