"""Cost of each strategy's aggregation at the real SmolLM2-135M size: the server rule and a device's receive step.

For every strategy, N devices with the paper's heterogeneous expert counts (4, 2, 2, 2, repeated) build their shared
tensors on a meta SmolLM2 (30 blocks, hidden 576, MLP 1536; LoRA rank 8 per expert), filled with random values.
Reported per strategy: the MiB one device uploads (the largest device) and downloads, the server rule's time, the
slowest device's receive time (PCL: the mixing only; scoring the N peer models on the device costs N evaluations of
``--peer-eval-tokens`` on top), and the MiB the server holds during the rule (the mean streams one upload).

    .venv/bin/python benchmarks/server_rules.py [--devices 4,16] [--strategies fedavg,comigs-1gxs,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import table, write_json  # noqa: E402

STRATEGIES = "fedavg,comigs-1gxs,ffa-lora,hetlora-full,flexlora-active,flexlora-full,pcl"
EXPERTS = (4, 2, 2, 2)


def shared_shapes(strategy, n_experts: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of what a SmolLM2 device with ``n_experts`` experts uploads under ``strategy``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from device_sdk.inject import inject_adapters
    from device_sdk.parts import role_parameters

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = inject_adapters(LlamaForCausalLM(cfg), strategy.adapter_config(0, n_experts))
    params = role_parameters(model, strategy.shared_roles)
    return {k: tuple(p.shape) for k, p in params.items() if strategy.travels(k)}


def mib(tensors: dict[str, torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def measure(name: str, n_devices: int) -> dict:
    from device_sdk.config import AdapterConfig
    from device_sdk.federated import Upload
    from device_sdk.strategies import make_strategy

    strategy = make_strategy(name)
    g = torch.Generator().manual_seed(0)
    uploads = []
    for i in range(n_devices):
        n_experts = EXPERTS[i % len(EXPERTS)]
        shapes = shared_shapes(strategy, n_experts)
        tensors = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in shapes.items()}
        rank = strategy.adapter_config(0, n_experts).rank
        uploads.append(Upload(i, tensors, 1024, rank, AdapterConfig().alpha))
    start = time.perf_counter()
    merged = strategy.server_rule(uploads)
    server_s = time.perf_counter() - start
    receive_s = 0.0
    for u in uploads:
        start = time.perf_counter()
        strategy.receive(merged, u, lambda tensors: 1.0)  # PCL: equal scores; the mixing cost only
        receive_s = max(receive_s, time.perf_counter() - start)
    held = max(mib(u.tensors) for u in uploads) if strategy.server_mean else sum(mib(u.tensors) for u in uploads)
    return {"strategy": name, "devices": n_devices, "upload_mib": max(mib(u.tensors) for u in uploads),
            "download_mib": mib(merged), "server_s": server_s, "receive_s": receive_s, "server_holds_mib": held}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="4,16")
    parser.add_argument("--strategies", default=STRATEGIES)
    args = parser.parse_args()
    rows = []
    for n in (int(v) for v in args.devices.split(",")):
        for name in args.strategies.split(","):
            rows.append(measure(name, n))
            print(f"{name} N={n}: server {rows[-1]['server_s']:.2f} s", file=sys.stderr, flush=True)
    columns = ["strategy", "devices", "upload_mib", "download_mib", "server_s", "receive_s", "server_holds_mib"]
    print(table(rows, columns))
    print(f"wrote {write_json('server_rules', {'rows': rows, 'experts': EXPERTS})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
