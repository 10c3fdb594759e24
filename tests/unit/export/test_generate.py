"""The generation API (export/generate.py): sampling rules, stop conditions, the chat template, and generation over
quantised KV-cache files (8da4w ExecuTorch, int4 ONNX; one export each for the module) that hold perplexity within
5%, driven by the phone stand-in (examples/phone_inference.py). (fp32 greedy = Hugging Face generate:
test_kv_export.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from export.errors import ExportError
from export.generate import ExportTokenizer, Generator, SamplingConfig, next_token, open_export
from export.kv_export import EagerKV
from export.pipeline import ExportOptions, export_checkpoint

from ...conftest import make_model
from .conftest import personalised_run, phone
from .test_kv_export import export_model

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat_template.jinja
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_greedy_takes_the_argmax_and_top_p_cuts_the_tail():
    logits = torch.tensor([0.0, 2.0, 1.5, -1.0]).log_softmax(-1)
    assert next_token(logits, SamplingConfig()) == 1
    probs = logits.softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([next_token(logits, SamplingConfig(temperature=1.0), g) for _ in range(3000)])
    freq = torch.bincount(draws, minlength=4) / len(draws)
    assert (freq - probs).abs().max() < 0.03  # 3000 draws: standard error <= 0.009
    # top-p 0.8: the two likeliest tokens hold 0.90 of the mass, so only they remain
    draws = {next_token(logits, SamplingConfig(temperature=1.0, top_p=0.8), g) for _ in range(500)}
    assert draws == {1, 2}
    assert {next_token(logits, SamplingConfig(temperature=1.0, top_p=1e-6), g) for _ in range(50)} == {1}


def test_invalid_sampling_configs_report_every_problem():
    with pytest.raises(ExportError, match="max_new_tokens must be >= 1.*temperature must be >= 0.*top_p must be"):
        SamplingConfig(max_new_tokens=0, temperature=-1.0, top_p=0.0)


@pytest.fixture(scope="module")
def eager_generator():
    model = export_model(make_model("tiny-llama", n_specialists=2))
    return Generator(EagerKV(model, 24))


def test_generation_stops_at_a_stop_token_at_max_tokens_and_when_the_cache_is_full(eager_generator):
    gen = eager_generator
    first = gen.generate([1, 2, 3], SamplingConfig(max_new_tokens=10, stop_tokens=()))
    assert len(first) == 10 and gen.stats.stopped_by == "max_new_tokens"
    assert gen.stats.prompt_tokens == 3 and gen.stats.prefill_tokens_per_s > 0 and gen.stats.decode_tokens_per_s > 0
    stop = first[3]
    stopped = gen.generate([1, 2, 3], SamplingConfig(max_new_tokens=10, stop_tokens=(stop,)))
    assert stopped == first[: first.index(stop) + 1]
    assert gen.stats.stopped_by == "stop token"
    assert len(gen.generate(list(range(20)), SamplingConfig(max_new_tokens=10, stop_tokens=()))) == 5  # 20 + 4 = 24
    assert gen.stats.stopped_by == "cache full"
    with pytest.raises(ExportError, match="must have 1 to 23"):
        gen.generate(list(range(24)))
    sampled = gen.generate([1, 2, 3], SamplingConfig(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3,
                                                     stop_tokens=()))
    assert sampled == gen.generate([1, 2, 3], SamplingConfig(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3,
                                                             stop_tokens=()))


def test_the_chat_template_of_an_export_folder_renders_chatml(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello there, how are you?", "system user assistant"], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)
    tokens = ExportTokenizer(tmp_path)
    assert tokens.eos_token_id == 2
    ids = tokens.chat([{"role": "user", "content": "Hello there"}])
    assert tokens.decode(ids) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                  "Hugging Face<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert ids[0] == 1 and ids.count(2) == 2  # the special tokens are single ids


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    """A tiny personalised Llama exported with a KV cache as an 8da4w program and an int4 ONNX model."""
    root = tmp_path_factory.mktemp("kvq")
    run, model = personalised_run("tiny-llama", root / "run")
    pte = export_checkpoint(run, root / "pte", ExportOptions(formats=("pte",), quantize="8da4w", max_seq=64,
                                                             kv_cache=True))
    onnx = export_checkpoint(run, root / "onnx", ExportOptions(formats=("onnx",), quantize="int4", max_seq=64,
                                                               kv_cache=True))
    return root, export_model(model), pte, onnx


def test_quantised_kv_files_hold_perplexity_and_generate(quantised):
    root, _, pte, onnx = quantised
    for manifest, name in ((pte, "model.pte"), (onnx, "model.int4.onnx")):
        check = manifest["verification"][name]
        assert check["passed"] and check["ppl_rel_diff"] < 0.05 and check["seq_lens"] == [16, 64]
    # a quantised file's perplexity is judged on 4x the windows of an fp32 file's parity check (672 tokens)
    assert onnx["verification"]["model.int4.onnx"]["tokens"] == 4 * onnx["verification"]["model.onnx"]["tokens"] == 672
    for folder, runtime, file in ((root / "pte", "pte", "model.onnx"), (root / "onnx", "onnx", "model.int4.onnx")):
        gen = open_export(folder, runtime, file)
        new = gen.generate(gen.tokens.encode("The train"), SamplingConfig(max_new_tokens=12, stop_tokens=()))
        assert len(new) == 12 and all(0 <= t < 257 for t in new)
    out = phone(root / "pte", "--runtime", "pte")
    assert "[pte]" in out and "prefill" in out and "decode" in out


def test_open_export_refuses_a_folder_without_kv_programs(tmp_path):
    with pytest.raises(ExportError, match="no manifest.json"):
        open_export(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"export": {"kv_cache": False, "max_seq": 64}}))
    with pytest.raises(ExportError, match="export with --kv-cache"):
        open_export(tmp_path)
