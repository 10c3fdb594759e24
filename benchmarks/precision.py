"""bf16 autocast against fp32 on this CPU: a plain matmul and one SmolLM2-135M training step, side by side.

``precision="auto"`` (device_sdk/precision.py) trains in bf16 only where oneDNN reports native bf16; this benchmark
shows what the choice is worth on the machine at hand. Each variant is timed in turn (warm-up first, then the
median of ``--repeats``) in one process, so the ratio is what to read.

    .venv/bin/python benchmarks/precision.py [--batch 2] [--ctx 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import host, table, write_json  # noqa: E402


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _median_s(lambda: torch.mm(a, b), repeats) / 1e9


def train_step_s(precision: str, batch: int, ctx: int, repeats: int) -> float:
    from device_sdk import AdapterConfig, inject_adapters, load_base_model
    from device_sdk.config import TrainConfig
    from device_sdk.train import expert_step, init_train_state

    model = inject_adapters(load_base_model("smollm2-135m").model, AdapterConfig(n_specialists=1))
    cfg = TrainConfig(steps=repeats + 1, batch_size=batch, context=ctx, precision=precision, device="cpu")
    state = init_train_state(model, cfg)
    xy = torch.randint(0, 49152, (batch, ctx + 1))
    return _median_s(lambda: expert_step(model, state, xy[:, :-1], xy[:, 1:], cfg), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--matmul", type=int, default=1024, help="square matmul size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from device_sdk.precision import native_bf16, resolve_precision

    rows = []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        print(f"timing {precision} ...", flush=True)
        rows.append({"precision": precision, "matmul GFLOPS": matmul_gflops(dtype, args.matmul, args.repeats),
                     "train step (s)": train_step_s(precision, args.batch, args.ctx, args.repeats)})
    fp32 = rows[0]
    for row in rows:
        row["step vs fp32"] = row["train step (s)"] / fp32["train step (s)"]
    info = host()
    print(f"\n{info['cpu']} ({info['isa']}), {info['cpus']} threads; native bf16: {native_bf16()}, "
          f"auto -> {resolve_precision('auto')}; SmolLM2-135M 1G1S expert step, batch {args.batch} x {args.ctx}\n")
    print(table(rows, ["precision", "matmul GFLOPS", "train step (s)", "step vs fp32"]))
    path = write_json("precision", {"args": vars(args), "native_bf16": native_bf16(),
                                    "auto": resolve_precision("auto"), "rows": rows})
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
