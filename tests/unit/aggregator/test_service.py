"""The federation's rules under hostile or unlucky input, on a real database file, without HTTP: the running mean,
replays and races, out-of-range numbers, failed rounds, secrets, the data directory lock, the schema migration."""

import json
import sqlite3
import threading

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from aggregator.aggregate import content_digest
from aggregator.errors import Conflict, DataDirLocked, InvalidUpdate, NotFound, RoundClosed, Unauthorized
from aggregator.schemas import Capabilities, CreateFederation, FederationConfig
from aggregator.service import Federation
from aggregator.settings import Settings
from aggregator.lock import DataDirLock
from aggregator.store import Store

SECRET = "enroll-secret-0123456789abcdef"


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A": torch.randn(8, 4, generator=g) * scale, "m.lora_B": torch.randn(3, 8, generator=g) * scale}


def _payload(t: dict, tokens: int | str = 10, metrics: dict | None = None) -> bytes:
    return st_save(t, metadata={"tokens": str(tokens), "metrics": json.dumps(metrics or {"loss": 1.0})})


def _federation(tmp_path, n: int = 3, **config) -> tuple[Federation, list]:
    fed = Federation(Store(tmp_path))
    fed.create(FederationConfig(base_model="m", strategy="fedavg", **config), SECRET)
    fed.set_initial(st_save({k: torch.zeros_like(v) for k, v in _tensors(0).items()}))
    devices = [fed.authenticate(fed.enroll(SECRET, f"d{i}", Capabilities(n_specialists=0, rank=8))[1])
               for i in range(n)]
    return fed, devices


def _reread_mean(fed: Federation, number: int) -> dict[str, torch.Tensor]:
    return fed._rebuild_mean(number, fed.config(), fed.store.updates(number)).mean.result()


def _blob_files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "blobs" / "updates").rglob("*") if p.is_file())


@pytest.mark.parametrize("rule", ["mean", "token_weighted"])
def test_the_running_mean_equals_the_mean_of_the_stored_uploads(tmp_path, rule):
    fed, devices = _federation(tmp_path, n=3, aggregation=rule)
    for device, seed, tokens in ((devices[2], 3, 30), (devices[0], 1, 10), (devices[1], 2, 20)):  # not in id order
        fed.upload(device, 1, _payload(_tensors(seed), tokens))
    expected = _reread_mean(fed, 1)
    assert fed.maybe_close() == 1
    summary = fed.store.round(1).summary
    assert summary["running_mean"] is True and summary["participants"] == [1, 2, 3]
    published = load_file(str(fed.store.global_blob(1)[0]))
    assert all(torch.equal(published[k], expected[k]) for k in expected)
    if rule == "token_weighted":
        manual = {k: (sum(w * _tensors(s)[k].double() for s, w in ((1, 10), (2, 20), (3, 30))) / 60).float()
                  for k in expected}
        assert all(torch.equal(published[k], manual[k]) for k in expected)


def test_a_replay_is_counted_once_even_reserialised_with_another_metadata_order(tmp_path):
    fed, devices = _federation(tmp_path, n=2)
    t = _tensors(1)
    first = st_save(t, metadata={"tokens": "10", "metrics": json.dumps({"loss": 1.0, "acc": 0.5})})
    again = st_save({k: v.clone() for k, v in reversed(t.items())},
                    metadata={"metrics": json.dumps({"acc": 0.5, "loss": 1.0}), "tokens": "10"})
    assert fed.upload(devices[0], 1, first) == (False, 1)
    assert fed.upload(devices[0], 1, again) == (True, 1)
    assert fed.upload(devices[0], 1, first) == (True, 1)
    assert fed._mean.mean.count == 1 and fed._mean.members == {1}
    with pytest.raises(Conflict, match="already uploaded different tensors or metadata"):
        fed.upload(devices[0], 1, _payload(t, tokens=11, metrics={"loss": 1.0, "acc": 0.5}))
    assert len(_blob_files(tmp_path)) == 1


def test_content_digest_ignores_serialisation_order_but_not_values():
    t = _tensors(0)
    digest = content_digest(t, {"a": "1", "b": "2"})
    assert content_digest(dict(reversed(t.items())), {"b": "2", "a": "1"}) == digest
    assert content_digest(t, {"a": "1", "b": "3"}) != digest
    changed = {k: v.clone() for k, v in t.items()}
    changed["m.lora_A"][0, 0] += 1e-6
    assert content_digest(changed, {"a": "1", "b": "2"}) != digest


