"""The store and the federation rules on a real database file, without HTTP."""

import json

import torch
from safetensors.torch import save as st_save

from aggregator.schemas import Capabilities, FederationConfig
from aggregator.service import Federation
from aggregator.store import Store


def _payload(value: float) -> bytes:
    return st_save({"w": torch.full((2, 2), value)}, metadata={"tokens": "10", "metrics": json.dumps({"loss": value})})


def test_an_interrupted_aggregation_is_redone_on_start(tmp_path):
    fed = Federation(Store(tmp_path))
    fed.create(FederationConfig(base_model="tiny-llama", min_devices=2), "secret-secret-0123456789ab")
    fed.set_initial(st_save({"w": torch.zeros(2, 2)}))
    devices = [fed.enroll("secret-secret-0123456789ab", f"d{i}", Capabilities(n_specialists=1, rank=8))
               for i in range(2)]
    for (device_id, token), value in zip(devices, (1.0, 3.0)):
        fed.upload(fed.authenticate(token), 1, _payload(value))
    assert fed.store.mark_aggregating(1)  # the server dies here, before the new global is stored
    fed.store.close()

    restarted = Federation(Store(tmp_path))
    assert restarted.store.round(1).status == "aggregating"
    restarted.recover()
    assert restarted.store.round(1).status == "closed"
    assert restarted.store.current_round().round == 2
    path, _ = restarted.store.global_blob(1)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["w"], torch.full((2, 2), 2.0))
    assert restarted.store.round(1).summary["mean_metrics"] == {"loss": 2.0}


def test_round_waits_for_min_devices_even_after_its_deadline(tmp_path):
    fed = Federation(Store(tmp_path))
    fed.create(FederationConfig(base_model="m", min_devices=2, round_deadline_s=0.01), "secret-secret-0123456789ab")
    fed.set_initial(st_save({"w": torch.zeros(2, 2)}))
    _, token = fed.enroll("secret-secret-0123456789ab", "d", Capabilities(n_specialists=0, rank=8))
    fed.upload(fed.authenticate(token), 1, _payload(1.0))
    assert fed.maybe_close(now=1e12) is None  # one report, two needed
    _, token2 = fed.enroll("secret-secret-0123456789ab", "d2", Capabilities(n_specialists=3, rank=8))
    fed.upload(fed.authenticate(token2), 1, _payload(5.0))
    assert fed.maybe_close() == 1


def test_a_federation_is_created_only_with_a_strategy_a_server_can_run(tmp_path):
    import pytest

    from aggregator.errors import InvalidUpdate

    fed = Federation(Store(tmp_path))
    with pytest.raises(InvalidUpdate, match="'local' shares nothing"):
        fed.create(FederationConfig(base_model="m", strategy="local"), "secret-secret-0123456789ab")
    with pytest.raises(InvalidUpdate, match="unknown strategy 'fedprox'"):
        fed.create(FederationConfig(base_model="m", strategy="fedprox"), "secret-secret-0123456789ab")
    with pytest.raises(InvalidUpdate, match="leave aggregation at 'mean'"):
        fed.create(FederationConfig(base_model="m", strategy="flexlora-full", aggregation="token_weighted"),
                   "secret-secret-0123456789ab")
    assert fed.config() is None  # nothing was stored


def test_hetlora_uploads_are_checked_against_the_global_shapes_cut_to_the_devices_rank(tmp_path):
    import pytest

    from aggregator.errors import InvalidUpdate

    fed = Federation(Store(tmp_path))
    fed.create(FederationConfig(base_model="m", strategy="hetlora-full", min_devices=2), "secret-secret-0123456789ab")
    fed.set_initial(st_save({"m.lora_A": torch.zeros(16, 4), "m.lora_B": torch.zeros(3, 16)}))
    _, small = fed.enroll("secret-secret-0123456789ab", "small", Capabilities(n_specialists=0, rank=8))
    _, large = fed.enroll("secret-secret-0123456789ab", "large", Capabilities(n_specialists=0, rank=16))
    with pytest.raises(InvalidUpdate, match=r"shape \[16, 4\], expected \[8, 4\]"):
        fed.upload(fed.authenticate(small), 1, st_save({"m.lora_A": torch.ones(16, 4), "m.lora_B": torch.ones(3, 16)}))
    fed.upload(fed.authenticate(small), 1, st_save({"m.lora_A": torch.ones(8, 4), "m.lora_B": torch.ones(3, 8)},
                                                   metadata={"tokens": "5"}))
    fed.upload(fed.authenticate(large), 1, st_save({"m.lora_A": torch.ones(16, 4), "m.lora_B": torch.ones(3, 16)},
                                                   metadata={"tokens": "5"}))
    assert fed.maybe_close() == 1
    from safetensors.torch import load_file

    merged = load_file(str(fed.store.global_blob(1)[0]))
    assert merged["m.lora_A"].shape == (16, 4)  # the largest rank; the small device keeps the first 8
    assert fed.store.round(1).summary["rule"] == "hetlora-full"


def test_a_device_with_another_lora_alpha_is_refused_before_enrolling(tmp_path):
    import pytest

    from aggregator.errors import InvalidUpdate

    fed = Federation(Store(tmp_path))
    fed.create(FederationConfig(base_model="m", alpha=16.0), "secret-secret-0123456789ab")
    with pytest.raises(InvalidUpdate, match="alpha 16.0, this device 8.0"):
        fed.enroll("secret-secret-0123456789ab", "d", Capabilities(n_specialists=1, rank=8, alpha=8.0))
    assert fed.store.devices() == []
    fed.enroll("secret-secret-0123456789ab", "d", Capabilities(n_specialists=1, rank=8, alpha=16.0))


def test_generated_secrets_never_start_with_a_dash(monkeypatch):
    """A secret like '-x...' breaks `join --enroll-secret S` (argparse reads it as an option); it happened in CI."""
    import aggregator.store as store

    drawn = iter(["-starts-with-dash", "fine-token"])
    monkeypatch.setattr(store.secrets, "token_urlsafe", lambda n: next(drawn))
    assert store.new_token(16) == "fine-token"
