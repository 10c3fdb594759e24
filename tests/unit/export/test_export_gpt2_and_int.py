"""Export of a tiny GPT-2 (Conv1D projections) and of the projection mixing form to both formats, the 8da8w
ExecuTorch program, the int4 ONNX model in both mixing forms, and a device's state folder as export input. (Which
form is covered where: conftest.py.)"""

import shutil

import pytest

from device_sdk.adapters import save_adapters
from device_sdk.checkpoint import save_checkpoint
from device_sdk.config import TrainConfig
from device_sdk.train import init_train_state
from export.errors import ExportError
from export.load import load_personalized
from export.pipeline import ExportOptions, export_checkpoint, update_program_adapters

from ...conftest import make_model
from .conftest import check_both_formats, phone


def test_tiny_gpt2_exports_to_both_formats_matching_pytorch(exported):
    done = exported("tiny-gpt2")
    check_both_formats(done)
    assert done.manifest["base_model"] == "tiny-gpt2"


def test_projection_mixing_exports_to_both_formats_matching_pytorch(exported):
    done = exported("tiny-llama", "projection")  # the earlier form; adapter files without `mixing` load as it
    check_both_formats(done)
    assert done.manifest["adapter"]["mixing"] == "projection"


def test_update_adapters_refuses_the_other_mixing_form(exported, tmp_path):
    phone_dir = tmp_path / "phone"
    shutil.copytree(exported("tiny-llama", "projection").out, phone_dir)
    save_adapters(make_model("tiny-llama", n_specialists=2, mixing="mlp"), tmp_path / "mlp", "tiny-llama")
    before = (phone_dir / "adapters.ptd").read_bytes()
    with pytest.raises(ExportError, match=r"another model than the program computes \(mixing 'projection' "
                                          r"\(program\) vs 'mlp' \(adapters\)\)"):
        update_program_adapters(phone_dir, tmp_path / "mlp")  # same tensor names and shapes, another model
    assert (phone_dir / "adapters.ptd").read_bytes() == before


def test_a_device_state_folder_exports_with_its_round(tmp_path):
    model = make_model("tiny-llama", n_specialists=1)
    state = init_train_state(model, TrainConfig(steps=1))
    save_checkpoint(tmp_path / "dev" / "checkpoints", model, state, "tiny-llama",
                    {"round": 4, "completed_rounds": 4, "global_version": 4})
    loaded = load_personalized(tmp_path / "dev")
    assert loaded.info["round"] == 4 and loaded.adapter.n_specialists == 1
    manifest = export_checkpoint(tmp_path / "dev", tmp_path / "out", ExportOptions(formats=("onnx",), max_seq=64))
    assert manifest["round"] == 4 and list(manifest["verification"]) == ["model.onnx"]


@pytest.mark.parametrize("mixing", ["mlp", "projection"])
def test_int4_onnx_quantises_base_matmuls_only_and_holds_quality(tmp_path, mixing):
    model = make_model("tiny-llama", n_specialists=2, mixing=mixing)
    save_adapters(model, tmp_path / "a", "tiny-llama")
    manifest = export_checkpoint(tmp_path / "a", tmp_path / "out",
                                 ExportOptions(formats=("onnx",), quantize="int4", max_seq=64))
    import onnx

    from export.onnx import adapter_matmuls

    quantized = onnx.load(str(tmp_path / "out" / "model.int4.onnx"))
    int4 = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    assert len(int4) == 2 * (4 + 3)  # base projections
    # one block sum per input: q, k and v share theirs, gate and up theirs; o and down have their own
    assert sum(n.op_type == "ReduceSum" for n in quantized.graph.node) == len({n.input[0] for n in int4}) == 2 * 4
    # per layer: attention A/B, the router, 3 experts' A/B on 3 projections and the 3 gate columns of the export
    # form (device_sdk.lora.RoutedMLP.use_export_form), in either mixing form: fp32 MatMul (besides each int4
    # node's offset term)
    kept = [n for n in adapter_matmuls(quantized, 8) if "_int4_" not in n]
    assert len(kept) == 2 * (4 * 2 + 1 + 3 * 3 * 2 + 3)
    inits = {i.name: list(i.dims) for i in quantized.graph.initializer}
    gemm = [inits[n.input[1]] for n in quantized.graph.node if n.op_type == "Gemm" and n.input[1] in inits]
    assert all(min(dims) <= 8 for dims in gemm)  # no base projection left fp32 as a Gemm
    assert sorted(kept) == sorted(adapter_matmuls(onnx.load(str(tmp_path / "out" / "model.onnx")), 8))
    check = manifest["verification"]["model.int4.onnx"]
    assert check["passed"] and check["ppl_rel_diff"] < 0.05
    assert manifest["files"]["model.int4.onnx"]["bytes"] < manifest["files"]["model.onnx"]["bytes"]
    if mixing == "projection":  # the phone stand-in reads either form alike
        return
    assert "[onnx]" in phone(tmp_path / "out", "--runtime", "onnx", "--onnx-file", "model.int4.onnx")
    with pytest.raises(ExportError, match="add the onnx format"):
        ExportOptions(formats=("pte",), quantize="int4")


def test_8da8w_program_holds_quality_with_int8_weights(exported, tmp_path):
    run = exported("tiny-llama", "projection").run  # 8da4w (test_export.py) covers the mlp form
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


def test_int4_keeps_an_attention_lora_of_a_higher_rank_than_the_experts_fp32(tmp_path):
    import onnx

    model = make_model("tiny-llama", n_specialists=2, rank=4, attention_rank=8)  # as a HetLoRA-style device
    save_adapters(model, tmp_path / "a", "tiny-llama")
    export_checkpoint(tmp_path / "a", tmp_path / "out", ExportOptions(formats=("onnx",), quantize="int4", max_seq=64))
    quantized = onnx.load(str(tmp_path / "out" / "model.int4.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in quantized.graph.node) == 2 * (4 + 3)  # base projections only


def test_options_the_model_or_the_text_cannot_serve_are_refused_before_anything_ships(tmp_path, tiny_user):
    save_adapters(make_model("tiny-llama", n_specialists=1), tmp_path / "a", "tiny-llama")
    with pytest.raises(ExportError, match="max_seq 1024 exceeds the 512 positions tiny-llama was trained for.*"
                                          "--max-seq 512 or less"):
        export_checkpoint(tmp_path / "a", tmp_path / "long", ExportOptions(formats=("onnx",), max_seq=1024))
    assert not (tmp_path / "long").exists()
    short = tmp_path / "short"  # a user whose test text holds too few windows to judge a quantised file
    shutil.copytree(tiny_user, short)
    (short / "test.txt").write_text("alpha beta gamma " * 20 + "\n")
    with pytest.raises(ExportError,
                       match=r"verified on 16 windows of 64 tokens .* gives 340 tokens with this tokenizer \(5 windows\)"):
        export_checkpoint(tmp_path / "a", tmp_path / "q", ExportOptions(formats=("onnx",), quantize="int4",
                                                                       max_seq=64), data=short)
    kv = export_checkpoint(tmp_path / "a", tmp_path / "kv", ExportOptions(formats=("onnx",), kv_cache=True,
                                                                          max_seq=8))  # a cache of 8 positions
    assert kv["verification"]["model.onnx"]["greedy"]["equal"] == 3
