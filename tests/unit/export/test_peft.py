"""PEFT LoRA adapters out (``python -m export --format peft``) and in (``init-federation --initial-adapter``).

Parity: a PEFT model with one exported adapter gives our model's logits with every token forced onto that expert
(:func:`device_sdk.inject.forced_expert`) within ``TOL`` (fp32, the same arithmetic: measured 0.0 here and on
SmolLM2-135M), for both families (Linear and GPT-2's Conv1D) and both mixing forms, with trained (random, non-zero)
B matrices.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from device_sdk.adapters import save_adapters
from device_sdk.device import initial_shared_tensors
from device_sdk.errors import ConfigError, InjectionError
from device_sdk.inject import forced_expert, routed_blocks
from device_sdk.models import load_base_model
from device_sdk.parts import SHARED_ROLES, role_state_dict
from device_sdk.peft_adapters import PeftAdapterError, load_peft_adapter, save_peft_adapter
from export.__main__ import main as export_main
from export.peft import export_peft

from ...conftest import make_model

peft = pytest.importorskip("peft")

#: Logit tolerance of PEFT vs our forced model (absolute and relative).
TOL = {"atol": 1e-5, "rtol": 1e-5}


def checkpoint(tmp_path, family: str, **adapter_kwargs):
    """A train-local style output folder holding a tiny model's adapters (random B: every expert matters)."""
    model = make_model(family, adapter_seed=3, **adapter_kwargs).eval()
    save_adapters(model, tmp_path / "run" / "adapters", family)
    return tmp_path / "run", model


def peft_model(family: str, folder, names):
    """A fresh base model with the exported adapters loaded by PEFT: the first from ``folder``, the others from
    its subfolders."""
    loaded = peft.PeftModel.from_pretrained(load_base_model(family).model, str(folder), adapter_name=names[0])
    for name in names[1:]:
        loaded.load_adapter(str(folder / name), adapter_name=name)
    return loaded.eval()


@pytest.mark.parametrize("mixing", ["mlp", "projection"])
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_each_adapter_equals_our_model_forced_onto_its_expert(tmp_path, family, mixing):
    run, model = checkpoint(tmp_path, family, n_specialists=2, mixing=mixing)
    index = export_peft(run, tmp_path / "out")
    names = ["generalist", "specialist-1", "specialist-2"]
    assert index["default"] == "generalist" and list(index["adapters"]) == names and index["verified"]
    assert [a["path"] for a in index["adapters"].values()] == [".", "specialist-1", "specialist-2"]
    assert all(r["passed"] and r["max_abs_logit_diff"] <= 1e-5 for r in index["verification"].values())

    loaded = peft_model(family, tmp_path / "out", names)
    x = torch.randint(0, 257, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(input_ids=x).logits
        outputs = []
        for expert, name in enumerate(names):
            loaded.set_adapter(name)
            theirs = loaded(input_ids=x).logits
            with forced_expert(model, expert):
                ours = model(input_ids=x).logits
            torch.testing.assert_close(theirs, ours, **TOL)
            outputs.append(theirs)
    # the check has teeth: the experts differ from each other and from the router's mixture
    assert all((o - mixed).abs().max() > 1e-2 for o in outputs)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2 and (outputs[1] - outputs[2]).abs().max() > 1e-2


def test_files_use_peft_key_names_and_the_rank_stabilised_scale(tmp_path):
    run, model = checkpoint(tmp_path, "tiny-llama", n_specialists=1, alpha=12.0)
    export_peft(run, tmp_path / "out", verify=False)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 8, 12.0, True)
    assert config["rank_pattern"] == {} and not config["fan_in_fan_out"]
    assert set(config["target_modules"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 7  # 2 layers, 7 projections, A and B
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(tensors[key], model.get_submodule("model.layers.0.self_attn.q_proj").lora.lora_A)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert torch.equal(tensors[key], model.get_submodule("model.layers.1.mlp.mlp.down_proj").experts[0].lora_B)
    specialist = load_file(str(tmp_path / "out" / "specialist-1" / "adapter_model.safetensors"))
    assert torch.equal(specialist[key], model.get_submodule("model.layers.1.mlp.mlp.down_proj").experts[1].lora_B)
    assert not list(tmp_path.glob("out/**/*.bin"))


def test_an_attention_rank_of_its_own_goes_into_rank_pattern(tmp_path):
    """A HetLoRA-shaped device: one MLP LoRA of rank 16 (no router), attention LoRA of rank 8."""
    run, model = checkpoint(tmp_path, "tiny-llama", rank=16, attention_rank=8, n_specialists=0)
    index = export_peft(run, tmp_path / "out")
    assert list(index["adapters"]) == ["generalist"] and index["verified"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["rank_pattern"] == {f"self_attn.{p}_proj": 8 for p in "qkvo"}
    loaded = peft_model("tiny-llama", tmp_path / "out", ["generalist"])
    x = torch.randint(0, 257, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, **TOL)


def test_command_line_writes_the_adapters(tmp_path, capsys):
    run, _ = checkpoint(tmp_path, "tiny-llama", n_specialists=1)
    assert export_main(["--checkpoint", str(run), "--format", "peft", "--out", str(tmp_path / "out")]) == 0
    assert "generalist: max |logit diff|" in capsys.readouterr().out
    assert (tmp_path / "out" / "specialist-1" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "experts.json").is_file()


def test_forced_expert_is_restored_and_checked():
    model = make_model("tiny-llama", n_specialists=1).eval()
    x = torch.randint(0, 257, (1, 9))
    with torch.no_grad():
        before = model(input_ids=x).logits
        with forced_expert(model, 1):
            assert all(b.forced_expert == 1 for b in routed_blocks(model))
            model(input_ids=x)
            assert torch.equal(routed_blocks(model)[0].gates[:, 1], torch.ones(9))
        assert all(b.forced_expert is None for b in routed_blocks(model))
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)
    with pytest.raises(InjectionError, match="expert 2 does not exist: this model has 2 expert"):
        with forced_expert(model, 2):
            pass
    for mixing in ("mlp", "projection"):  # sparse routing computes the same forced expert
        dense = make_model("tiny-llama", n_specialists=1, mixing=mixing, routing="dense").eval()
        sparse = make_model("tiny-llama", n_specialists=1, mixing=mixing, routing="sparse").eval()
        with torch.no_grad(), forced_expert(dense, 1), forced_expert(sparse, 1):
            torch.testing.assert_close(sparse(input_ids=x).logits, dense(input_ids=x).logits, **TOL)


# --- in: init-federation --initial-adapter ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,kwargs", [
    ("comigs-1gxs", {"n_specialists": 1}),
    ("hetlora-active", {"rank": 16, "attention_rank": 8, "n_specialists": 0}),  # global MLP rank 8 * 2, attention 8
])
def test_round_trip_generalist_to_peft_to_initial_global_tensors(tmp_path, strategy, kwargs):
    model = make_model("tiny-llama", adapter_seed=5, **kwargs)
    save_peft_adapter(model, tmp_path / "peft", "tiny-llama", expert=0)
    initial = initial_shared_tensors("tiny-llama", rank=8, alpha=16.0, seed=11, strategy=strategy,
                                     initial_adapter=tmp_path / "peft")
    original = role_state_dict(model, SHARED_ROLES)
    assert initial.keys() == original.keys()
    assert all(torch.equal(initial[k], original[k]) for k in original)


