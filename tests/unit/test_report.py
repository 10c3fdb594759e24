"""The comparison's statistics: paired differences against CoMiGS-1G1S with 95% intervals, std only over seeds."""

import math

import pytest

from device_sdk.sim.report import markdown, mean_interval, paired_difference, summarize, t975


def _run(strategy: str, seed: int, ppl: dict[str, float]) -> dict:
    return {"strategy": strategy, "seed": seed, "users": list(ppl), "final": ppl, "mean": sum(ppl.values()) / len(ppl),
            "pretrained": {u: 50.0 for u in ppl}, "trainable_params": {u: 4_000_000 for u in ppl}}


def test_t_interval_matches_the_textbook_values():
    assert t975(1) == pytest.approx(12.706) and t975(7) == pytest.approx(2.365) and t975(500) == 1.96
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182 * math.sqrt(5 / 3) / 2
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert mean_interval([1.0]) is None


def test_a_consistent_gap_is_called_and_a_noisy_one_is_not():
    ref = [_run("comigs-1g1s", s, {"a": 20.0, "b": 30.0, "c": 10.0, "d": 40.0}) for s in (1, 2)]
    worse = [_run("fedavg", s, {"a": 22.0 + s / 10, "b": 33.0, "c": 11.1, "d": 44.0}) for s in (1, 2)]
    noisy = [_run("local", s, {"a": 19.0, "b": 31.0, "c": 10.4, "d": 39.0 + s}) for s in (1, 2)]
    diff = paired_difference(ref + worse, "fedavg")
    assert diff["n"] == 8 and diff["verdict"] == "worse" and 0.09 < diff["mean"] < 0.12 and diff["low"] > 0
    assert paired_difference(ref + noisy, "local")["verdict"] == "inside noise"
    assert paired_difference(ref[:1] + worse[:1], "fedavg")["n"] == 4  # one seed: users are the pairs
    assert paired_difference(ref[:1], "fedavg") is None  # nothing to pair


def test_std_over_one_seed_is_not_reported_and_no_winner_is_bolded():
    records = [_run("comigs-1g1s", 1, {"a": 20.0, "b": 30.0}), _run("local", 1, {"a": 20.1, "b": 29.0}),
               _run("local", 2, {"a": 20.3, "b": 29.5})]
    summary = summarize(records)
    assert summary["comigs-1g1s"]["std"] is None and summary["local"]["std"] is not None
    text = markdown(summary, records, "t", {})
    assert "| comigs-1g1s | 25.00 | 1 | 4.00M |" in text  # no "(0.00)" pseudo-std for a single seed
    assert "**" not in text


def test_the_report_command_explains_itself_and_names_a_missing_file(capsys, tmp_path):
    from device_sdk.sim.report import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "results.json" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main([str(tmp_path / "nope.json")])
    assert done.value.code == 2 and "no such file" in capsys.readouterr().err


def test_a_parameter_count_from_any_seed_fills_the_column():
    old = _run("local", 1, {"a": 20.0})
    del old["trainable_params"]  # a record made before parameters were counted
    assert summarize([old, _run("local", 2, {"a": 21.0})])["local"]["params"] == 4_000_000
    assert summarize([old])["local"]["params"] is None


def test_heterogeneous_runs_are_paired_against_1gxs_and_runs_without_a_reference_against_nothing():
    from device_sdk.sim.report import combined_markdown

    users = {"a": 20.0, "b": 30.0, "c": 10.0, "d": 40.0}
    gxs = _run("comigs-1gxs", 1, users)
    het = _run("hetlora-active", 1, {u: p * 1.2 + (u == "a") for u, p in users.items()})
    summary = summarize([gxs, het])
    assert summary["comigs-1gxs"]["vs_reference"] is None
    assert summary["hetlora-active"]["vs_reference"]["verdict"] == "worse"
    assert "vs comigs-1gxs:" in markdown(summary, [gxs, het], "t", {})
    # with 1G1S present it stays the reference, even next to 1GXS
    g1s = _run("comigs-1g1s", 1, {u: p * 0.5 for u, p in users.items()})
    assert summarize([gxs, het, g1s])["comigs-1gxs"]["vs_reference"]["verdict"] == "worse"
    alone = summarize([het])
    assert alone["hetlora-active"]["vs_reference"] is None
    combined = combined_markdown([{"title": "het", "summary": summary, "runs": [gxs, het]},
                                  {"title": "alone", "summary": alone, "runs": [het]}])
    assert combined.splitlines()[-1] == "| *paired against* | comigs-1gxs |  |"


def test_the_paired_plot_draws_every_column_with_a_reference_and_nothing_without_one(tmp_path, capsys):
    import json

    from device_sdk.sim.figures import plot_paired
    from device_sdk.sim.report import main

    users = {"a": 20.0, "b": 30.0, "c": 10.0, "d": 40.0}
    runs = [_run("comigs-1g1s", 1, users), _run("local", 1, {u: p * 1.1 for u, p in users.items()})]
    with_ref = {"title": "t", "summary": summarize(runs), "runs": runs}
    alone = {"title": "u", "summary": summarize(runs[1:]), "runs": runs[1:]}
    assert plot_paired([alone], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    picture = plot_paired([with_ref, alone], tmp_path / "paired.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "r.json").write_text(json.dumps(with_ref))
    assert main([str(tmp_path / "r.json"), "--plot", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").is_file() and str(tmp_path / "cli.png") in capsys.readouterr().out
