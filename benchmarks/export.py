"""Exported models on the real SmolLM2 personalised model: sizes, export time, latency, generation speed, parity.

Uses an export folder made by ``python -m export`` (``--export-dir``; made here from ``--checkpoint`` when
missing, and cached), adds the int4 ONNX variant when it is missing, then measures, alternating the runtimes
within each repetition: forward latency at T = 1, 32, 128 (median of --reps), tokens/s of a 64-token greedy
KV-less generation, and parity with eager PyTorch (max |logit diff|, argmax agreement, perplexity on the user's
test text).

    .venv/bin/python benchmarks/export.py --checkpoint runs/demo-nl --data data/multilingual/nl \
        [--export-dir DIR] [--pte-quantized 8da8w=DIR] [--pte-quantized 8da4w=DIR]

A quantised program whose export failed verification (its folder has no manifest) is still measured: the table
shows why it was refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import table, write_json  # noqa: E402
from export.executorch import PteRunner  # noqa: E402
from export.load import load_personalized  # noqa: E402
from export.onnx import OnnxRunner, quantize_int4  # noqa: E402
from export.pipeline import QUANTIZED_TOL, verification_tokens  # noqa: E402
from export.verify import Tolerance, compare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--export-dir", type=Path, default=None, help="default: benchmarks/out/export-<name>")
    parser.add_argument("--pte-quantized", action="append", default=[], metavar="LABEL=DIR",
                        help="an export folder made with --format pte --quantize LABEL (repeatable)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()
    out = args.export_dir or ROOT / "benchmarks" / "out" / f"export-{args.checkpoint.name}"
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        cmd = [sys.executable, "-m", "export", "--checkpoint", str(args.checkpoint), "--out", str(out),
               "--format", "all"] + (["--data", str(args.data)] if args.data else [])
        subprocess.run(cmd, check=True, cwd=ROOT)
    manifest = json.loads(manifest_path.read_text())
    loaded = load_personalized(args.checkpoint)
    if not (out / "model.int4.onnx").is_file():
        small = max(loaded.adapter.rank, loaded.adapter.n_experts)
        manifest["export"]["onnx_int4_seconds"] = quantize_int4(out / "model.onnx", out / "model.int4.onnx",
                                                                small)["seconds"]
    eager = loaded.model
    runners = {
        "eager PyTorch fp32": lambda x: eager(x),
        "onnxruntime fp32": OnnxRunner(out / "model.onnx"),
        "onnxruntime int4": OnnxRunner(out / "model.int4.onnx"),
        "ExecuTorch fp32 (XNNPACK)": PteRunner(out / "model.pte"),
    }
    quantized = dict(item.split("=", 1) for item in args.pte_quantized)
    for label, folder in quantized.items():
        runners[f"ExecuTorch {label} (XNNPACK)"] = PteRunner(Path(folder) / "model.pte")
    tokens = verification_tokens(loaded, args.data)
    lengths = (1, 32, 128)
    latency = {name: {t: [] for t in lengths} for name in runners}
    gen = {name: [] for name in runners}
    with torch.no_grad():
        for rep in range(args.reps + 1):
            for t in lengths:
                x = torch.from_numpy(tokens[rep * 128 : rep * 128 + t].astype("int64"))[None]
                for name, run in runners.items():
                    start = time.perf_counter()
                    run(x)
                    if rep:
                        latency[name][t].append(time.perf_counter() - start)
        prompt = tokens[:16].astype("int64").tolist()
        for name, run in runners.items():
            ids = list(prompt)
            start = time.perf_counter()
            for _ in range(args.gen_tokens):
                logits = run(torch.tensor([ids[-128:]], dtype=torch.long))
                ids.append(int(logits[0, -1].argmax()))
            gen[name] = args.gen_tokens / (time.perf_counter() - start)
        parity = {}
        for name, run in list(runners.items())[1:]:
            tol = QUANTIZED_TOL if "int4" in name or any(label in name for label in quantized) else Tolerance()
            parity[name] = compare(eager, run, tokens, name, seq_lens=(32, 128), windows=8, tol=tol).to_dict()
    files = {p.name: p.stat().st_size / 2**20 for p in sorted(out.iterdir()) if p.is_file()
             and not p.name.startswith(".")}
    for label, folder in quantized.items():
        files.update({f"{label}/{p.name}": p.stat().st_size / 2**20 for p in sorted(Path(folder).iterdir())
                      if p.suffix in (".pte", ".ptd") and not p.name.startswith(".")})
    rows = []
    for name in runners:
        row = {"runtime": name, **{f"T={t} ms": 1000 * statistics.median(latency[name][t]) for t in lengths},
               "gen tokens/s": gen[name]}
        if name in parity:
            row.update({"max |dlogit|": parity[name]["max_abs_logit_diff"],
                        "argmax agree": parity[name]["argmax_agreement"],
                        "ppl": parity[name]["ppl_exported"]})
        else:
            row["ppl"] = next(iter(parity.values()))["ppl_pytorch"]
        rows.append(row)
    print(table([{"file": k, "MiB": v} for k, v in files.items()], ["file", "MiB"]))
    print({k: v for k, v in manifest["export"].items() if k.endswith("seconds")})
    print(table(rows, ["runtime", "T=1 ms", "T=32 ms", "T=128 ms", "gen tokens/s", "max |dlogit|", "argmax agree",
                       "ppl"]))
    print(f"wrote {write_json('export', {'files_mib': files, 'export': manifest['export'], 'rows': rows, 'parity': parity})}")


if __name__ == "__main__":
    main()
