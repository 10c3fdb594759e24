"""Role state dicts and adapter files."""

import pytest
import torch
from safetensors.torch import save_file

from device_sdk.adapters import FORMAT, load_adapters, read_adapter_file, save_adapters
from device_sdk.errors import AdapterFileError
from device_sdk.parts import SHARED_ROLES, Role, role_state_dict

from ..conftest import make_model


def test_role_state_dicts_round_trip_through_safetensors(tmp_path):
    source = make_model("tiny-gpt2", adapter_seed=1, n_specialists=2)
    written = save_adapters(source, tmp_path, "tiny-gpt2")
    assert sorted(p.name for p in written) == sorted(f"{r.value}.safetensors" for r in Role)
    target = make_model("tiny-gpt2", adapter_seed=2, n_specialists=2)
    x = torch.randint(0, 257, (2, 9))
    assert not torch.allclose(target(input_ids=x).logits, source(input_ids=x).logits)
    assert sorted(load_adapters(target, tmp_path, "tiny-gpt2")) == sorted(Role)
    for role in Role:
        a, b = role_state_dict(source, role), role_state_dict(target, role)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(target(input_ids=x).logits, source(input_ids=x).logits, rtol=0, atol=0)


def test_files_carry_metadata_and_one_role_each(tmp_path):
    model = make_model("tiny-llama", n_specialists=3)
    save_adapters(model, tmp_path, "tiny-llama")
    tensors, meta = read_adapter_file(tmp_path / "specialist.safetensors")
    assert meta["format"] == FORMAT and meta["role"] == "specialist" and meta["base_model"] == "tiny-llama"
    assert (meta["rank"], meta["alpha"], meta["n_generalists"], meta["n_specialists"]) == ("8", "16.0", "1", "3")
    assert all(".experts." in k for k in tensors)
    assert set(role_state_dict(model, Role.SPECIALIST)) == set(tensors)


def test_generalist_keys_are_the_same_for_devices_with_different_specialist_counts():
    a = role_state_dict(make_model("tiny-llama", n_specialists=1), SHARED_ROLES)
    b = role_state_dict(make_model("tiny-llama", n_specialists=4), SHARED_ROLES)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert SHARED_ROLES == {Role.ATTENTION, Role.GENERALIST}


def test_loading_into_a_mismatched_model_fails_and_changes_nothing(tmp_path):
    save_adapters(make_model("tiny-llama", seed=1, n_specialists=2), tmp_path, "tiny-llama")
    target = make_model("tiny-llama", seed=2, n_specialists=1)
    before = role_state_dict(target, set(Role))
    with pytest.raises(AdapterFileError, match="specialist.safetensors does not match"):
        load_adapters(target, tmp_path, "tiny-llama")
    after = role_state_dict(target, set(Role))
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(AdapterFileError, match="base_model is 'tiny-llama', model has 'tiny-gpt2'"):
        load_adapters(make_model("tiny-llama", n_specialists=2), tmp_path, "tiny-gpt2")
    rank4 = make_model("tiny-llama", n_specialists=2, rank=4)
    with pytest.raises(AdapterFileError, match="rank is '8', model has '4'"):
        load_adapters(rank4, tmp_path, "tiny-llama")


def test_non_finite_and_foreign_files_are_rejected(tmp_path):
    model = make_model("tiny-llama", n_specialists=1)
    save_adapters(model, tmp_path, "tiny-llama")
    tensors, meta = read_adapter_file(tmp_path / "router.safetensors")
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "router.safetensors"), metadata=meta)
    with pytest.raises(AdapterFileError, match="NaN or Inf"):
        load_adapters(model, tmp_path, "tiny-llama")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "router.safetensors"))
    with pytest.raises(AdapterFileError, match="not a device_sdk adapter file"):
        load_adapters(model, tmp_path, "tiny-llama")
    (tmp_path / "router.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_adapters(model, tmp_path, "tiny-llama")


def test_files_record_the_attention_rank_and_files_without_it_mean_the_expert_rank(tmp_path):
    from device_sdk.adapters import file_attention_rank

    source = make_model("tiny-llama", n_generalists=1, n_specialists=0, rank=32, attention_rank=8)
    save_adapters(source, tmp_path, "tiny-llama")
    _, meta = read_adapter_file(tmp_path / "attention.safetensors")
    assert (meta["rank"], meta["attention_rank"]) == ("32", "8") and file_attention_rank(meta) == 8
    assert load_adapters(make_model("tiny-llama", n_specialists=0, rank=32, attention_rank=8), tmp_path,
                         "tiny-llama") == [Role.ATTENTION, Role.GENERALIST]
    with pytest.raises(AdapterFileError, match="attention_rank is '8', model has '32'"):
        load_adapters(make_model("tiny-llama", n_specialists=0, rank=32), tmp_path, "tiny-llama")
    old = tmp_path / "old"  # written before attention_rank existed: the attention LoRA had the expert rank
    old.mkdir()
    save_adapters(make_model("tiny-llama", n_specialists=0), old, "tiny-llama")
    for path in old.glob("*.safetensors"):
        tensors, meta = read_adapter_file(path)
        save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if k != "attention_rank"})
    assert file_attention_rank(read_adapter_file(old / "attention.safetensors")[1]) == 8
    assert load_adapters(make_model("tiny-llama", n_specialists=0), old, "tiny-llama")
    with pytest.raises(AdapterFileError, match="attention_rank is '8', model has '4'"):
        load_adapters(make_model("tiny-llama", n_specialists=0, attention_rank=4), old, "tiny-llama")
