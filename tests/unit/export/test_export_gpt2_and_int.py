"""Export of a tiny GPT-2 (Conv1D projections) to both formats, the 8da8w ExecuTorch program, the int4 ONNX model,
and a device's state folder as export input."""

import pytest

from device_sdk.adapters import save_adapters
from device_sdk.checkpoint import save_checkpoint
from device_sdk.config import TrainConfig
from device_sdk.train import init_train_state
from export.errors import ExportError
from export.load import load_personalized
from export.pipeline import ExportOptions, export_checkpoint

from ...conftest import make_model
from .conftest import check_both_formats, personalised_run, phone


def test_tiny_gpt2_exports_to_both_formats_matching_pytorch(exported):
    done = exported("tiny-gpt2")
    check_both_formats(done)
    assert done.manifest["base_model"] == "tiny-gpt2"


def test_a_device_state_folder_exports_with_its_round(tmp_path):
    model = make_model("tiny-llama", n_specialists=1)
    state = init_train_state(model, TrainConfig(steps=1))
    save_checkpoint(tmp_path / "dev" / "checkpoints", model, state, "tiny-llama",
                    {"round": 4, "completed_rounds": 4, "global_version": 4})
    loaded = load_personalized(tmp_path / "dev")
    assert loaded.info["round"] == 4 and loaded.adapter.n_specialists == 1
    manifest = export_checkpoint(tmp_path / "dev", tmp_path / "out", ExportOptions(formats=("onnx",), max_seq=64))
    assert manifest["round"] == 4 and list(manifest["verification"]) == ["model.onnx"]


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
    assert "[onnx]" in phone(tmp_path / "out", "--runtime", "onnx", "--onnx-file", "model.int4.onnx")
    with pytest.raises(ExportError, match="add the onnx format"):
        ExportOptions(formats=("pte",), quantize="int4")


def test_8da8w_program_holds_quality_with_int8_weights(tmp_path):
    run, _ = personalised_run("tiny-llama", tmp_path / "run")
    q = export_checkpoint(run, tmp_path / "q", ExportOptions(formats=("pte",), quantize="8da8w", max_seq=64))
    result = q["verification"]["model.pte"]
    assert result["passed"] and q["export"]["quantize"] == "8da8w"
    assert abs(result["ppl_exported"] / result["ppl_pytorch"] - 1) < 0.05
    out = phone(tmp_path / "q", "--runtime", "pte")
    assert "[pte]" in out and "tokens/s" in out
    assert not (tmp_path / "q" / ".merged.ptd").exists()  # the runtime's merged data file does not linger


def test_8da4w_refuses_gpt2_conv1d_clearly(tmp_path):
    save_adapters(make_model("tiny-gpt2", n_specialists=1), tmp_path / "g", "tiny-gpt2")
    with pytest.raises(ExportError, match="GPT-2 uses Conv1D"):
        export_checkpoint(tmp_path / "g", tmp_path / "out", ExportOptions(formats=("pte",), quantize="8da4w"))