def test_the_running_mean_is_rebuilt_from_the_stored_uploads_after_a_restart(tmp_path):
    fed, devices = _federation(tmp_path, n=3)
    fed.upload(devices[0], 1, _payload(_tensors(1)))
    fed.upload(devices[1], 1, _payload(_tensors(2)))
    fed.store.close()

    restarted = Federation(Store(tmp_path))
    restarted.recover()
    assert restarted._mean is None  # rebuilt lazily, by the next upload
    assert restarted.upload(devices[0], 1, _payload(_tensors(1))) == (True, 2)  # a replay after the restart
    restarted.upload(devices[2], 1, _payload(_tensors(3)))
    assert restarted._mean.members == {1, 2, 3} and restarted._mean.mean.count == 3
    expected = _reread_mean(restarted, 1)
    assert restarted.maybe_close() == 1
    assert restarted.store.round(1).summary["running_mean"] is True
    published = load_file(str(restarted.store.global_blob(1)[0]))
    assert all(torch.equal(published[k], expected[k]) for k in expected)


def test_a_running_mean_that_misses_an_upload_is_not_used(tmp_path):
    fed, devices = _federation(tmp_path, n=2)
    fed.upload(devices[0], 1, _payload(_tensors(1)))
    fed.upload(devices[1], 1, _payload(_tensors(2)))
    fed._mean.members.discard(2)  # as if adding device 2 had been lost
    expected = _reread_mean(fed, 1)
    fed.maybe_close()
    assert fed.store.round(1).summary["running_mean"] is False
    published = load_file(str(fed.store.global_blob(1)[0]))
    assert all(torch.equal(published[k], expected[k]) for k in expected)


def test_racing_uploads_of_one_device_store_one_upload_and_no_orphan_blob(tmp_path):
    fed, devices = _federation(tmp_path, n=3)
    barrier = threading.Barrier(2)
    results: dict[str, list] = {"same": [], "different": []}

    def send(kind: str, device, body: bytes) -> None:
        barrier.wait()
        try:
            results[kind].append(fed.upload(device, 1, body)[0])
        except Conflict:
            results[kind].append("conflict")

    for kind, device, bodies in (("same", devices[0], [_payload(_tensors(1))] * 2),
                                 ("different", devices[1], [_payload(_tensors(1)), _payload(_tensors(2))])):
        threads = [threading.Thread(target=send, args=(kind, device, b)) for b in bodies]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert sorted(results["same"], key=str) == [False, True]
    assert sorted(results["different"], key=str) == [False, "conflict"]
    assert len(_blob_files(tmp_path)) == 2 == fed.store.count_updates(1)
    assert fed._mean.mean.count == 2


@pytest.mark.parametrize("metadata,message", [
    ({"tokens": str(2**63)}, "'tokens' must be a decimal integer"),
    ({"tokens": "1" + "0" * 30}, "'tokens' must be a decimal integer"),
    ({"tokens": "-1"}, "'tokens' must be a decimal integer"),
    ({"tokens": "1e3"}, "'tokens' must be a decimal integer"),
    ({"tokens": "10", "metrics": '{"loss": NaN}'}, "finite numbers"),
    ({"tokens": "10", "metrics": '{"loss": 1e400}'}, "finite numbers"),
    ({"tokens": "10", "metrics": '{"loss": Infinity}'}, "finite numbers"),
    ({"tokens": "10", "metrics": json.dumps({"loss": 2**63})}, "magnitude at most"),
    ({"tokens": "10", "metrics": json.dumps({"loss": 10**400})}, "magnitude at most"),
    ({"tokens": "10", "metrics": "[1, 2]"}, "JSON object"),
    ({"tokens": "10", "metrics": "[" * 100_000}, "JSON object"),
    ({"tokens": "10", "metrics": json.dumps({f"m{i}": 1.0 for i in range(40)})}, "at most 32 metrics"),
])
def test_out_of_range_metadata_is_refused_and_changes_nothing(tmp_path, metadata, message):
    fed, devices = _federation(tmp_path, n=2)
    with pytest.raises(InvalidUpdate, match=message):
        fed.upload(devices[0], 1, st_save(_tensors(1), metadata=metadata))
    assert fed.store.count_updates(1) == 0 and _blob_files(tmp_path) == []


