"""The paper's tables beside ours (benchmarks/paper_tables.py): each cell pairs the right runs, across folders where
a table compares settings, and says "queued" only for runs the lanes plan."""

import pytest

from benchmarks import paper_tables
from device_sdk.sim.report import paired_runs, write_results

USERS = ("de", "fr", "it", "nl")


def _run(strategy: str, seed: int, scale: float, experts=(2, 2, 2, 2)) -> dict:
    final = {u: (20.0 + 5 * i + seed / 10) * scale for i, u in enumerate(USERS)}
    return {"strategy": strategy, "seed": seed, "users": list(USERS), "experts": list(experts), "final": final,
            "mean": sum(final.values()) / len(final), "pretrained": {u: 60.0 for u in USERS},
            "test_ppl": {u: [60.0, final[u] * 0.9, final[u]] for u in USERS}, "trainable_params": {}}


def _report(docs, folder: str, runs: list[dict]) -> None:
    write_results(docs / folder, runs, folder, {})


def _row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_paired_runs_pairs_users_of_common_seeds_across_any_two_sets_of_runs():
    ref = [_run("comigs-1gxs", s, 1.0) for s in (1, 2)]
    diff = paired_runs([_run("comigs-1gxs", 1, 1.1)], ref)
    assert diff["n"] == 4 and diff["mean"] == pytest.approx(0.1) and diff["verdict"] == "worse"
    assert paired_runs([_run("x", 3, 1.1)], ref) is None  # no seed in common


def test_table4_pairs_against_1g1s_marks_queued_runs_and_leaves_unplanned_cells_empty(tmp_path):
    _report(tmp_path, "multilingual", [_run("comigs-1g1s", s, 1.0) for s in (1, 2)]
            + [_run("local", s, 1.2) for s in (1, 2)] + [_run("comigs-tr", 1, 1.05)])
    planned = {"multilingual": [("comigs-1g1s", 1), ("local", 1), ("comigs-tr", 1), ("pcl", 1)],
               "topic": [("local", 1)]}
    text = paper_tables.write_tables(tmp_path, planned).read_text()
    local = _row(text, "local")
    assert local[1].startswith("33.18 (0.08), n=2; +20.0% [") and local[1].endswith("worse")
    assert local[2] == "54.38 (0.32)" and local[3] == "queued" and local[5] == ""  # topic queued, OOD not planned
    assert ", n=1; +5.0% [" in _row(text, "comigs-tr")[1]
    assert _row(text, "pcl")[1] == "queued" and _row(text, "centralized")[1] == ""
    assert _row(text, "comigs-1g1s")[1].endswith("n=2")  # the reference has no difference to itself
    assert "(Table 1: 25.40)" in _row(text, "pfedmoe")[4]  # the paper's two values for one cell, flagged


def test_table5_pairs_each_load_balancing_run_with_the_default_of_its_models(tmp_path):
    hetero = (2, 2, 4, 4)
    _report(tmp_path, "multilingual", [_run("comigs-1g1s", s, 1.0) for s in (1, 2)])
    _report(tmp_path, "multilingual-lbnone", [_run("comigs-1g1s", 1, 1.02)])
    _report(tmp_path, "multilingual-hetero", [_run("comigs-1gxs", 1, 1.0, hetero), _run("hetlora-active", 1, 1.3)])
    _report(tmp_path, "multilingual-hetero-lbswitch", [_run("comigs-1gxs", 1, 0.97, hetero)])
    planned = {"multilingual-hetero-lbnone": [("comigs-1gxs", 1)]}
    text = paper_tables.write_tables(tmp_path, planned).read_text()
    homo = _row(text, "Multilingual (homo)")
    assert "+2.0% [" in homo[1] and homo[2] == "47.31 (0.15)"
    assert homo[3] == homo[5] and homo[3].endswith("n=1")  # uniform = eq. 5 with two experts: one run, seed 1
    het = _row(text, "Multilingual (hetero)")
    assert het[1] == "queued" and "-3.0% [" in het[3] and het[3].endswith("better") and het[5].endswith("n=1")
    assert _row(text, "SlimPajama (hetero)")[1] == ""  # nothing planned, nothing ran
    assert "+30.0% [" in _row(text, "hetlora-active")[1]  # Table 2: paired against 1GXS


def test_lowdata_lists_final_and_best_per_user_and_names_the_runs_still_queued(tmp_path):
    _report(tmp_path, "multilingual-lowdata", [_run("comigs-1gxs", 1, 1.0, (8, 8, 2, 2))])
    planned = {"multilingual-lowdata": [("comigs-1gxs", 1), ("local", 1)]}
    text = paper_tables.write_tables(tmp_path, planned).read_text()
    row = _row(text, "comigs-1gxs (8,8,2,2), seed 1")
    assert row[1] == "20.10 (18.09)" and row[-1] == "27.60"
    assert "Queued: local seed 1." in text