def test_a_mismatched_rank_is_refused_naming_the_layer(tmp_path):
    save_peft_adapter(make_model("tiny-llama", rank=4), tmp_path / "peft", "tiny-llama", expert=0)
    with pytest.raises(PeftAdapterError, match=r"rank mismatch at model\.layers\.0\.self_attn\.q_proj: the "
                                               r"adapter's LoRA has rank 4, the model's attention LoRA rank 8"):
        initial_shared_tensors("tiny-llama", rank=8, strategy="comigs-1gxs", initial_adapter=tmp_path / "peft")


def test_an_adapter_made_by_peft_with_a_plain_scale_is_converted(tmp_path):
    """PEFT's own adapter with lora_alpha / r (no rsLoRA) and alpha 32: B absorbs the scale ratio, and our model on
    its generalist computes what PEFT computes."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(load_base_model("tiny-llama").model,
                                 peft.LoraConfig(r=8, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path / "peft"))
    model = make_model("tiny-llama", n_specialists=1).eval()
    converted = load_peft_adapter(model, tmp_path / "peft")
    assert len(converted) == 2 * 7 and all(r == pytest.approx((32 / 8) / (16 / 8**0.5)) for r in converted.values())
    x = torch.randint(0, 257, (2, 13))
    with torch.no_grad(), forced_expert(model, 0):
        torch.testing.assert_close(model(input_ids=x).logits, theirs.eval()(input_ids=x).logits, **TOL)


def test_adapters_that_do_not_fit_are_refused_clearly(tmp_path):
    model = make_model("tiny-llama", n_specialists=1)
    partial = peft.get_peft_model(load_base_model("tiny-llama").model,
                                  peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj"]))
    partial.save_pretrained(str(tmp_path / "partial"))
    with pytest.raises(PeftAdapterError, match=r"does not target the model's LoRA layers .* no LoRA for 12 layer"):
        load_peft_adapter(model, tmp_path / "partial")

    save_peft_adapter(model, tmp_path / "wide", "tiny-llama", expert=0)
    weights = tmp_path / "wide" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    tensors[key] = torch.zeros(8, 96)  # an adapter for a base model with another width
    save_file(tensors, str(weights))
    before = role_state_dict(model, SHARED_ROLES)
    with pytest.raises(PeftAdapterError, match=r"base model shapes differ at model\.layers\.1\.mlp\.up_proj: the "
                                               r"adapter maps 96 -> 128 features, this base model's layer 64 -> 128"):
        load_peft_adapter(model, tmp_path / "wide")
    after = role_state_dict(model, SHARED_ROLES)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing copied

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(PeftAdapterError, match="only adapter_model.bin, a pickle, which is never loaded"):
        load_peft_adapter(model, tmp_path / "pickled")

    (tmp_path / "dora" / "adapter_config.json").parent.mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    save_file({}, str(tmp_path / "dora" / "adapter_model.safetensors"))
    with pytest.raises(PeftAdapterError, match=r"uses use_dora \(DoRA"):
        load_peft_adapter(model, tmp_path / "dora")


def test_a_strategy_without_a_shared_generalist_has_nothing_to_seed(tmp_path):
    with pytest.raises(ConfigError, match="'comigs-2s' shares no generalist expert"):
        initial_shared_tensors("tiny-llama", strategy="comigs-2s", initial_adapter=tmp_path)