def test_uploads_must_carry_what_the_rule_needs_and_values_within_the_bound(tmp_path):
    fed, devices = _federation(tmp_path, n=2, aggregation="token_weighted", max_abs_value=100.0)
    with pytest.raises(InvalidUpdate, match="positive token count, got 0"):
        fed.upload(devices[0], 1, _payload(_tensors(1), tokens=0))
    with pytest.raises(InvalidUpdate, match="positive token count, got 0"):
        fed.upload(devices[0], 1, st_save(_tensors(1)))  # no metadata at all
    with pytest.raises(InvalidUpdate, match="exceeds the federation's bound max_abs_value=100"):
        fed.upload(devices[0], 1, _payload(_tensors(1, scale=1000.0)))
    assert fed.store.count_updates(1) == 0 and _blob_files(tmp_path) == []
    fed.upload(devices[0], 1, _payload(_tensors(1), tokens=5))


def test_flexlora_weighs_by_tokens_so_it_refuses_uploads_without_a_positive_count(tmp_path):
    fed = Federation(Store(tmp_path))
    fed.create(FederationConfig(base_model="m", strategy="flexlora-full"), SECRET)  # aggregation stays "mean"
    fed.set_initial(st_save({k: torch.zeros_like(v) for k, v in _tensors(0).items()}))
    device = fed.authenticate(fed.enroll(SECRET, "d", Capabilities(n_specialists=0, rank=8))[1])
    for body in (_payload(_tensors(1), tokens=0), st_save(_tensors(1))):
        with pytest.raises(InvalidUpdate, match="flexlora-full weighs uploads by their training tokens.*got 0"):
            fed.upload(device, 1, body)
    assert fed.store.count_updates(1) == 0 and _blob_files(tmp_path) == []
    assert fed.upload(device, 1, _payload(_tensors(1), tokens=5)) == (False, 1)


def test_participation_of_every_round_in_one_query_equals_each_rounds_uploads(tmp_path):
    fed, devices = _federation(tmp_path, n=3, min_devices=1)
    for number, uploaders in ((1, (devices[2], devices[0], devices[1])), (2, (devices[1],)), (3, ())):
        for i, device in enumerate(uploaders):
            fed.upload(device, number, _payload(_tensors(i), tokens=10 * (i + 1) + number))
        if uploaders:
            fed.store.mark_aggregating(number)
            fed.aggregate(number)
    expected = {r.round: ([u.device_id for u in fed.store.updates(r.round)],
                          sum(u.tokens for u in fed.store.updates(r.round))) for r in fed.store.rounds()}
    assert fed.store.participation() == {k: v for k, v in expected.items() if v[0]}
    assert fed.store.participation()[1] == ([1, 2, 3], 11 + 21 + 31)


def test_a_restart_removes_the_blobs_a_crash_left_without_rows_and_keeps_every_stored_upload(tmp_path):
    fed, devices = _federation(tmp_path, n=2)
    fed.upload(devices[0], 1, _payload(_tensors(1)))
    kept = fed.store.updates(1)[0].path
    orphan = fed.store.write_update_blob(1, devices[1].id, "f" * 64, _payload(_tensors(2)))  # then the crash
    torn = orphan.parent / ".d000002-x.safetensors.tmp"
    torn.write_bytes(b"half")
    fed.store.close()
    restarted = Federation(Store(tmp_path))
    restarted.recover()
    assert kept.is_file() and not orphan.exists() and not torn.exists()
    assert [u.path for u in restarted.store.updates(1)] == [kept]
    restarted.upload(devices[1], 1, _payload(_tensors(2)))  # the device's retry is accepted as new
    assert restarted.store.count_updates(1) == 2


def test_round_numbers_beyond_sqlite_integers_are_not_found(tmp_path):
    fed, devices = _federation(tmp_path, n=1)
    for number in (2**63, 2**70, -(2**64)):
        with pytest.raises(NotFound, match="does not exist"):
            fed.upload(devices[0], number, _payload(_tensors(1)))
        with pytest.raises(NotFound):
            fed.retry(number)
        assert fed.store.global_blob(number) is None and fed.store.updates(number) == []


