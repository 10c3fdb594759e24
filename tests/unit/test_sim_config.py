"""Simulation settings: cache keys, low-data users (``train_tokens``) and their validation."""

from pathlib import Path

import numpy as np
import pytest

from device_sdk.data import UserData
from device_sdk.errors import ConfigError
from device_sdk.sim import SimConfig
from device_sdk.sim.config import cap_training


def _user(name: str, n: int) -> UserData:
    return UserData(name, np.arange(n), np.arange(50), np.arange(40))


def test_every_setting_that_changes_numbers_changes_the_cache_key_and_report_settings_do_not():
    base = dict(data=Path("/srv/data/split"), experts=(4, 2), precision="bf16")
    key = SimConfig(**base).run_key("comigs-1gxs", 2, ["a", "b"])
    changed = [dict(mixing="projection"), dict(lb_mode="count"), dict(betas=(0.9, 0.999)), dict(weight_decay=0.0),
               dict(schedule="one-cycle"), dict(train_prefix=4096), dict(valid_prefix=4096), dict(grad_clip=1.0),
               dict(compile=True)]
    keys = {SimConfig(**base, **c).run_key("comigs-1gxs", 2, ["a", "b"]) for c in changed}
    assert len(keys) == len(changed) and key not in keys
    same = [dict(via_server=True), dict(routing_layers=(1, 2)), dict(cache_dir=Path("/elsewhere")),
            dict(compile=False)]
    assert {SimConfig(**base, **c).run_key("comigs-1gxs", 2, ["a", "b"]) for c in same} == {key}


def test_capped_runs_get_their_own_cache_key():
    cfg = SimConfig(data=Path("/srv/data/split"), ctx=32)
    capped = SimConfig(data=Path("/srv/data/split"), ctx=32, train_tokens=(("a", 100),))
    other = SimConfig(data=Path("/srv/data/split"), ctx=32, train_tokens=(("a", 200),))
    keys = {c.run_key("local", 1, ["a", "b"]) for c in (cfg, capped, other)}
    assert len(keys) == 3


def test_cap_training_cuts_only_the_named_users_training_stream():
    users = [_user("a", 1000), _user("b", 1000)]
    capped = cap_training(users, (("b", 300),))
    assert np.array_equal(capped[0].train, users[0].train) and np.array_equal(capped[0].valid, users[0].valid)
    assert np.array_equal(capped[1].train, np.arange(300))  # the first tokens, in order
    assert np.array_equal(capped[1].valid, users[1].valid) and np.array_equal(capped[1].test, users[1].test)
    assert len(users[1].train) == 1000  # the caller's data is not modified


def test_prefixes_cut_every_users_training_and_validation_and_named_caps_cut_further():
    users = [_user("a", 1000), _user("b", 1000)]
    capped = cap_training(users, (("b", 300),), train_prefix=500, valid_prefix=20)
    assert [len(u.train) for u in capped] == [500, 300]
    assert all(np.array_equal(u.valid, np.arange(20)) for u in capped)
    assert all(np.array_equal(u.test, np.arange(40)) for u in capped)  # test is never cut
    with pytest.raises(ConfigError, match="train_prefix must leave at least one window"):
        SimConfig(data=Path("/srv/data/split"), ctx=128, train_prefix=100)


def test_cap_training_names_unknown_users_and_the_real_ones():
    with pytest.raises(ConfigError, match=r"\['zz'\].*\['a', 'b'\]"):
        cap_training([_user("a", 10), _user("b", 10)], (("zz", 5),))


def test_auto_precision_is_resolved_before_it_reaches_the_cache_key(monkeypatch):
    from device_sdk import precision

    keys = {}
    for native in (True, False):
        monkeypatch.setattr(precision, "native_bf16", lambda native=native: native)
        cfg = SimConfig(data=Path("/srv/data/split"))
        assert cfg.precision == ("bf16" if native else "fp32")
        keys[native] = cfg.run_key("local", 1, ["a"])
    assert keys[True] == SimConfig(data=Path("/srv/data/split"), precision="bf16").run_key("local", 1, ["a"])
    assert keys[False] == SimConfig(data=Path("/srv/data/split"), precision="fp32").run_key("local", 1, ["a"])


def test_train_tokens_below_one_window_or_named_twice_are_refused_together():
    with pytest.raises(ConfigError) as err:
        SimConfig(data=Path("d"), ctx=128, train_tokens=(("a", 100), ("a", 500)))
    assert "names a user twice" in str(err.value) and "a=100" in str(err.value) and "ctx+1 = 129" in str(err.value)


def test_the_device_enters_the_cache_key_only_off_the_cpu(monkeypatch):
    base = dict(data=Path("/srv/data/split"), experts=(4, 2), precision="bf16")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cpu = SimConfig(**base).run_key("comigs-1gxs", 2, ["a", "b"])
    assert SimConfig(**base, device="cpu").run_key("comigs-1gxs", 2, ["a", "b"]) == cpu  # auto -> cpu here
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    gpu = {SimConfig(**base, device=d).run_key("comigs-1gxs", 2, ["a", "b"]) for d in ("auto", "cuda", "cuda:1")}
    assert len(gpu) == 1 and cpu not in gpu  # GPU kernels change the numbers; the GPU's index does not
    assert SimConfig(**base, device="cpu").run_key("comigs-1gxs", 2, ["a", "b"]) == cpu


def test_compile_reaches_every_members_training_settings_and_is_checked():
    from device_sdk.strategies import make_strategy

    for compile_ in (False, True):
        cfg = SimConfig(data=Path("/srv/data/split"), compile=compile_)
        assert cfg.train_config(make_strategy("comigs-1g1s"), member=1, seed=2).compile is compile_
    with pytest.raises(ConfigError, match="compile must be True or False"):
        SimConfig(data=Path("/srv/data/split"), compile="yes")
