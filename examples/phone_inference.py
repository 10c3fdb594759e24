"""A phone stand-in: generate text from an export folder alone (no transformers model code, no torch model).

Loads ``model.pte`` (+ ``base.ptd`` and ``adapters.ptd``) with the ExecuTorch runtime and/or ``model.onnx`` with
onnxruntime, the tokenizer from ``tokenizer.json``, and decodes greedily with a KV-less loop (the whole window is
re-run for every new token, at most ``max_seq`` tokens as recorded in ``manifest.json``).

    python examples/phone_inference.py --model-dir runs/federation/export-de --prompt "Der Zug" --tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Tokens:
    """tokenizer.json from the export: a Hugging Face tokenizer (via the `tokenizers` library) or raw bytes."""

    def __init__(self, folder: Path) -> None:
        spec = json.loads((folder / "tokenizer.json").read_text())
        self.bytes = spec.get("type") == "bytes-v1"
        if not self.bytes:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8")) if self.bytes else self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.bytes:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.tok.decode(ids)


def onnx_step(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda ids: session.run(None, {"input_ids": np.asarray([ids], dtype=np.int64)})[0][0, -1]


def pte_step(folder: Path):
    import torch
    from executorch.runtime import Runtime

    from export.executorch import merged_data_file  # merges base.ptd + adapters.ptd (one data file in Python)

    if json.loads((folder / "manifest.json").read_text())["export"]["quantize"] in ("8da4w", "8da8w"):
        import executorch.kernels.quantized  # noqa: F401  (int8 embedding and dynamic quantisation kernels)
    data = merged_data_file(folder) if (folder / "base.ptd").is_file() else None
    method = Runtime.get().load_program(str(folder / "model.pte"), data_path=str(data) if data else None) \
        .load_method("forward")
    if data is not None:
        data.unlink()  # loaded: the runtime keeps the data mapped
    return lambda ids: method.execute([torch.tensor([ids], dtype=torch.long)])[0][0, -1].numpy()


def generate(step, prompt_ids: list[int], n: int, max_seq: int, eos: int | None) -> tuple[list[int], float]:
    ids = list(prompt_ids)
    start = time.perf_counter()
    for _ in range(n):
        logits = step(ids[-max_seq:])
        nxt = int(np.argmax(logits))
        ids.append(nxt)
        if eos is not None and nxt == eos:
            break
    return ids[len(prompt_ids):], time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--prompt", default="The file")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runtime", choices=("pte", "onnx", "both"), default="both")
    parser.add_argument("--onnx-file", default="model.onnx", help="model.onnx or model.int4.onnx")
    args = parser.parse_args()
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    max_seq = manifest["export"]["max_seq"]
    tokens = Tokens(args.model_dir)
    prompt = tokens.encode(args.prompt)
    runtimes = ("pte", "onnx") if args.runtime == "both" else (args.runtime,)
    outputs = {}
    for name in runtimes:
        path = args.model_dir / ("model.pte" if name == "pte" else args.onnx_file)
        if not path.is_file():
            print(f"{name}: no {path.name} in {args.model_dir}", file=sys.stderr)
            continue
        step = pte_step(args.model_dir) if name == "pte" else onnx_step(path)
        new, seconds = generate(step, prompt, args.tokens, max_seq, None)
        outputs[name] = new
        print(f"[{name}] {len(new) / seconds:.1f} tokens/s: {args.prompt}{tokens.decode(new)!r}")
    if len(outputs) == 2:
        print("runtimes agree token for token:", outputs["pte"] == outputs["onnx"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
