"""KV-cache programs (export/kv.py, export/kv_export.py) of a tiny personalised Llama: the eager cache forms equal the
full-sequence model in every mixing form; the fp32 ExecuTorch and ONNX files (one export for the module) match
PyTorch through prefill and decode, greedy generation equals Hugging Face ``generate`` with its cache token for
token, and a round replaces only ``adapters.ptd``. (8da4w and int4: test_generate.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from device_sdk.adapters import save_adapters
from device_sdk.inject import use_export_form
from export.errors import ExportError
from export.generate import Generator, SamplingConfig
from export.kv import FunctionalKVLM, KVCacheLM
from export.kv_export import EagerKV, OnnxKV, PteKV
from export.pipeline import ExportOptions, export_checkpoint, update_program_adapters

from ...conftest import make_model
from .conftest import personalised_run

MAX_SEQ = 48
ATOL = 1e-4  # fp32 logits of the exported files against PyTorch (measured: ~1e-6)


def export_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as ``load_personalized`` prepares it for export: the export form of the routed blocks."""
    return use_export_form(model).eval()


def run_sequence(runner, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of positions ``prefill - 1 .. T - 1`` of ``x`` (1, T): one prefill call, then one decode call each."""
    runner.reset()
    out = [runner(x[:, :prefill], 0)]
    out += [runner(x[:, i : i + 1], i) for i in range(prefill, x.shape[1])]
    return torch.stack(out)


@pytest.mark.parametrize("mixing", ["mlp", "projection"])
def test_eager_cache_forms_equal_the_full_sequence_model(mixing):
    model = export_model(make_model("tiny-llama", n_specialists=2, mixing=mixing))
    x = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        ref = model(input_ids=x).logits[0, 11:]  # (19, V)
        functional = FunctionalKVLM(model, 32)
        cache, out = functional.empty_cache(), []
        for start, stop in ((0, 12), *((i, i + 1) for i in range(12, 30))):
            logits, *cache = functional(x[:, start:stop], torch.tensor([start]), cache)
            out.append(logits[0, -1])
    torch.testing.assert_close(run_sequence(EagerKV(model, 32), x, 12), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(out), ref, atol=1e-5, rtol=1e-5)


def test_the_program_form_reads_only_the_filled_part_of_its_cache():
    """Attention of the ExecuTorch form runs over positions ``0 .. pos + T - 1`` only: cache positions past them
    may hold anything (here NaN; a masked product over the whole cache would turn it into NaN logits)."""
    model = export_model(make_model("tiny-llama", n_specialists=2))
    x = torch.randint(0, 257, (1, 20))
    with torch.no_grad():
        ref = model(input_ids=x).logits[0, 9:]
    eager = EagerKV(model, 32)
    for name, buf in eager.module.named_buffers():
        if "_cache_" in name:
            buf.fill_(float("nan"))
    out = [eager(x[:, :10], 0)] + [eager(x[:, i : i + 1], i) for i in range(10, 20)]  # no reset: NaNs stay
    torch.testing.assert_close(torch.stack(out), ref, atol=1e-5, rtol=1e-5)


def test_a_model_outside_the_llama_family_fails_clearly():
    with pytest.raises(ExportError, match="Llama family.*'gpt2'.*without --kv-cache"):
        KVCacheLM(make_model("tiny-gpt2"), 16)


@pytest.fixture(scope="module")
def kv_export(tmp_path_factory):
    """The fp32 KV-cache export (both formats, max_seq 48) of a tiny personalised Llama, made once."""
    root = tmp_path_factory.mktemp("kv")
    run, model = personalised_run("tiny-llama", root / "run")
    manifest = export_checkpoint(run, root / "out", ExportOptions(max_seq=MAX_SEQ, kv_cache=True))
    return root, export_model(model), manifest


def test_kv_files_match_pytorch_through_prefill_and_decode(kv_export):
    root, model, manifest = kv_export
    assert manifest["export"]["kv_cache"] and "input_pos" in manifest["export"]["inputs"]
    for name in ("model.pte", "model.onnx"):
        check = manifest["verification"][name]
        assert check["passed"] and check["seq_lens"] == [16, MAX_SEQ]
        assert check["greedy"] == {"prompts": 3, "new_tokens": 16, "equal": 3, "first_difference": None}
    out = root / "out"
    x = torch.randint(0, 257, (1, MAX_SEQ))
    with torch.no_grad():
        ref = model(input_ids=x).logits[0]
    for runner in (PteKV(out / "model.pte", MAX_SEQ), OnnxKV(out / "model.onnx")):
        torch.testing.assert_close(run_sequence(runner, x, 9), ref[8:], atol=ATOL, rtol=ATOL)
        # a second, shorter sequence reuses the cache (stale positions are masked): still exact
        torch.testing.assert_close(run_sequence(runner, x[:, :20], 20), ref[19:20], atol=ATOL, rtol=ATOL)
        with pytest.raises(ExportError, match="do not fit the cache of 48 positions"):
            runner(x[:, :2], MAX_SEQ - 1)


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Hugging Face ``generate`` (greedy, with its KV cache), never stopping early."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             use_cache=True, pad_token_id=256)
    return out[0, len(prompt):].tolist()


def test_greedy_generation_of_the_programs_equals_hugging_face_generate(kv_export):
    root, model, _ = kv_export
    prompts = [list(b"The train left"), list(b"Der Zug"), [5, 200, 17]]
    for prompt in prompts:
        expected = hf_greedy(model, prompt, 20)
        for runner in (PteKV(root / "out" / "model.pte", MAX_SEQ), OnnxKV(root / "out" / "model.onnx")):
            got = Generator(runner).generate(prompt, SamplingConfig(max_new_tokens=20, stop_tokens=()))
            assert got == expected, (type(runner).__name__, prompt)


def test_update_adapters_after_a_round_keeps_the_kv_program_and_base_file(kv_export, tmp_path):
    root, first, _ = kv_export
    phone = tmp_path / "phone"
    shutil.copytree(root / "out", phone)
    program, base = (phone / "model.pte").read_bytes(), (phone / "base.ptd").read_bytes()
    keys = json.loads((phone / "adapter_keys.json").read_text())
    assert len(set(keys.values())) == len(keys)
    newer = export_model(make_model("tiny-llama", adapter_seed=2, n_specialists=2))
    save_adapters(newer, tmp_path / "round2", "tiny-llama")
    update_program_adapters(phone, tmp_path / "round2")
    assert (phone / "model.pte").read_bytes() == program and (phone / "base.ptd").read_bytes() == base
    x = torch.randint(0, 257, (1, 24))
    with torch.no_grad():
        expected = newer(input_ids=x).logits[0, 9:]
        assert not torch.allclose(expected, first(input_ids=x).logits[0, 9:], atol=1e-3)
    torch.testing.assert_close(run_sequence(PteKV(phone / "model.pte", MAX_SEQ), x, 10), expected,
                               atol=ATOL, rtol=ATOL)


def test_a_missing_kv_file_fails_clearly(tmp_path):
    from export.kv_export import kv_runner

    with pytest.raises(ExportError, match="model.pte does not exist; give the model.pte or model.onnx"):
        kv_runner(tmp_path / "model.pte", 16)


def test_a_full_sequence_onnx_file_is_refused_as_kv_model(tmp_path):
    from export.load import LogitsModel
    from export.onnx import export_onnx

    export_onnx(LogitsModel(export_model(make_model("tiny-llama"))), tmp_path / "m.onnx", 16)
    with pytest.raises(ExportError, match="not a KV-cache model"):
        OnnxKV(tmp_path / "m.onnx")


@pytest.mark.slow
def test_real_smollm2_kv_form_generates_as_hugging_face():
    """The real base with a 3-expert personalisation: the cache form's greedy continuations of real prompts equal
    Hugging Face ``generate`` (the exported files are checked the same way by every ``--kv-cache`` export)."""
    from device_sdk.config import AdapterConfig
    from device_sdk.inject import inject_adapters
    from device_sdk.models import load_base_model
    from export.verify import SAMPLE_TEXT, greedy_parity

    base = load_base_model("smollm2-135m")
    torch.manual_seed(0)
    model = inject_adapters(base.model, AdapterConfig(n_specialists=2, top_k=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.01)
    model = export_model(model)
    prompts = [base.tokenizer.encode(line)[:12] for line in SAMPLE_TEXT.splitlines()[:3]]
    result = greedy_parity(model, EagerKV(model, 64), prompts, 24)
    assert result["equal"] == 3, result
