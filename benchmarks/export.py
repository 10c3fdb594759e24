"""Phone-grade generation on the real SmolLM2 personalised model, anchors side by side (issue 13).

In one process, alternating the runtimes within every repetition:

* eager Hugging Face with its KV cache (``DynamicCache``; the personalised model),
* the stock SmolLM2-135M program made by ExecuTorch's own LLM export path (``export_llm``: KV cache, custom SDPA
  with cache, XNNPACK, no adapters), at each quantisation given with ``--stock`` (made here with ``--make-stock``),
* ours: KV-cache export folders made by ``python -m export --kv-cache`` (``--ours LABEL=DIR``; ExecuTorch fp32 /
  8da8w / 8da4w, ONNX fp32 and int4),

measuring prefill tokens/s at 128 tokens (one call), decode tokens/s over 64 and 256 generated tokens (greedy, one
call per token; medians over ``--reps``), file sizes, and the process RSS growth when a runtime is loaded (a lower
bound of its peak memory: all runtimes share one process). fp32 files are also checked for greedy equality with
Hugging Face ``generate`` on three prompts (32 tokens each).

    python -m export --checkpoint RUN --out OUT/fp32 --kv-cache --max-seq 512 --quantize int4 \
        --data data/multilingual/nl
    python -m export --checkpoint RUN --out OUT/8da8w --format pte --kv-cache --max-seq 512 --quantize 8da8w \
        --data data/multilingual/nl
    python benchmarks/export.py --make-stock OUT/stock --stock-quantize none,8da8w
    python benchmarks/export.py --checkpoint RUN --data data/multilingual/nl --ours fp32=OUT/fp32 \
        --ours 8da8w=OUT/8da8w --stock fp32=OUT/stock/stock_fp32.pte --stock 8da8w=OUT/stock/stock_8da8w.pte
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import table, write_json  # noqa: E402
from export.generate import Generator, SamplingConfig  # noqa: E402
from export.kv_export import OnnxKV, PteKV  # noqa: E402
from export.load import load_personalized  # noqa: E402
from export.pipeline import verification_tokens  # noqa: E402
from export.verify import greedy_parity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREFILL, DECODE = 128, (64, 256)
#: SmolLM2-135M in the params format of ExecuTorch's Llama model (HF rotary layout: weights need no permutation).
SMOLLM2_PARAMS = {"dim": 576, "hidden_dim": 1536, "n_heads": 9, "n_kv_heads": 3, "n_layers": 30, "norm_eps": 1e-5,
                  "rope_theta": 100000.0, "use_scaled_rope": False, "vocab_size": 49152, "use_hf_rope": True}
#: How each quantisation label is asked of export_llm (int8 embedding as in export/quantize.py). Its source
#: transforms have no 8da8w qmode; int8 dynamic activations with int8 per-channel weights on XNNPACK are its PT2E
#: ``xnnpack_dynamic`` quantizer.
STOCK_QMODES = {"none": [], "8da8w": ["quantization.pt2e_quantize=xnnpack_dynamic",
                                      "quantization.embedding_quantize='8,0'"],
                "8da4w": ["quantization.qmode=8da4w", "quantization.group_size=32",
                          "quantization.embedding_quantize='8,0'"]}


def make_stock(out: Path, quantizations: list[str], max_seq: int) -> list[Path]:
    """Stock SmolLM2-135M programs from ExecuTorch's LLM export path (the base model of this SDK, no adapters)."""
    from safetensors.torch import load_file

    from device_sdk.models import default_cache_dir, smollm2_folder

    out.mkdir(parents=True, exist_ok=True)
    checkpoint, params = out / "smollm2_meta.pth", out / "params.json"
    if not checkpoint.is_file():
        hf = load_file(str(smollm2_folder(default_cache_dir()) / "model.safetensors"))
        names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj":
                 "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
                 "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
                 "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
        meta = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
                "output.weight": hf["model.embed_tokens.weight"]}
        for key, value in hf.items():
            if key.startswith("model.layers."):
                layer, rest = key[len("model.layers."):].split(".", 1)
                module, leaf = rest.rsplit(".", 1)
                meta[f"layers.{layer}.{names[module]}.{leaf}"] = value
        torch.save(meta, checkpoint)
        params.write_text(json.dumps(SMOLLM2_PARAMS))
    made = []
    for q in quantizations:
        name = f"stock_{'fp32' if q == 'none' else q}"
        cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm", "base.model_class=smollm2",
               f"base.checkpoint={checkpoint}", f"base.params={params}", "model.use_kv_cache=true",
               "model.use_sdpa_with_kv_cache=true", "model.enable_dynamic_shape=true", "backend.xnnpack.enabled=true",
               f"export.max_seq_length={max_seq}", f"export.max_context_length={max_seq}",
               f"export.output_dir={out}", f"export.output_name={name}.pte", *STOCK_QMODES[q]]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=out)
        made.append(out / f"{name}.pte")
    return made