def _hetlora(tmp_path, **config) -> tuple[Federation, list]:
    fed = Federation(Store(tmp_path))
    fed.create(FederationConfig(base_model="m", strategy="hetlora-full", min_devices=2, **config), SECRET)
    fed.set_initial(st_save({"m.lora_A": torch.zeros(16, 4), "m.lora_B": torch.zeros(3, 16)}))
    return fed, [fed.authenticate(fed.enroll(SECRET, f"d{i}", Capabilities(n_specialists=0, rank=16))[1])
                 for i in range(2)]


def test_a_non_finite_global_fails_the_round_visibly_and_the_admin_closes_it(tmp_path):
    fed, devices = _hetlora(tmp_path, max_abs_value=1e30)
    huge = {"m.lora_A": torch.full((16, 4), 1e20), "m.lora_B": torch.full((3, 16), 1e20)}  # finite, norms overflow
    for device in devices:
        fed.upload(device, 1, _payload(huge))
    assert fed.maybe_close() == 1
    failed = fed.store.round(1)
    assert failed.status == "failed" and "NaN or Inf" in failed.failure and failed.summary["participants"] == [1, 2]
    assert fed.store.global_blob(1) is None and fed.current().round == 1
    _, late = fed.enroll(SECRET, "late", Capabilities(n_specialists=0, rank=16))
    with pytest.raises(RoundClosed, match="failed to aggregate"):
        fed.upload(fed.authenticate(late), 1, _payload(huge))
    assert fed.maybe_close() is None  # the tick leaves a failed round alone

    fed.store.close()
    restarted = Federation(Store(tmp_path))
    restarted.recover()  # never raises; the round stays failed
    assert restarted.retry(1).status == "failed"  # a deterministic failure fails again
    with pytest.raises(NotFound, match="round 2 does not exist"):
        restarted.close_failed(2)
    nxt = restarted.close_failed(1)
    assert (nxt.round, nxt.status, nxt.base_version) == (2, "open", 0)  # the next round trains on global 0 again
    closed = restarted.store.round(1)
    assert closed.status == "failed" and closed.closed_at is not None and "closed by the admin" in closed.failure
    with pytest.raises(Conflict, match="closed by the admin"):
        restarted.retry(1)


def test_an_interrupted_aggregation_that_fails_on_restart_leaves_the_server_usable(tmp_path):
    fed, devices = _federation(tmp_path, n=2)
    for device, seed in zip(devices, (1, 2)):
        fed.upload(device, 1, _payload(_tensors(seed)))
    assert fed.store.mark_aggregating(1)  # the server dies here
    fed.store.close()
    (tmp_path / "blobs" / "globals" / "v000001.safetensors").mkdir()  # the global cannot be written

    restarted = Federation(Store(tmp_path))
    restarted.recover()
    assert restarted.store.round(1).status == "failed"
    assert "IsADirectoryError" in restarted.store.round(1).failure
    (tmp_path / "blobs" / "globals" / "v000001.safetensors").rmdir()
    after = restarted.retry(1)
    assert (after.round, after.status, after.base_version) == (2, "open", 1)
    assert restarted.store.round(1).status == "closed" and restarted.store.round(1).failure is None


def test_a_database_with_the_old_rounds_table_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "aggregator.db")
    db.executescript("""
        CREATE TABLE rounds (round INTEGER PRIMARY KEY,
            status TEXT NOT NULL CHECK (status IN ('open', 'aggregating', 'closed')), base_version INTEGER NOT NULL,
            opened_at REAL NOT NULL, deadline REAL NOT NULL, closed_at REAL, summary TEXT);
        INSERT INTO rounds VALUES (1, 'closed', 0, 1.0, 2.0, 3.0, '{"rule": "mean"}');
        INSERT INTO rounds VALUES (2, 'aggregating', 1, 3.0, 4.0, NULL, NULL);
    """)
    db.close()
    store = Store(tmp_path)
    assert [(r.round, r.status, r.summary) for r in store.rounds()] == [(1, "closed", {"rule": "mean"}),
                                                                        (2, "aggregating", None)]
    store.fail_round(2, "disk full", {})
    assert store.round(2).status == "failed" and store.round(2).failure == "disk full"
    store.close()
    assert Store(tmp_path).round(2).failure == "disk full"  # reopening does not migrate again


