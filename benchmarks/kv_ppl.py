"""Perplexity of KV-cache programs on more text than the export's verification: every position predicted by a
decode call, so quantisation differences between programs are measured on thousands of tokens, not a few hundred.

Takes ``--windows`` windows of ``--length + 1`` tokens spread evenly over a user's test text; each window is a
one-token prefill followed by one decode call per token.

    python benchmarks/kv_ppl.py OUT/fp32 OUT/8da4w [--data ../shared/data/multilingual/nl] [--windows 32] [--length 64]

Writes benchmarks/out/kv_ppl.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import table, write_json  # noqa: E402
from device_sdk.data import load_user_data  # noqa: E402
from device_sdk.models import load_base_model  # noqa: E402
from export.errors import ExportError  # noqa: E402
from export.executorch import PROGRAM  # noqa: E402
from export.kv_export import kv_runner  # noqa: E402


def windows(tokens: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """``count`` windows of ``length + 1`` tokens, evenly spaced over ``tokens``."""
    stride = (len(tokens) - length - 1) // max(count - 1, 1)
    if stride < 0:
        raise SystemExit(f"the text has {len(tokens)} tokens, fewer than one window of {length + 1}")
    return [tokens[i * stride : i * stride + length + 1] for i in range(count)]


def perplexity(path: Path, wins: list[torch.Tensor]) -> float:
    runner = kv_runner(path, max(len(w) for w in wins))
    nll, count = 0.0, 0
    for w in wins:
        runner.reset()
        logits = torch.stack([runner(w[None, i : i + 1], i) for i in range(len(w) - 1)])  # (L, V)
        nll -= torch.log_softmax(logits.float(), -1)[torch.arange(len(w) - 1), w[1:]].sum().item()
        count += len(w) - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("programs", nargs="+", type=Path, help="export folders (model.pte) or .pte / .onnx files")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/multilingual/nl"))
    parser.add_argument("--model", default="smollm2-135m", help="base model whose tokenizer the programs use")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    tokenizer = load_base_model(args.model).tokenizer
    tokens = torch.from_numpy(load_user_data(args.data, tokenizer).test.astype("int64"))
    wins = windows(tokens, args.windows, args.length)
    rows = []
    for path in args.programs:
        program = path / PROGRAM if path.is_dir() else path
        try:
            ppl = perplexity(program, wins)
        except ExportError as err:  # a missing or unsuitable file: say so without a traceback
            raise SystemExit(str(err)) from err
        rows.append({"program": str(program), "ppl": ppl, "tokens": args.windows * args.length})
        print(table(rows[-1:], ["program", "ppl", "tokens"]), flush=True)
    print(table(rows, ["program", "ppl", "tokens"]))
    print("wrote", write_json("kv_ppl", {"data": str(args.data), "windows": args.windows, "length": args.length,
                                         "rows": rows}))


if __name__ == "__main__":
    main()
