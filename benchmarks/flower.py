"""The same simulated federation in-process and on Flower's simulation engine, and the traffic of a SuperLink run.

(a) ``--devices`` (32) tiny virtual devices (tiny-llama, made-up text), comigs-1gxs, and optionally (b) 4 SmolLM2
devices on ../shared/data/multilingual (``--smollm2``), each run end to end as ``python -m device_sdk simulate
--engine local|flower`` in a fresh process. Reported per engine: the command's wall time (imports, model load, Ray's
start included), the run's own time (the record's ``seconds``: rounds and evaluations only), and the peak resident
memory of the whole process tree (Ray's GCS, raylet and workers included), sampled every 0.2 s. The numbers of both
engines must agree (checked: bit-identical records). (c) A SuperLink and two SuperNodes on loopback run the example
app (tiny-llama): bytes each device downloads (global versions) and uploads (its shared tensors) per round, as
counted on the ArrayRecords the ServerApp sends and receives.

    .venv/bin/python benchmarks/flower.py [--devices 32] [--rounds 2] [--local-steps 4] [--smollm2] [--no-deploy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import table, write_json  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "multilingual"
SAME = ("iterations", "test_ppl", "train_loss", "expert_scores", "strategy_state")


def made_up_users(folder: Path, n: int) -> Path:
    """``n`` user folders of made-up text, each with its own 6-word vocabulary."""
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
             "upsilon phi chi psi omega red green blue white black grey one two three four five six").split()
    g = torch.Generator().manual_seed(0)
    for u in range(n):
        vocab = [words[(u * 5 + k) % len(words)] for k in range(6)]
        user = folder / f"user{u:02d}"
        user.mkdir(parents=True, exist_ok=True)
        for split, count in (("train", 3000), ("valid", 600), ("test", 600)):
            idx = torch.randint(0, len(vocab), (count,), generator=g).tolist()
            (user / f"{split}.txt").write_text(" ".join(vocab[i] for i in idx) + "\n")
    return folder


class PeakRSS:
    """Peak of the summed resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.root, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def simulate(engine: str, data: Path, out: Path, args: list[str], env: dict) -> dict:
    """One ``simulate`` command; returns its wall time, peak tree RSS and the run's record."""
    cmd = [sys.executable, "-m", "device_sdk", "simulate", "--data", str(data), "--out", str(out), "--engine",
           engine, *args]
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = PeakRSS(proc.pid)
        code = proc.wait()
        peak = sampler.stop()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{engine} run failed ({code}); see {out.with_suffix('.log')}")
    (record,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    return {"wall_s": wall, "run_s": record["seconds"], "peak_rss_mib": peak / 2**20, "record": record}


def compare(name: str, data: Path, n: int, sim_args: list[str], workdir: Path, env: dict,
            threads: dict[str, int]) -> list[dict]:
    """Both engines on the same settings; ``threads``: torch threads per device of each engine (local: one device
    at a time; flower: ``--client-cpus`` per device, ``cores // client_cpus`` devices in parallel)."""
    rows, records = [], {}
    for engine in ("local", "flower"):
        result = simulate(engine, data, workdir / f"{name}-{engine}", sim_args,
                          {**env, "OMP_NUM_THREADS": str(threads[engine])})
        records[engine] = result.pop("record")
        rows.append({"setup": name, "devices": n, "engine": engine, "threads": threads[engine], **result})
    same = all(records["local"][k] == records["flower"][k] for k in SAME)
    for row in rows:
        row["same_numbers"] = same
        row["vs_local_wall"] = row["wall_s"] / rows[0]["wall_s"]
        row["vs_local_run"] = row["run_s"] / rows[0]["run_s"]
    return rows


def deployment_traffic(workdir: Path, rounds: int) -> list[dict]:
    """Bytes per device per round of the example app on a SuperLink with two tiny devices."""
    from device_sdk.flower.launch import EXAMPLE_APP, LoopbackDeployment

    data = made_up_users(workdir / "deploy-data", 2)
    nodes = [{"data": str(data / f"user{i:02d}"), "user": i, "experts": 3 - i, "state": str(workdir / f"s{i}")}
             for i in range(2)]
    settings = {"strategy": "comigs-1gxs", "devices": 2, "seed": 1, "model": "tiny-llama", "rounds": rounds,
                "local-steps": 2, "batch": 4, "ctx": 64, "router-period": 2, "router-steps": 1, "precision": "fp32",
                "device": "cpu", "eval-tokens": 256, "peer-eval-tokens": 128, "timeout-s": 600.0}
    start = time.perf_counter()
    with LoopbackDeployment(nodes, workdir / "deploy") as deployment:
        record = deployment.run(EXAMPLE_APP, settings, timeout_s=900)
    wall = time.perf_counter() - start
    rows = []
    for entry in record["flower"]["traffic"]:
        for user in sorted(entry["up"].keys() | entry["down"].keys()):
            rows.append({"round": entry["round"], "device": user, "down_kib": entry["down"].get(user, 0) / 1024,
                         "up_kib": entry["up"].get(user, 0) / 1024})
    rows.append({"round": "all", "device": "wall s", "down_kib": wall, "up_kib": ""})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=32, help="tiny virtual devices (default 32)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--client-cpus", type=int, default=1, help="cores per virtual Flower device")
    parser.add_argument("--local-threads", type=int, default=None,
                        help="torch threads of the in-process engine (default: --client-cpus, the same threads per "
                             "device on both engines; tiny models run fastest on one)")
    parser.add_argument("--smollm2", action="store_true", help="also 4 SmolLM2 devices (minutes on 2 cores)")
    parser.add_argument("--no-deploy", action="store_true", help="skip the SuperLink traffic run")
    args = parser.parse_args()
    from device_sdk.flower.launch import OFFLINE_ENV

    cpus = os.cpu_count() or 1
    env = {**os.environ, **OFFLINE_ENV, "HF_HUB_OFFLINE": "1"}
    threads = {"local": args.local_threads or args.client_cpus, "flower": args.client_cpus}
    common = ["--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--seeds", "1",
              "--client-cpus", str(args.client_cpus), "--flower-cpus", str(cpus)]
    rows, traffic = [], []
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        workdir = Path(tmp)
        data = made_up_users(workdir / "tiny-data", args.devices)
        tiny = ["--model", "tiny-llama", "--strategies", "comigs-1gxs", "--experts", "3", "--batch", "4", "--ctx",
                "64", "--router-period", "2", "--router-steps", "1", "--precision", "fp32", "--eval-tokens", "512",
                "--peer-eval-tokens", "128", *common]
        rows += compare("tiny-llama", data, args.devices, tiny, workdir, env, threads)
        if args.smollm2:
            if not SHARED.is_dir():
                print(f"--smollm2: no data at {SHARED}; skipped", file=sys.stderr)
            else:
                smol = ["--model", "smollm2-135m", "--strategies", "comigs-1gxs", "--experts", "3,2,2,1", "--batch",
                        "4", "--ctx", "128", "--router-period", "2", "--router-steps", "1", "--eval-tokens", "1024",
                        "--peer-eval-tokens", "512", "--train-prefix", "16384", *common]
                rows += compare("smollm2-135m", SHARED, 4, smol, workdir, env, threads)
        if not args.no_deploy:
            traffic = deployment_traffic(workdir, args.rounds)
    columns = ["setup", "devices", "engine", "threads", "wall_s", "run_s", "peak_rss_mib", "vs_local_wall",
               "vs_local_run", "same_numbers"]
    print(table(rows, columns))
    if traffic:
        print("\nSuperLink deployment (2 tiny devices, comigs-1gxs; round 0: init tensors up, version 0 down):")
        print(table(traffic, ["round", "device", "down_kib", "up_kib"]))
    path = write_json("flower", {"settings": vars(args), "engines": rows, "deployment_traffic": traffic})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
