"""The README's main job (examples/federation_demo.py) end to end, with the tiny model so that it fits in CI."""

import json
import os
import subprocess
import sys

from .server import ROOT


def test_federation_demo_runs_four_devices_and_exports_one(shared_data, tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "examples/federation_demo.py", "--data", str(shared_data / "multilingual"), "--model",
         "tiny-llama", "--rounds", "2", "--local-steps", "2", "--batch", "2", "--eval-tokens", "256", "--out",
         str(out), "--export", "nl"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "DEVICE_SDK_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["perplexity"]) == ["de", "fr", "it", "nl"]
    assert all(sorted(map(int, v)) == [0, 1, 2] for v in results["perplexity"].values())
    assert [r["status"] for r in results["rounds"]][:2] == ["closed", "closed"]
    assert "| de | 4 |" in done.stdout and "| nl | 1 |" in done.stdout
    assert "model.pte: max |logit diff|" in done.stdout and "model.onnx: max |logit diff|" in done.stdout
    manifest = json.loads((out / "export-nl" / "manifest.json").read_text())
    assert manifest["round"] == 2 and all(v["passed"] for v in manifest["verification"].values())
