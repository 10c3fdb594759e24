"""The train-local command, run as a user runs it (a real subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_sdk.adapters import read_adapter_file

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "device_sdk", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_local_writes_adapters_metrics_and_curves(tiny_user, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train-local", "--data", str(tiny_user), "--model", "tiny-llama", "--specialists", "2",
                   "--steps", "8", "--batch", "4", "--ctx", "32", "--router-period", "3", "--router-steps", "1",
                   "--precision", "fp32", "--eval-every", "4", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test perplexity" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter"]["n_specialists"] == 2
    assert metrics["test"]["after"]["perplexity"] < metrics["test"]["before"]["perplexity"]
    assert metrics["test"]["after"]["tokens"] == metrics["tokens"]["test"] - 1
    assert [r["step"] for r in metrics["train"]["valid_curve"]] == [4, 8]
    assert [r["step"] for r in metrics["train"]["router_curve"]] == [3, 6]
    assert metrics["train"]["tokens_per_second"] > 0 and metrics["peak_rss_mb"] > 0
    assert (out / "curves.png").stat().st_size > 1000
    _, meta = read_adapter_file(out / "adapters" / "specialist.safetensors")
    assert meta["n_specialists"] == "2"


def test_compile_trains_to_the_eager_numbers(tiny_user, tmp_path):
    after = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / f"run{len(flags)}"
        done = run_cli("train-local", "--data", str(tiny_user), "--model", "tiny-llama", "--specialists", "1",
                       "--steps", "4", "--batch", "2", "--ctx", "16", "--router-period", "2", "--router-steps", "1",
                       "--precision", "fp32", "--out", str(out), *flags, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        after[bool(flags)] = json.loads((out / "metrics.json").read_text())["test"]["after"]["perplexity"]
    assert "2 decoder block(s) run through torch.compile" in done.stderr
    assert after[True] == pytest.approx(after[False], rel=1e-4)


def test_budget_chooses_the_specialist_count(tiny_user, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train-local", "--data", str(tiny_user), "--model", "tiny-gpt2", "--budget-mb", "100000",
                   "--steps", "2", "--batch", "2", "--ctx", "16", "--precision", "fp32", "--out", str(out),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter"]["n_specialists"] >= 3
    assert metrics["budget"]["predicted_mb"] <= 100000


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/user", "--model", "tiny-llama"], "does not exist"),
    (["--model", "not/a-model-anywhere"], "neither a built-in name"),
    (["--model", "tiny-llama", "--rank", "0"], "rank must be a positive integer"),
    (["--model", "tiny-llama", "--budget-mb", "1"], "below the predicted"),
])
def test_bad_input_exits_with_a_clear_error(tiny_user, tmp_path, args, message):
    if "--data" not in args:
        args = ["--data", str(tiny_user), *args]
    done = run_cli("train-local", *args, "--steps", "1", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_an_out_with_an_earlier_run_is_refused_and_overwrite_replaces_it(tiny_user, tmp_path):
    out = tmp_path / "run"  # an earlier run with a specialist: its file must not survive next to a 0-specialist run
    (out / "adapters").mkdir(parents=True)
    (out / "adapters" / "specialist.safetensors").write_bytes(b"from the earlier run")
    (out / "run.json").write_text(json.dumps({"command": "train-local", "settings": {"specialists": 1}}))
    args = ["train-local", "--data", str(tiny_user), "--model", "tiny-llama", "--specialists", "0", "--steps", "1",
            "--batch", "2", "--ctx", "16", "--precision", "fp32", "--eval-tokens", "64", "--out", str(out)]
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2 and "already holds the output of an earlier train-local run" in done.stderr
    assert "--overwrite" in done.stderr and "test perplexity" not in done.stdout
    done = run_cli(*args, "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (out / "adapters" / "specialist.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["settings"]["specialists"] == 0
