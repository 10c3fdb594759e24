"""Load on a real aggregator: N concurrent simulated devices upload shared tensors of the real SmolLM2 1G1S size.

For each N a fresh server (uvicorn, loopback) gets a federation whose shared tensors have the shapes of SmolLM2's
attention LoRA + generalist (rank 8), N enrolled devices, and N concurrent uploads (at most --concurrency in
flight). Reported: uploads/s, seconds from the last upload's answer to the new global version, the server's peak
RSS, the server's aggregation time, and its ratio to a plain in-memory float32 sum of the same N tensor sets.

The mean rules keep a running sum of the accepted uploads, so closing a round does not re-read them: the goal is a
last-upload-to-global time under 0.5 s that stays within 1.5x from the smallest to the largest N (printed as
``close_growth``), with uploads/s and the server's memory flat in N. ``running_mean`` says whether the server closed
the round from its running sum (False: it re-read the stored uploads).

    .venv/bin/python benchmarks/aggregator_load.py [--devices 50,200,1000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin-token-0123456789"  # admin tokens need >= 22 characters


def smollm2_shared_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of SmolLM2-135M's shared tensors (attention LoRA + 1 generalist), from a meta model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from device_sdk.config import AdapterConfig
    from device_sdk.inject import inject_adapters
    from device_sdk.parts import SHARED_ROLES, role_parameters

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = inject_adapters(LlamaForCausalLM(cfg), AdapterConfig(n_specialists=1))
    return {k: tuple(p.shape) for k, p in role_parameters(model, SHARED_ROLES).items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_mb(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Samples a process's RSS every few milliseconds and keeps the maximum per phase."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.phase, self.peaks = pid, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = status_mb(self.pid, "VmRSS")
            except OSError:
                return
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            time.sleep(0.005)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peaks


async def upload_all(url: str, tokens: list[str], payloads: list[bytes], concurrency: int) -> list[float]:
    limit = asyncio.Semaphore(concurrency)
    done_at: list[float] = []

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int) -> None:
            async with limit:
                r = await client.post(f"{url}/rounds/1/update", content=payloads[i % len(payloads)],
                                      headers={"Authorization": f"Bearer {tokens[i]}"})
                r.raise_for_status()
                done_at.append(time.perf_counter())

        await asyncio.gather(*(one(i) for i in range(len(tokens))))
    return done_at


def run(n: int, shapes: dict, payloads: list[bytes], tensor_sets: list[dict], concurrency: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="agg-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AGGREGATOR_ADMIN_TOKEN": ADMIN, "AGGREGATOR_TICK_S": "0.05", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "aggregator", "serve", "--data-dir", str(data_dir), "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        created = httpx.post(url + "/admin/federation", headers=admin, json={"config": {
            "base_model": "smollm2-135m", "min_devices": n, "round_deadline_s": 3600}}).json()
        zeros = {k: torch.zeros(s) for k, s in shapes.items()}
        httpx.put(url + "/admin/federation/initial", headers=admin, content=st_save(zeros), timeout=60)
        with httpx.Client(timeout=60) as c:
            tokens = [c.post(url + "/enroll", json={"enroll_secret": created["enroll_secret"], "name": f"d{i}",
                                                    "capabilities": {"n_specialists": 1, "rank": 8}}).json()["token"]
                      for i in range(n)]
        sampler = RssSampler(server.pid)
        sampler.phase = "uploads"
        start = time.perf_counter()
        done_at = asyncio.run(upload_all(url, tokens, payloads, concurrency))
        last = max(done_at)
        sampler.phase = "aggregation"
        while True:
            status = httpx.get(url + "/status", timeout=60).json()
            if status["current_round"]["round"] == 2:
                break
            time.sleep(0.02)
        new_global = time.perf_counter()
        import sqlite3

        db = sqlite3.connect(data_dir / "aggregator.db")
        summary = json.loads(db.execute("SELECT summary FROM rounds WHERE round = 1").fetchone()[0])
        aggregation_s, running_mean = summary["aggregation_s"], summary.get("running_mean")
        db.close()
        rss = status_mb(server.pid)
        phases = sampler.stop()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)
    # the plain in-memory sum of the same N tensor sets (cycled like the uploads)
    t0 = time.perf_counter()
    acc = {k: torch.zeros(s) for k, s in shapes.items()}
    for i in range(n):
        for k, v in tensor_sets[i % len(tensor_sets)].items():
            acc[k].add_(v)
    plain_sum_s = time.perf_counter() - t0
    upload_s = last - start
    return {"devices": n, "uploads_per_s": n / upload_s, "upload_wall_s": upload_s,
            "last_upload_to_global_s": new_global - last, "aggregation_s": aggregation_s, "running_mean": running_mean,
            "plain_sum_s": plain_sum_s, "aggregation_vs_plain_sum": aggregation_s / plain_sum_s,
            "server_peak_rss_mb": rss, "server_rss_uploads_mb": phases.get("uploads"),
            "server_rss_aggregation_mb": phases.get("aggregation"), "server_rss_idle_mb": phases.get("start")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", default="50,200,1000")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--distinct", type=int, default=8, help="distinct payloads cycled over devices")
    args = parser.parse_args()
    shapes = smollm2_shared_shapes()
    g = torch.Generator().manual_seed(0)
    tensor_sets = [{k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()} for _ in range(args.distinct)]
    payloads = [st_save(t, metadata={"tokens": "1024", "metrics": json.dumps({"valid_loss": 3.0})})
                for t in tensor_sets]
    size_mb = len(payloads[0]) / 2**20
    print(f"{len(shapes)} shared tensors, {sum(torch.Size(s).numel() for s in shapes.values())} values, "
          f"{size_mb:.1f} MiB per upload", flush=True)
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        row = run(n, shapes, payloads, tensor_sets, args.concurrency)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows, ["devices", "uploads_per_s", "last_upload_to_global_s", "aggregation_s", "running_mean",
                       "plain_sum_s", "aggregation_vs_plain_sum", "server_peak_rss_mb", "server_rss_uploads_mb",
                       "server_rss_aggregation_mb"]))
    close_growth = rows[-1]["last_upload_to_global_s"] / rows[0]["last_upload_to_global_s"]
    print(f"last upload -> new global: {rows[0]['last_upload_to_global_s']:.3f} s at N={rows[0]['devices']}, "
          f"{rows[-1]['last_upload_to_global_s']:.3f} s at N={rows[-1]['devices']} (close_growth {close_growth:.2f}x; "
          "goal: < 0.5 s and < 1.5x)")
    result = {"args": vars(args), "upload_mb": size_mb, "rows": rows, "close_growth": close_growth}
    print(f"wrote {write_json('aggregator_load', result)}")


if __name__ == "__main__":
    main()
