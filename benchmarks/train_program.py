"""The ExecuTorch training program against the PyTorch backend: one expert step (forward, backward, AdamW) of the
real SmolLM2 1G1S LoRA-MoE (attention LoRA + generalist + specialist, mlp form, dense top-2 routing).

Variants, measured alternately in one process (the starting variant rotates each round; times are medians):
  pytorch-fp32   eager autograd, fp32
  pytorch-bf16   eager autograd under CPU bf16 autocast (adapters fp32)
  executorch     the exported training program (XNNPACK, fp32): write adapters, forward_backward, AdamW in SDK code
for each batch shape (default 2x128 and 8x128). Peak memory: each variant in a fresh process of its own (load,
3 steps, kernel high-water mark); the ExecuTorch child holds only the program (no PyTorch model), as an edge app
does. Also reported: program and data file sizes and export time (goal: executorch step <= 1.5x pytorch-fp32).

    .venv/bin/python benchmarks/train_program.py [--shapes 2x128,8x128] [--rounds 4] [--threads 2]
        [--programs benchmarks/out/train-program]   (existing programs there are reused, not re-exported)

``--threads`` sets both PyTorch's intra-op threads and the ExecuTorch runtime's thread pool. On a machine with
other work on its cores, use 1: a PyTorch step with two OpenMP threads can wait many times its own length for a
descheduled thread (measured: 122 s for a 2 x 128 fp32 step), which no program would show on a quiet device.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import OUT, table, write_json  # noqa: E402
from device_sdk.backends.executorch import (  # noqa: E402
    META,
    PROGRAM,
    TRAINABLE_DATA,
    ProgramGradients,
    ProgramModel,
    TrainProgram,
    attach_program,
)
from device_sdk.config import AdapterConfig, TrainConfig  # noqa: E402
from device_sdk.inject import inject_adapters  # noqa: E402
from device_sdk.memory import peak_rss_mb  # noqa: E402
from device_sdk.models import load_base_model  # noqa: E402
from device_sdk.train import expert_step, init_train_state  # noqa: E402

VARIANTS = ("pytorch-fp32", "pytorch-bf16", "executorch")
COLUMNS = ["shape", "variant", "step_s", "tokens_per_s", "vs_fp32", "peak_rss_mb", "program_mb", "data_mb",
           "export_s"]
ADAPTER = AdapterConfig(n_specialists=1, mixing="mlp", routing="dense")


def _shape(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


def _model(name: str):
    base = load_base_model(name).model
    torch.manual_seed(0)
    return inject_adapters(base, ADAPTER)


def _batch(b: int, t: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (b, t + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def step_fn(variant: str, model_name: str, b: int, t: int, folder: Path):
    """A no-argument function running one expert step of ``variant``."""
    cfg = TrainConfig(batch_size=b, context=t, device="cpu", precision="bf16" if variant == "pytorch-bf16" else "fp32")
    if variant == "executorch":  # the program only: no PyTorch model in this variant
        program = TrainProgram(folder)
        model = ProgramModel(program)
        cfg = replace(cfg, backend="executorch", program=str(folder))
        state = init_train_state(model, cfg)
        state.program = ProgramGradients(model, program)
    else:
        model = _model(model_name)
        state = init_train_state(model, cfg)
    batches = [_batch(b, t, 257, i) for i in range(4)]  # ids every base accepts (the time does not depend on them)
    counter = iter(range(10**9))

    def step():
        x, y = batches[next(counter) % len(batches)]
        return expert_step(model, state, x, y, cfg)["loss"]

    return step


def ensure_program(model_name: str, b: int, t: int, folder: Path) -> dict:
    """Export the program for (b, t) unless ``folder`` holds one; returns its export time and file sizes."""
    if not (folder / META).is_file():
        model = _model(model_name)
        attach_program(model, TrainConfig(batch_size=b, context=t, backend="executorch", program=str(folder)),
                       model_name)
        del model
    meta = json.loads((folder / META).read_text())
    return {"export_s": meta["seconds"], "program_mb": (folder / PROGRAM).stat().st_size / 2**20,
            "data_mb": (folder / TRAINABLE_DATA).stat().st_size / 2**20}


def set_threads(n: int) -> None:
    """``n`` threads for PyTorch and for the ExecuTorch runtime alike."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    torch.set_num_threads(n)
    _unsafe_reset_threadpool(n)


def child_peak(variant: str, args, b: int, t: int, folder: Path) -> float:
    done = subprocess.run([sys.executable, __file__, "--child", variant, "--model", args.model, "--shapes",
                           f"{b}x{t}", "--programs", str(args.programs), "--threads", str(args.threads)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shapes", default="2x128,8x128", help="batch x context, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--programs", type=Path, default=OUT / "train-program")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch and ExecuTorch threads")
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # export stages
    shapes = [_shape(s) for s in args.shapes.split(",")]
    if args.child:  # peak memory of one variant in this fresh process
        b, t = shapes[0]
        step = step_fn(args.child, args.model, b, t, args.programs / f"{b}x{t}")
        for _ in range(3):
            step()
        print(json.dumps({"peak_mb": peak_rss_mb()}))
        return
    rows, raw = [], {}
    for b, t in shapes:
        folder = args.programs / f"{b}x{t}"
        files = ensure_program(args.model, b, t, folder)
        steps = {v: step_fn(v, args.model, b, t, folder) for v in VARIANTS}
        for step in steps.values():  # warm-up (first-call allocation, kernel selection)
            step()
        times = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for v in order:
                start = time.perf_counter()
                steps[v]()
                times[v].append(time.perf_counter() - start)
        del steps
        raw[f"{b}x{t}"] = times
        fp32 = statistics.median(times["pytorch-fp32"])
        for v in VARIANTS:
            s = statistics.median(times[v])
            rows.append({"shape": f"{b}x{t}", "variant": v, "step_s": s, "tokens_per_s": b * t / s,
                         "vs_fp32": s / fp32, "peak_rss_mb": child_peak(v, args, b, t, folder),
                         **({k: files[k] for k in files} if v == "executorch" else {})})
        # after each shape: a long export of the next one must not hold back what is measured
        print(table(rows, COLUMNS), flush=True)
        path = write_json("train_program", {"model": args.model, "adapter": ADAPTER.to_dict(), "rows": rows,
                                            "raw_times": raw, "threads": args.threads,
                                            "goal": "executorch step <= 1.5x pytorch-fp32"})
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
