"""A phone stand-in: generate text from an export folder alone (no transformers model code, no torch model).

An export made with ``--kv-cache`` runs through the SDK's generation API (export/generate.py): one prefill call
for the prompt, one decode call per new token over the program's KV cache, streaming the text and printing prefill
and decode tokens/s. ``--chat`` wraps the prompt in the model's chat template (SmolLM2-Instruct's ChatML);
``--temperature`` / ``--top-p`` sample instead of greedy decoding.

An export without a KV cache falls back to re-running the whole window for every new token (greedy).

    python -m export --checkpoint device-state/de --out phone/ --kv-cache --max-seq 512
    python examples/phone_inference.py --model-dir phone/ --prompt "Der Zug" --tokens 32
    python examples/phone_inference.py --model-dir phone/ --chat --prompt "Write a haiku about trains."
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.generate import ExportTokenizer, SamplingConfig, open_export


def kv_less_step(folder: Path, runtime: str, onnx_file: str):
    """``ids -> last logits`` of a full-sequence export (no KV cache)."""
    if runtime == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(folder / onnx_file), providers=["CPUExecutionProvider"])
        return lambda ids: session.run(None, {"input_ids": np.asarray([ids], dtype=np.int64)})[0][0, -1]
    import torch

    from export.executorch import PteRunner

    runner = PteRunner(folder / "model.pte")
    return lambda ids: runner(torch.tensor([ids], dtype=torch.long))[0, -1].numpy()


def run_kv(args, tokens: ExportTokenizer, prompt: list[int], name: str) -> list[int]:
    gen = open_export(args.model_dir, name, args.onnx_file)
    cfg = SamplingConfig(max_new_tokens=args.tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed)
    print(f"[{name}] ", end="", flush=True)
    new = []
    for token in gen.stream(prompt, cfg):  # print the text as it grows (decoding all ids keeps UTF-8 intact)
        before = tokens.decode(new)
        new.append(token)
        print(tokens.decode(new)[len(before):], end="", flush=True)
    print(f"\n[{name}] {gen.stats}")
    return new


def run_kv_less(args, tokens: ExportTokenizer, prompt: list[int], name: str, max_seq: int) -> list[int]:
    step = kv_less_step(args.model_dir, name, args.onnx_file)
    ids, start = list(prompt), time.perf_counter()
    for _ in range(args.tokens):
        ids.append(int(np.argmax(step(ids[-max_seq:]))))
    seconds = time.perf_counter() - start
    new = ids[len(prompt):]
    print(f"[{name}] {len(new) / seconds:.1f} tokens/s (no KV cache, greedy): {tokens.decode(new)!r}")
    return new


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--prompt", default="The file")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--tokens", type=int, default=32, help="at most this many new tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", choices=("pte", "onnx", "both"), default="both")
    parser.add_argument("--onnx-file", default="model.onnx", help="model.onnx or model.int4.onnx")
    args = parser.parse_args()
    export = json.loads((args.model_dir / "manifest.json").read_text())["export"]
    tokens = ExportTokenizer(args.model_dir)
    prompt = tokens.chat([{"role": "user", "content": args.prompt}]) if args.chat else tokens.encode(args.prompt)
    runtimes = ("pte", "onnx") if args.runtime == "both" else (args.runtime,)
    outputs = {}
    for name in runtimes:
        path = args.model_dir / ("model.pte" if name == "pte" else args.onnx_file)
        if not path.is_file():
            print(f"{name}: no {path.name} in {args.model_dir}", file=sys.stderr)
            continue
        if export.get("kv_cache"):
            outputs[name] = run_kv(args, tokens, prompt, name)
        else:
            outputs[name] = run_kv_less(args, tokens, prompt, name, export["max_seq"])
    if len(outputs) == 2 and args.temperature == 0:
        print("runtimes agree token for token:", outputs["pte"] == outputs["onnx"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
