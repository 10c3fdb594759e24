"""Export of a tiny Llama-style personalised model (mlp mixing, the default) to ExecuTorch and ONNX: parity with
PyTorch, adapter updates after a round, 8da4w quantisation, and clear errors. (GPT-2, the projection form, 8da8w and
int4: test_export_gpt2_and_int.py; which form is covered where: conftest.py.)"""

import json
import shutil

import pytest
import torch

from device_sdk.adapters import save_adapters
from export.errors import ExportError, VerificationError
from export.executorch import PteRunner
from export.load import load_personalized
from export.pipeline import ExportOptions, export_checkpoint, update_program_adapters, verify_export
from export.verify import compare, require

from ...conftest import make_model
from .conftest import check_both_formats


def test_tiny_llama_exports_to_both_formats_matching_pytorch(exported):
    done = exported("tiny-llama")
    check_both_formats(done)
    assert done.manifest["base_model"] == "tiny-llama" and done.manifest["adapter"]["mixing"] == "mlp"


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def adapters_dir(request, tmp_path):
    model = make_model(request.param, n_specialists=2)
    save_adapters(model, tmp_path / "run" / "adapters", request.param)
    return tmp_path / "run", model


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
    manifest = json.loads((phone / "manifest.json").read_text())
    assert manifest["verification"]["model.pte"]["passed"]  # verified against the new checkpoint
    assert "model.onnx" in manifest["stale"] and "model.onnx" not in manifest["verification"]  # old adapters inside
    assert set(verify_export(tmp_path / "round2", phone)) == {"model.pte"}  # the stale file is not re-verified



def test_update_adapters_rejects_adapters_of_another_scale_or_k(exported, tmp_path):
    phone = tmp_path / "phone"
    shutil.copytree(exported("tiny-llama").out, phone)
    before = (phone / "adapters.ptd").read_bytes()
    for name, settings, message in (("alpha", {"alpha": 8.0}, "alpha 16.0 \\(program\\) vs 8.0 \\(adapters\\)"),
                                    ("k", {"top_k": 1}, "top_k 2 \\(program\\) vs 1 \\(adapters\\)")):
        save_adapters(make_model("tiny-llama", n_specialists=2, **settings), tmp_path / name, "tiny-llama")
        with pytest.raises(ExportError, match=message):  # the same tensors, another model
            update_program_adapters(phone, tmp_path / name)
    assert (phone / "adapters.ptd").read_bytes() == before


def test_update_adapters_rejects_a_different_shape(exported, tmp_path):
    phone = tmp_path / "phone"
    shutil.copytree(exported("tiny-llama").out, phone)
    save_adapters(make_model("tiny-llama", n_specialists=1), tmp_path / "b", "tiny-llama")
    before = (phone / "adapters.ptd").read_bytes()
    with pytest.raises(ExportError, match="do not fit the program"):
        update_program_adapters(phone, tmp_path / "b")
    assert (phone / "adapters.ptd").read_bytes() == before


def test_8da4w_program_and_base_take_less_than_half_and_hold_quality(exported, tmp_path):
    fp32 = exported("tiny-llama")
    q = export_checkpoint(fp32.run, tmp_path / "q", ExportOptions(formats=("pte",), quantize="8da4w", max_seq=128))
    assert q["verification"]["model.pte"]["passed"] and q["export"]["quantize"] == "8da4w"

    def size(manifest, *files):
        return sum(manifest["files"][f]["bytes"] for f in files)

    # the quantised weights sit partly in the program (constant-folded), so the program and base files count together
    assert size(q, "model.pte", "base.ptd") < 0.5 * size(fp32.manifest, "model.pte", "base.ptd")
    assert size(q, "adapters.ptd") == size(fp32.manifest, "adapters.ptd")  # adapters stay fp32
    with pytest.raises(ExportError, match="add the pte format"):
        ExportOptions(formats=("onnx",), quantize="8da4w")
