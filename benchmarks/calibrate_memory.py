"""Measure peak RSS and step time of training on a real base model; fit the budget models of device_sdk/budget.py.

Each configuration runs in a fresh process (peak RSS is per process): load the model, inject 1 generalist and
E-1 specialists, run 4 expert steps and 1 router step at batch B x T, report VmHWM and the fastest of the last
three expert steps (step time depends on the machine and its load: calibrate on the device class you target). The
fitted coefficients are written to device_sdk/calibration/memory.json with the measurements and the worst fit
error.

    .venv/bin/python benchmarks/calibrate_memory.py [--model smollm2-135m] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "device_sdk" / "calibration" / "memory.json"

CHILD = r"""
import json, sys, time, torch
from device_sdk.budget import model_shape
from device_sdk.config import AdapterConfig, TrainConfig
from device_sdk.inject import inject_adapters
from device_sdk.memory import peak_rss_mb
from device_sdk.models import load_base_model
from device_sdk.train import expert_step, init_train_state, router_step
model_name, precision = sys.argv[1], sys.argv[5]
experts, batch, ctx = (int(a) for a in sys.argv[2:5])
base = load_base_model(model_name)
shape = model_shape(base.model)
model = inject_adapters(base.model, AdapterConfig(n_specialists=experts - 1))
cfg = TrainConfig(steps=4, batch_size=batch, context=ctx, precision=precision, device="cpu")  # CPU RSS
state = init_train_state(model, cfg)
g = torch.Generator().manual_seed(0)
times = []
for i in range(4):
    x = torch.randint(0, shape.vocab, (batch, ctx + 1), generator=g)
    start = time.perf_counter()
    expert_step(model, state, x[:, :-1], x[:, 1:], cfg)
    times.append(time.perf_counter() - start)
if experts > 1:
    router_step(model, state, x[:, :-1], x[:, 1:], cfg)
print(json.dumps({"peak_mb": peak_rss_mb(), "step_s": min(times[1:]), "shape": shape.__dict__}))
"""


def measure(model: str, experts: int, batch: int, ctx: int, precision: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, model, str(experts), str(batch), str(ctx), precision],
                          capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                          "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(points: list[dict], shape: dict) -> dict:
    """Least squares for runtime_mb, c_expert, c_token (see device_sdk/budget.py)."""
    from device_sdk.budget import MIB, ModelShape

    s = ModelShape(**{**shape, "mlp_in_out": tuple(tuple(x) for x in shape["mlp_in_out"])})
    base_mb = s.base_params * 4 / MIB
    rows, target = [], []
    for p in points:
        rows.append([1.0, p["experts"] * s.expert_params(8) * 16 / MIB, p["tokens"] * s.unit / MIB])
        target.append(p["peak_mb"] - base_mb)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(target), rcond=None)
    pred = np.array(rows) @ coef + base_mb
    errors = pred - np.array([p["peak_mb"] for p in points])
    for p, e in zip(points, errors):
        p["predicted_mb"] = float(p["peak_mb"] + e)
    return {"runtime_mb": float(coef[0]), "c_expert": float(coef[1]), "c_token": float(coef[2]),
            "max_abs_error_mb": float(np.abs(errors).max())}


def fit_time(points: list[dict]) -> dict:
    """Least squares for step seconds = s_step + tokens * (s_token + experts * s_expert_token)."""
    rows = np.array([[1.0, p["tokens"], p["tokens"] * p["experts"]] for p in points], dtype=float)
    target = np.array([p["step_s"] for p in points])
    coef, *_ = np.linalg.lstsq(rows, target, rcond=None)
    for p, t in zip(points, rows @ coef):
        p["predicted_step_s"] = float(t)
    return {"s_step": float(coef[0]), "s_token": float(coef[1]), "s_expert_token": float(coef[2])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--refit", action="store_true", help="refit the stored measurements, measure nothing")
    args = parser.parse_args()
    if args.refit:
        result = json.loads(CALIBRATION.read_text())
        for precision, points in result["points"].items():
            result["models"][precision].update({**fit(points, result["shape"]), **fit_time(points)})
            print(table(points, ["experts", "batch", "ctx", "peak_mb", "predicted_mb", "step_s", "predicted_step_s"]))
            print(precision, result["models"][precision])
        CALIBRATION.write_text(json.dumps(result, indent=1))
        return
    grids = {
        "bf16": [(e, b, t) for e in (1, 2, 4, 8) for b, t in ((2, 128), (8, 128), (16, 128))],
        "fp32": [(e, b, t) for e in (1, 2, 4) for b, t in ((4, 128), (8, 128))],
    }
    if args.quick:
        grids = {k: v[::2] for k, v in grids.items()}
    result = {"command": "python benchmarks/calibrate_memory.py", "base_model": args.model, "models": {},
              "points": {}}
    for precision, grid in grids.items():
        points = []
        for experts, batch, ctx in grid:
            m = measure(args.model, experts, batch, ctx, precision)
            points.append({"experts": experts, "batch": batch, "ctx": ctx, "tokens": batch * ctx,
                           "peak_mb": m["peak_mb"], "step_s": m["step_s"]})
            print(f"{precision} E={experts} {batch}x{ctx}: peak {m['peak_mb']:.0f} MiB, step {m['step_s']:.2f} s",
                  flush=True)
        coefficients = {**fit(points, m["shape"]), **fit_time(points)}
        result["models"][precision] = {**coefficients, "fitted_on": f"{args.model}, {len(points)} runs"}
        result["points"][precision] = points
        print(table(points, ["experts", "batch", "ctx", "peak_mb", "predicted_mb", "step_s", "predicted_step_s"]))
        print(f"{precision}: {coefficients}")
    result["base_params"] = m["shape"]["base_params"]
    result["shape"] = m["shape"]
    CALIBRATION.write_text(json.dumps(result, indent=1))
    print(f"wrote {CALIBRATION} and {write_json('calibrate_memory', result)}")


if __name__ == "__main__":
    main()
