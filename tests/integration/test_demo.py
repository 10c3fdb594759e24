"""The README's main job (examples/federation_demo.py) end to end, with the tiny model so that it fits in CI."""

import json
import os
import subprocess
import sys

from .server import ROOT


def test_federation_demo_runs_four_devices_exports_one_and_compares_strategies(shared_data, tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "examples/federation_demo.py", "--data", str(shared_data / "multilingual"), "--model",
         "tiny-llama", "--rounds", "2", "--local-steps", "2", "--batch", "2", "--eval-tokens", "256", "--out",
         str(out), "--export", "nl", "--compare", f"--preset demo --out {tmp_path / 'compare'} --model tiny-llama "
         "--precision fp32 --rounds 1 --local-steps 1 --batch 2 --ctx 32 --eval-tokens 128 --peer-eval-tokens 64"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "DEVICE_SDK_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["perplexity"]) == ["de", "fr", "it", "nl"]
    assert all(sorted(map(int, v)) == [0, 1, 2] for v in results["perplexity"].values())
    assert [r["status"] for r in results["rounds"]][:2] == ["closed", "closed"]
    assert "| de | 4 |" in done.stdout and "| nl | 1 |" in done.stdout
    assert "model.pte: max |logit diff|" in done.stdout and "model.onnx: max |logit diff|" in done.stdout
    assert "== part 1 of 3" in done.stdout and "== part 2 of 3" in done.stdout and "== part 3 of 3" in done.stdout
    assert "[export pte] lowering to ExecuTorch" in done.stdout  # progress of the long silent step, as it runs
    assert "| comigs-1g1s |" in done.stdout and (tmp_path / "compare" / "routing.html").is_file()
    for folder, model in (("export-nl", "model.pte"), ("export-nl-onnx", "model.onnx")):  # exported side by side
        manifest = json.loads((out / folder / "manifest.json").read_text())
        assert manifest["round"] == 2 and list(manifest["verification"]) == [model]
        assert manifest["verification"][model]["passed"]