class StockKV:
    """A program of ExecuTorch's LLM export: ``(tokens (1, T), input_pos (1,)) -> logits``; cache inside."""

    def __init__(self, path: Path, max_seq: int) -> None:
        import executorch.kernels.quantized  # noqa: F401
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (sdpa_with_kv_cache, update_cache)
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(path)).load_method("forward")
        self.max_seq = max_seq

    def reset(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        out = self.method.execute([input_ids, torch.tensor([pos], dtype=torch.long)])[0]
        return out.reshape(-1, out.shape[-1])[-1]


class EagerHF:
    """Eager Hugging Face with its own KV cache (``DynamicCache``), behind the runner interface."""

    def __init__(self, model: torch.nn.Module, max_seq: int) -> None:
        self.model, self.max_seq, self.past = model, max_seq, None

    def reset(self) -> None:
        self.past = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        out = self.model(input_ids=input_ids, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1]


def rss_mib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--ours", action="append", default=[], metavar="LABEL=DIR",
                        help="a --kv-cache export folder (repeatable); its model.pte, model.onnx and model.int4.onnx "
                             "are measured")
    parser.add_argument("--stock", action="append", default=[], metavar="LABEL=PTE",
                        help="a stock program of ExecuTorch's LLM export (repeatable)")
    parser.add_argument("--make-stock", type=Path, default=None, metavar="DIR",
                        help="make the stock programs in DIR and exit")
    parser.add_argument("--stock-quantize", default="none,8da8w,8da4w")
    parser.add_argument("--max-seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.make_stock:
        print(make_stock(args.make_stock, args.stock_quantize.split(","), args.max_seq))
        return
    if args.checkpoint is None:
        parser.error("--checkpoint is required (or --make-stock)")
    torch.set_num_threads(args.threads)
    loaded = load_personalized(args.checkpoint)
    hf = loaded.model.model
    tokens = verification_tokens(loaded, args.data)
    runners, sizes, memory, start = {}, {}, {}, rss_mib()
    runners["eager HF + cache (fp32)"] = EagerHF(hf, args.max_seq)
    memory["eager HF + cache (fp32)"] = start
    sizes["eager HF + cache (fp32)"] = 4 * sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values())
    for item in args.stock:
        label, path = item.split("=", 1)
        before = rss_mib()
        runners[f"stock ExecuTorch {label}"] = StockKV(Path(path), args.max_seq)
        memory[f"stock ExecuTorch {label}"] = rss_mib() - before
        sizes[f"stock ExecuTorch {label}"] = Path(path).stat().st_size
    for item in args.ours:
        label, folder = item.split("=", 1)
        folder = Path(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        if not manifest["export"].get("kv_cache"):
            raise SystemExit(f"{folder} is not a --kv-cache export")
        for file, kind in (("model.pte", "ExecuTorch"), ("model.onnx", "ONNX"), ("model.int4.onnx", "ONNX")):
            if not (folder / file).is_file():
                continue
            name = f"ours {kind} {'int4' if 'int4' in file else label}"
            before = rss_mib()
            runners[name] = PteKV(folder / file, args.max_seq) if kind == "ExecuTorch" else \
                OnnxKV(folder / file, threads=args.threads)
            memory[name] = rss_mib() - before
            sizes[name] = sum((folder / f).stat().st_size for f in
                              ([file, "base.ptd", "adapters.ptd"] if kind == "ExecuTorch" else [file]))
    prompt = torch.from_numpy(tokens[:PREFILL].astype("int64"))[None]
    short = tokens[:16].astype("int64").tolist()
    prefill = {n: [] for n in runners}
    decode = {n: {d: [] for d in DECODE} for n in runners}
    with torch.no_grad():
        for rep in range(args.reps + 1):  # repetition 0 warms up
            for name, run in runners.items():
                run.reset()
                t0 = time.perf_counter()
                run(prompt, 0)
                if rep:
                    prefill[name].append(PREFILL / (time.perf_counter() - t0))
                for n in DECODE if rep else DECODE[:1]:
                    gen = Generator(run)
                    gen.generate(short, SamplingConfig(max_new_tokens=n, stop_tokens=()))
                    if rep:
                        decode[name][n].append(gen.stats.decode_tokens_per_s)
            print(f"repetition {rep} done", flush=True)
        prompts = [tokens[i * 200 : i * 200 + 12].astype("int64").tolist() for i in range(3)]
        greedy = {name: greedy_parity(hf, run, prompts, 32) for name, run in runners.items()
                  if name.startswith("ours") and ("fp32" in name or name.endswith("none"))}
        stock_check = {}
        if args.stock:  # the stock programs compute the base model: their prefill logits against eager HF's
            from device_sdk.models import load_base_model

            base = load_base_model("smollm2-135m").model.eval()
            ref = base(input_ids=prompt).logits[0, -1]
            for name, run in runners.items():
                if name.startswith("stock"):
                    run.reset()
                    stock_check[name] = (run(prompt, 0) - ref).abs().max().item()
    rows = []
    for name in runners:
        row = {"runtime": name, "prefill tok/s @128": statistics.median(prefill[name]),
               **{f"decode tok/s @{n}": statistics.median(decode[name][n]) for n in DECODE},
               "files MiB": sizes[name] / 2**20, "RSS on load MiB": memory[name]}
        if name in greedy:
            row["greedy = HF"] = f"{greedy[name]['equal']}/{greedy[name]['prompts']}"
        if name in stock_check:
            row["greedy = HF"] = f"base logits {stock_check[name]:.1e}"
        rows.append(row)
    columns = ["runtime", "prefill tok/s @128", *(f"decode tok/s @{n}" for n in DECODE), "files MiB",
               "RSS on load MiB", "greedy = HF"]
    print(table(rows, columns))
    print(f"RSS of the whole process at the end: {psutil.Process().memory_info().rss / 2**20:.0f} MiB; "
          f"threads {args.threads}")
    payload = {"rows": rows, "greedy": greedy, "stock_vs_hf_base_max_abs_logit_diff": stock_check,
               "threads": args.threads}
    print(f"wrote {write_json('export_kv', payload)}")


if __name__ == "__main__":
    main()
