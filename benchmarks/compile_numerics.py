"""How close a bf16 training step's gradients are to fp32's, eager and compiled (``TrainConfig.compile``).

One model (default the real SmolLM2-135M, 1 generalist + 1 specialist), one batch of real-looking random tokens:
the loss and every adapter gradient in fp32 (eager: the reference), then under bf16 autocast eager and with the
decoder blocks compiled (``device_sdk.compiled.compile_blocks``). For each bf16 form it reports the relative
difference ``|g - g_fp32| / |g_fp32|`` of every adapter tensor's gradient (median, 90th percentile, largest) and the
loss. Compiled should be no further from fp32 than eager: inductor keeps fused intermediates in fp32 where eager
rounds each to bf16.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_numerics.py [--model smollm2-135m] [--mixing mlp]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import table, write_json  # noqa: E402
from device_sdk.compiled import compile_blocks  # noqa: E402
from device_sdk.config import AdapterConfig  # noqa: E402
from device_sdk.evaluate import autocast  # noqa: E402
from device_sdk.inject import inject_adapters  # noqa: E402
from device_sdk.models import load_base_model  # noqa: E402
from device_sdk.parts import iter_role_parameters  # noqa: E402


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str):
    """The next-token loss of (B, T) ``x`` against ``y`` and every adapter tensor's gradient (fp32 copies)."""
    for p in model.parameters():
        p.grad = None
    with autocast(precision):
        logits = model(input_ids=x, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p, _ in iter_role_parameters(model) if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mixing", default="mlp", choices=("mlp", "projection"))
    parser.add_argument("--specialists", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    args = parser.parse_args()
    base = load_base_model(args.model)
    torch.manual_seed(0)
    model = inject_adapters(base.model, AdapterConfig(n_specialists=args.specialists, mixing=args.mixing)).train()
    with torch.no_grad():  # trained-looking adapters: B is zero at initialisation, which would hide its error
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.ctx + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss32, ref = loss_and_grads(model, x, y, "fp32")
    runs = {"bf16 eager": loss_and_grads(model, x, y, "bf16")}
    compile_blocks(model)
    loss_and_grads(model, x, y, "bf16")  # compiles
    runs["bf16 compiled"] = loss_and_grads(model, x, y, "bf16")
    rows = [{"form": "fp32 eager (reference)", "loss": loss32}]
    for form, (loss, grads) in runs.items():
        rel = sorted(float((g - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n, g in grads.items())
        rows.append({"form": form, "loss": loss, "median_rel_grad_diff": statistics.median(rel),
                     "p90_rel_grad_diff": rel[int(0.9 * (len(rel) - 1))], "max_rel_grad_diff": rel[-1],
                     "tensors": len(rel)})
    print(table(rows, ["form", "loss", "median_rel_grad_diff", "p90_rel_grad_diff", "max_rel_grad_diff", "tensors"]))
    path = write_json(f"compile_numerics-{args.mixing}", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