def test_a_database_whose_devices_cannot_be_retired_is_migrated_and_keeps_its_devices(tmp_path):
    from aggregator.store import token_hash

    db = sqlite3.connect(tmp_path / "aggregator.db")
    db.executescript("""
        CREATE TABLE devices (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
            token_hash TEXT NOT NULL UNIQUE, capabilities TEXT NOT NULL, enrolled_at REAL NOT NULL);
    """)
    db.execute("INSERT INTO devices (name, token_hash, capabilities, enrolled_at) VALUES ('old', ?, '{}', 1.0)",
               (token_hash("old-token"),))
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert store.device_for_token("old-token").name == "old" and store.count_devices() == 1
    assert store.retire_device(1).retired_at is not None
    assert store.device_for_token("old-token") is None and store.count_devices() == 0
    store.close()
    assert Store(tmp_path).devices()[0].retired_at is not None  # reopening does not migrate again


def test_a_retired_device_is_no_longer_waited_for_and_its_token_stops_working(tmp_path):
    fed, devices = _federation(tmp_path, n=3)
    fed.upload(devices[0], 1, _payload(_tensors(1)))
    fed.upload(devices[1], 1, _payload(_tensors(2)))
    assert fed.maybe_close() is None  # waits for the third device until the deadline
    retired = fed.retire(devices[2].id)
    assert retired.retired_at is not None and fed.retire(devices[2].id).retired_at == retired.retired_at
    assert fed.store.round(1).status == "closed" and fed.expected_devices() == 2  # retiring closed the round
    with pytest.raises(NotFound, match="device 99 does not exist"):
        fed.retire(99)
    token = "retired-device-token-0123456789"
    fed.enroll(SECRET, "phone", Capabilities(n_specialists=0, rank=8), token)
    fed.retire(fed.authenticate(token).id)
    with pytest.raises(Unauthorized):
        fed.authenticate(token)
    with pytest.raises(Unauthorized, match=r"device \d+ \('phone'\) was retired by the admin; enroll again"):
        fed.authenticate(token)
    with pytest.raises(Conflict, match="which the admin retired") as refused:
        fed.enroll(SECRET, "phone", Capabilities(n_specialists=0, rank=8), token)
    assert refused.value.code == "device_retired"


def test_retiring_a_device_that_already_uploaded_does_not_close_the_round_early(tmp_path):
    fed, devices = _federation(tmp_path, n=3)
    fed.upload(devices[0], 1, _payload(_tensors(1)))
    fed.retire(devices[0].id)  # its upload stays in the round, but it no longer stands in for an active device
    fed.upload(devices[1], 1, _payload(_tensors(2)))
    assert fed.maybe_close() is None and fed.store.round(1).status == "open"  # waits for the third device
    assert fed.store.count_updates(1) == 2 and fed.store.count_updates(1, active_only=True) == 1
    fed.upload(devices[2], 1, _payload(_tensors(3)))
    assert fed.maybe_close() == 1 and fed.store.round(1).summary["participants"] == [1, 2, 3]


def test_short_secrets_are_refused_with_the_rule_and_how_to_make_one(tmp_path):
    with pytest.raises(ValueError, match="at least 22.*secrets.token_urlsafe"):
        Settings(admin_token="short-admin-token")
    assert Settings(admin_token="x" * 22).admin_token == "x" * 22
    with pytest.raises(ValueError, match="enroll_secret has 10 characters"):
        CreateFederation(config=FederationConfig(base_model="m"), enroll_secret="0123456789")
    fed = Federation(Store(tmp_path))
    with pytest.raises(InvalidUpdate, match="at least 22"):
        fed.create(FederationConfig(base_model="m"), "0123456789")
    assert fed.config() is None
    assert len(fed.create(FederationConfig(base_model="m"), None)) >= 22  # generated: 16 random bytes


def test_one_server_per_data_directory(tmp_path):
    first = DataDirLock(tmp_path)
    with pytest.raises(DataDirLocked, match=str(tmp_path.resolve())):
        DataDirLock(tmp_path)
    first.release()
    DataDirLock(tmp_path).release()  # free again once the holder let go
