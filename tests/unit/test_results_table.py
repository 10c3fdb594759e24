"""The results-table lanes (benchmarks/results_table.py): every command is a valid simulation, one folder holds one
set of settings, and committed records seed the cache without overwriting anything."""

from pathlib import Path

import pytest

from benchmarks import results_table
from device_sdk.__main__ import build_parser, sim_config


def _config(folder: str, args: list[str]):
    parsed = build_parser().parse_args(results_table.command(Path("/cache"), folder, args)[3:])
    assert parsed.out == Path("/cache") / folder
    return sim_config(parsed)


def test_every_lane_command_is_a_valid_scaled_bf16_simulation():
    lanes = results_table.lanes()
    assert set(lanes) == {"multilingual", "topic", "topic-ood"}
    for steps in lanes.values():
        for folder, args in steps:
            cfg = _config(folder, args)
            assert cfg.precision == "bf16" and cfg.train_prefix == 16384  # the scaled preset
            assert cfg.seeds == ((1, 2) if cfg.strategies == tuple(results_table.CORE.split(",")) else (1,))
            cfg.experts_for(4)  # every experts list fits the four users
    ood = _config(*lanes["topic-ood"][0])
    assert ood.ood and ood.seeds == (1, 2)


def test_one_folder_holds_one_set_of_settings_and_the_table5_runs_get_their_own_keys():
    folders = results_table.folders()  # raises if two steps put different settings into one folder
    assert set(folders["scaled-multilingual"][1]) >= {"comigs-1g1s", "comigs-tr", "pcl", "centralized"}
    keys = set()
    for folder, (settings, strategies, _) in folders.items():
        cfg = _config(folder, settings + ["--strategies", ",".join(strategies)])
        keys |= {cfg.run_key(s, 1, ["a", "b", "c", "d"]) for s in strategies}
    n_runs = sum(len(strategies) for _, strategies, _ in folders.values())
    assert len(keys) == n_runs  # no two folders' runs share a cache key (e.g. 1GXS with and without --lb-mode)


def test_seeding_the_cache_copies_committed_records_and_never_overwrites(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    (docs / "topic" / "runs").mkdir(parents=True)
    (docs / "topic" / "runs" / "local-seed1-abc.json").write_text('{"committed": true}')
    (docs / "topic" / "runs" / "fedavg-seed1-def.json").write_text('{"committed": true}')
    monkeypatch.setattr(results_table, "DOCS", docs)
    root = tmp_path / "cache"
    (root / "scaled-topic" / "runs").mkdir(parents=True)
    (root / "scaled-topic" / "runs" / "fedavg-seed1-def.json").write_text('{"newer": true}')
    assert results_table.seed_cache(root) == 1
    assert (root / "scaled-topic" / "runs" / "local-seed1-abc.json").read_text() == '{"committed": true}'
    assert (root / "scaled-topic" / "runs" / "fedavg-seed1-def.json").read_text() == '{"newer": true}'
    assert results_table.seed_cache(root) == 0


def test_the_script_says_what_to_do(capsys):
    with pytest.raises(SystemExit):
        results_table.main([])
    assert "nothing to do" in capsys.readouterr().err
    assert results_table.main(["--list"]) == 0
    assert "--strategies comigs-tr" in capsys.readouterr().out
