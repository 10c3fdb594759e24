"""The results-table lanes (benchmarks/results_table.py): every command is a valid simulation, one folder holds one
set of settings, and committed records seed the cache without overwriting anything."""

from pathlib import Path

import pytest

from benchmarks import results_table
from device_sdk.__main__ import build_parser, sim_config


def _config(step: results_table.Step):
    parsed = build_parser().parse_args(results_table.command(Path("/cache"), step.folder, step.arguments())[3:])
    assert parsed.out == Path("/cache") / step.folder
    return sim_config(parsed)


def test_every_lane_command_is_a_valid_scaled_bf16_simulation():
    lanes = results_table.lanes()
    assert set(lanes) == {"multilingual", "topic", "topic-ood"}
    for steps in lanes.values():
        for step in steps:
            cfg = _config(step)
            assert cfg.precision == "bf16" and cfg.train_prefix == 16384  # the scaled preset
            core = cfg.strategies == tuple(results_table.CORE.split(","))
            assert cfg.seeds == ((1, 2) if core else (2,) if step is steps[-1] and not cfg.ood else (1,))
            cfg.experts_for(4)  # every experts list fits the four users
    ood = _config(lanes["topic-ood"][0])
    assert ood.ood and ood.seeds == (1, 2)


def test_one_folder_holds_one_set_of_settings_and_the_table5_runs_get_their_own_keys():
    folders = results_table.folders()  # raises if two steps put different settings into one folder
    planned = folders["scaled-multilingual"][1]
    assert {("comigs-1g1s", 2), ("comigs-tr", 1), ("pcl", 1)} <= set(planned) and ("pcl", 2) not in planned
    keys = set()
    for folder, (settings, runs) in folders.items():
        strategies = list(dict.fromkeys(s for s, _ in runs))
        cfg = _config(results_table.Step(folder, settings, ",".join(strategies)))
        keys |= {cfg.run_key(s, 1, ["a", "b", "c", "d"]) for s in strategies}
    n_runs = sum(len({s for s, _ in runs}) for _, runs in folders.values())
    assert len(keys) == n_runs  # no two folders' runs share a cache key (e.g. 1GXS with and without --lb-mode)


def test_no_run_is_in_two_lanes_and_every_table5_and_low_data_run_is_in_one():
    where: dict[tuple[str, str, str], str] = {}
    for lane, steps in results_table.lanes().items():
        for step in steps:
            for seed in step.seeds.split(","):
                for strategy in step.strategies.split(","):
                    run = (step.folder, strategy, seed)
                    assert run not in where, f"{run} is in lanes {where[run]} and {lane}: two processes would race"
                    where[run] = lane
    for split in results_table.HETERO:
        for folder in ("lbnone", "hetero-lbnone", "hetero-lbswitch"):
            assert any(f == f"scaled-{split}-{folder}" for f, _, _ in where)
    assert {s for f, s, _ in where if f == "scaled-multilingual-lowdata"} == {"comigs-1gxs", "comigs-1g1s", "local"}


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


def _record(cfg, strategy: str, seed: int, ppl: float) -> tuple[str, dict]:
    users = ["a", "b"]
    record = {"strategy": strategy, "seed": seed, "users": users, "experts": [2, 2], "iterations": [0, 10],
              "test_ppl": {u: [50.0, ppl] for u in users}, "final": {u: ppl for u in users}, "mean": ppl,
              "pretrained": {u: 50.0 for u in users}, "train_loss": {u: [3.0] for u in users},
              "expert_scores": {u: [{"iteration": 0, "layers": []}] for u in users}, "routing": {},
              "strategy_state": {}, "seconds": 1.0, "via_server": False, "host": {}, "trainable_params": {}}
    return cfg.run_key(strategy, seed, users), record


def test_collect_copies_new_records_and_reports_only_the_runs_of_each_folders_settings(tmp_path, monkeypatch):
    import json

    data = tmp_path / "data" / "split"
    monkeypatch.setattr(results_table, "DOCS", tmp_path / "docs")
    step = results_table.Step("scaled-split", ("--data", str(data)), "local,comigs-1g1s", "1,2")
    monkeypatch.setattr(results_table, "lanes", lambda: {"split": [step]})
    cfg = _config(step)
    other = _config(results_table.Step("scaled-split", ("--data", str(data), "--rounds", "3"), "local"))
    runs = tmp_path / "cache" / "scaled-split" / "runs"
    runs.mkdir(parents=True)
    for c, strategy, seed, ppl in ((cfg, "local", 1, 30.0), (cfg, "comigs-1g1s", 1, 20.0), (other, "local", 1, 99.0)):
        key, record = _record(c, strategy, seed, ppl)
        (runs / f"{key}.json").write_text(json.dumps(record))
    committed = tmp_path / "docs" / "split" / "runs"
    committed.mkdir(parents=True)
    key, record = _record(cfg, "local", 2, 31.0)
    (committed / f"{key}.json").write_text(json.dumps(record))
    results_table.collect(tmp_path / "cache")
    assert len(list(committed.glob("*.json"))) == 4  # three new copies next to the committed one
    report = json.loads((tmp_path / "docs" / "split" / "results.json").read_text())
    assert sorted((r["strategy"], r["seed"]) for r in report["runs"]) == [("comigs-1g1s", 1), ("local", 1),
                                                                          ("local", 2)]  # not the 3-round run
    assert report["summary"]["local"]["vs_reference"]["n"] == 2
    assert report["settings"]["runs_missing"] == ["comigs-1g1s seed 2"]  # planned, not finished
    assert (tmp_path / "docs" / "split" / "paired.png").is_file()
    assert "## Table 4" in (tmp_path / "docs" / "tables.md").read_text()  # the side-by-side, rewritten


def test_lanes_import_the_pinned_table_code_not_the_working_tree(tmp_path):
    import subprocess
    import sys

    if subprocess.run(["git", "cat-file", "-e", results_table.TABLE_CODE], cwd=results_table.ROOT).returncode != 0:
        pytest.skip("a shallow clone without the table's commit")
    tree = results_table.code_tree(tmp_path)
    assert tree.name == f"code-{results_table.TABLE_CODE[:12]}"
    assert (tree / "device_sdk" / "sim" / "runner.py").is_file()
    assert results_table.code_tree(tmp_path) == tree and [p.name for p in tmp_path.iterdir()] == [tree.name]
    found = subprocess.run([sys.executable, "-P", "-c", "import device_sdk; print(device_sdk.__file__)"],
                           cwd=results_table.ROOT, env=results_table.lane_env(tmp_path), capture_output=True,
                           text=True, check=True).stdout.strip()
    assert found == str(tree / "device_sdk" / "__init__.py")  # not the repository root's, not the editable install's
