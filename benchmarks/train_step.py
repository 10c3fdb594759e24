"""Training-step cost of our LoRA-MoE against PEFT LoRA on the same base, measured alternately in one process.

Variants (all rank 8, alpha 16 with the rank-stabilised scale, the same attention + MLP targets, the same batch):
  peft        PEFT LoRA: one adapter per projection, on the SDK's base model (its attention: fp32 when a CPU trains
              under bf16 autocast, device_sdk.attention), so that ours vs peft is the adapters' cost alone
  peft-stock  the same with transformers' own sdpa attention (bf16 under autocast): PEFT as a user runs it
  peft-compiled  peft with its whole forward through torch.compile (backward by AOTAutograd): the fair partner of
              our compiled variants, since inductor fuses PEFT's elementwise work as much as ours
  1G1S        ours: attention LoRA + 2-expert LoRA-MoE per MLP block, top-2 router (expert step)
  1G1S-router ours: one router step (validation batch); amortised at tau=30, s=10 it adds s/tau of this per step
  1G3S-sparse ours, 4 experts, each expert only on its routed tokens
  1G3S-dense  ours, 4 experts, fixed shapes on every token
  <variant>-compiled  the same with TrainConfig(compile=True): every decoder block through torch.compile
              (device_sdk.compiled; dense routing only; the one-time compilation falls in the warm-up rounds and in
              the memory child's 3 steps)

Each of ours runs in both mixing forms (``AdapterConfig.mixing``), named ``<variant>/<form>``: ``mlp`` (each expert the
whole MLP, outputs mixed; dense = k masked slots of (N, F) hidden states) and ``projection`` (gates on every
projection's low-rank update; dense = one gated concatenated rank-E*r update). The second table puts the two forms
side by side as ratios to PEFT, with the targets for ``mlp`` (expert step <= 1.05x PEFT time and memory, 1G3S
<= 1.15x).

Each round runs one step of every variant in turn (the starting variant rotates each round, so no variant always
runs right after the same neighbour); times are medians over rounds, and ``time_vs_peft_per_round`` is the median
of each round's own ratio to PEFT (steadier on a machine whose load changes between rounds). Peak memory cannot be told
apart inside one process (the allocator keeps freed pages, so a later step reuses an earlier one's memory), so
each variant's peak RSS is measured in a fresh process of its own (load, 3 steps, kernel high-water mark), right
after the timing rounds.

    .venv/bin/python benchmarks/train_step.py [--model smollm2-135m] [--rounds 6] [--batch 8] [--ctx 128]
                                              [--mixing mlp,projection] [--variants peft-compiled,1G1S-compiled/mlp]

``--variants`` keeps only the named variants (``peft`` always runs: every ratio is to it); such a run writes
``train_step-<--tag>.json`` (default tag ``subset``), so the full run's ``train_step.json`` stays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import table, write_json  # noqa: E402
from device_sdk.config import AdapterConfig, TrainConfig  # noqa: E402
from device_sdk.evaluate import autocast  # noqa: E402
from device_sdk.inject import LLAMA, inject_adapters  # noqa: E402
from device_sdk.memory import peak_rss_mb  # noqa: E402
from device_sdk.models import load_base_model  # noqa: E402
from device_sdk.train import expert_step, init_train_state, router_step  # noqa: E402


def peft_step_fn(model_name: str, cfg: TrainConfig, stock_attention: bool = False, compiled: bool = False):
    from peft import LoraConfig, get_peft_model

    base = load_base_model(model_name).model
    if stock_attention:
        base.config._attn_implementation = "sdpa"
    targets = [t.split(".")[-1] for t in LLAMA.attention_targets] + list(LLAMA.mlp_targets)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0,
                                            target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr_experts, weight_decay=0.0)
    model.train()
    forward = torch.compile(model, dynamic=False) if compiled else model

    def step(x, y):
        for p in params:
            p.grad = None
        with autocast(cfg.precision):
            logits = forward(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()

    return step, sum(p.numel() for p in params), model.config.vocab_size


def ours_step_fn(model_name: str, cfg: TrainConfig, n_specialists: int, routing: str, mixing: str,
                 router: bool = False, compiled: bool = False):
    base = load_base_model(model_name).model
    model = inject_adapters(base, AdapterConfig(n_specialists=n_specialists, routing=routing, mixing=mixing))
    cfg = TrainConfig(**{**cfg.to_dict(), "compile": compiled})
    state = init_train_state(model, TrainConfig(**{**cfg.to_dict(), "steps": 10_000}))
    model.train()
    fn = router_step if router else expert_step
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "router" in n)
    return (lambda x, y: fn(model, state, x, y, cfg)), trainable, model.config.vocab_size


def build(name: str, model: str, cfg: TrainConfig):
    """``(step, trainable parameters, vocabulary size)`` of variant ``name``: ``peft`` or ``<variant>/<mixing>``
    (e.g. ``1G3S-dense/mlp``, ``1G1S-compiled/mlp``)."""
    if name in PEFT:
        return peft_step_fn(model, cfg, stock_attention=name == "peft-stock", compiled=name == "peft-compiled")
    variant, mixing = name.split("/")
    compiled = variant.endswith("-compiled")
    variant = variant.removesuffix("-compiled")
    n_specialists = 3 if variant.startswith("1G3S") else 1
    routing = "sparse" if variant.endswith("sparse") else "dense" if variant.endswith("dense") else "auto"
    return ours_step_fn(model, cfg, n_specialists, routing, mixing, router=variant.endswith("router"),
                        compiled=compiled)


PEFT = ("peft", "peft-stock", "peft-compiled")
OURS = ("1G1S", "1G1S-router", "1G3S-sparse", "1G3S-dense")
#: Variants of ours that also run compiled (``TrainConfig.compile``; dense routing only).
COMPILED = ("1G1S-compiled", "1G1S-router-compiled", "1G3S-dense-compiled")
MIXINGS = ("mlp", "projection")
#: Targets of the mlp form, as ratios to PEFT (time and peak memory alike).
GOALS = {"1G1S": 1.05, "1G3S-sparse": 1.15, "1G3S-dense": 1.15, "1G1S-compiled": 1.05, "1G3S-dense-compiled": 1.15}


def variant_names(mixings: tuple[str, ...]) -> list[str]:
    """The PEFT variants, then every variant of ours in each form, the forms of one variant next to each other,
    then the compiled variants in each form."""
    return [*PEFT] + [f"{v}/{m}" for v in (*OURS, *COMPILED) for m in mixings]


def child_peak(name: str, args) -> float:
    """Peak RSS (MiB) of a fresh process that loads one variant and runs 3 steps."""
    import json
    import subprocess

    done = subprocess.run(
        [sys.executable, __file__, "--child", name, "--model", args.model, "--batch", str(args.batch), "--ctx",
         str(args.ctx), "--precision", args.precision], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--mixing", default=",".join(MIXINGS), help="mixing forms of ours, comma-separated")
    parser.add_argument("--variants", default=None, help="only these variants (comma-separated; peft always runs)")
    parser.add_argument("--tag", default="subset", help="with --variants: write train_step-<tag>.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    mixings = tuple(args.mixing.split(","))
    if not mixings or set(mixings) - set(MIXINGS):
        parser.error(f"--mixing takes forms from {MIXINGS}, got {args.mixing!r}")
    cfg = TrainConfig(batch_size=args.batch, context=args.ctx, precision=args.precision, device="cpu")  # CPU steps
    if args.child:
        import json

        step, _, vocab = build(args.child, args.model, cfg)
        x = torch.randint(0, vocab, (args.batch, args.ctx + 1), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            step(x[:, :-1], x[:, 1:])
        print(json.dumps({"peak_mb": peak_rss_mb()}))
        return
    names = variant_names(mixings)
    if args.variants:
        wanted = set(args.variants.split(","))
        if wanted - set(names):
            parser.error(f"--variants: unknown {sorted(wanted - set(names))}; with --mixing {args.mixing} they are "
                         f"{names}")
        names = [n for n in names if n == "peft" or n in wanted]
    variants = {name: build(name, args.model, cfg) for name in names}
    params = {name: trainable for name, (_, trainable, _) in variants.items()}
    vocab = variants["peft"][2]
    g = torch.Generator().manual_seed(0)
    times = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        x = torch.randint(0, vocab, (args.batch, args.ctx + 1), generator=g)
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = variants[name][0]
            start = time.perf_counter()
            step(x[:, :-1], x[:, 1:])
            elapsed = time.perf_counter() - start
            if r >= args.warmup:
                times[name].append(elapsed)
        print(f"round {r + 1}/{args.warmup + args.rounds}: " + ", ".join(
            f"{k} {times[k][-1]:.2f}s" for k in variants if times[k]), flush=True)
    del variants
    mems = {name: child_peak(name, args) for name in names}
    tokens = args.batch * args.ctx
    median = {name: statistics.median(times[name]) for name in names}
    t_peft, m_peft = median["peft"], mems["peft"]
    rows = []
    for name in names:
        t, m = median[name], mems[name]
        rows.append({"variant": name, "trainable_params": params[name], "step_s": t, "tokens_per_s": tokens / t,
                     "peak_rss_mb": m, "time_vs_peft": t / t_peft, "mem_vs_peft": m / m_peft,
                     # paired per round (the same round's conditions on both sides), then the median
                     "time_vs_peft_per_round": statistics.median(a / b for a, b in zip(times[name], times["peft"]))})
    summary, side = {}, []
    for mixing in mixings:
        ours = [v for v in (*OURS, *COMPILED) if f"{v}/{mixing}" in median]
        amortised = {}
        for v in ("1G1S", "1G1S-compiled"):
            router = v.replace("1G1S", "1G1S-router")
            if f"{v}/{mixing}" not in median or f"{router}/{mixing}" not in median:  # not in this run's --variants
                continue
            amortised[v] = median[f"{v}/{mixing}"] + 10 / 30 * median[f"{router}/{mixing}"]
            rows.append({"variant": f"{v}/{mixing} + routers (tau=30, s=10), per expert step",
                         "step_s": amortised[v], "tokens_per_s": tokens / amortised[v],
                         "time_vs_peft": amortised[v] / t_peft})
        sparse, dense = f"1G3S-sparse/{mixing}", f"1G3S-dense/{mixing}"
        summary[mixing] = {
            **({"sparse_vs_dense_time": median[sparse] / median[dense],
                "sparse_vs_dense_mem": mems[sparse] / mems[dense]} if sparse in median and dense in median else {}),
            **{f"{v}_vs_peft_time": median[f"{v}/{mixing}"] / t_peft for v in ours},
            **{f"{v}_vs_peft_mem": mems[f"{v}/{mixing}"] / m_peft for v in ours},
            **{f"{v}_amortised_vs_peft_time": t / t_peft for v, t in amortised.items()},
        }
        for partner in ("peft-stock", "peft-compiled"):  # PEFT as a user runs it; PEFT compiled as ours is
            if partner in median:
                summary[mixing].update(
                    {f"{v}_vs_{partner}_time": median[f"{v}/{mixing}"] / median[partner] for v in ours}
                    | {f"{v}_vs_{partner}_mem": mems[f"{v}/{mixing}"] / mems[partner] for v in ours})
    for v in (*OURS, *COMPILED):  # one row per variant, the forms side by side
        if not any(f"{v}_vs_peft_time" in summary[m] for m in mixings):
            continue
        row = {"variant": v, "mlp_goal": GOALS.get(v, "")}
        for mixing in mixings:
            row[f"time_{mixing}"] = summary[mixing].get(f"{v}_vs_peft_time", "")
            row[f"mem_{mixing}"] = summary[mixing].get(f"{v}_vs_peft_mem", "")
        side.append(row)
    print(table(rows, ["variant", "trainable_params", "step_s", "tokens_per_s", "peak_rss_mb", "time_vs_peft",
                       "time_vs_peft_per_round", "mem_vs_peft"]))
    print(f"\nratios to PEFT ({t_peft:.3g} s/step, {m_peft:.0f} MiB peak RSS)")
    print(table(side, ["variant", *(f"{q}_{m}" for q in ("time", "mem") for m in mixings), "mlp_goal"]))
    for partner in ("peft-stock", "peft-compiled"):
        if partner in median:
            print(f"{partner}: {median[partner]:.3g} s/step ({median[partner] / t_peft:.2f}x peft), "
                  f"{mems[partner]:.0f} MiB; ours vs it (time/mem): " + ", ".join(
                      f"{v}/{m} {summary[m][f'{v}_vs_{partner}_time']:.2f}/{summary[m][f'{v}_vs_{partner}_mem']:.2f}"
                      for m in mixings for v in (*OURS, *COMPILED) if f"{v}_vs_{partner}_time" in summary[m]))
    print(summary)
    name = f"train_step-{args.tag}" if args.variants else "train_step"
    path = write_json(name, {"args": vars(args), "rows": rows, "side_by_side": side, "goals_mlp": GOALS,
                             "summary": summary, "raw_times": times, "peak_rss_mb": mems})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
