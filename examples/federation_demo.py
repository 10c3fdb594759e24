"""A real federation on one machine: the aggregator on loopback and one device process per user.

Starts ``python -m aggregator serve`` on a port the system picks, creates the federation (``init-federation``),
then runs ``python -m device_sdk join`` for every user folder under --data with its own specialist count, and
prints each device's test perplexity per round as it comes. Ends with a table of test perplexity per device and
round.

    python examples/federation_demo.py --data data/multilingual --specialists de=3,fr=2,it=1,nl=0 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import shutil
import threading
import time
from pathlib import Path

import httpx

from device_sdk.loopback import start_aggregator, stop_aggregator

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("data/multilingual"))
    parser.add_argument("--specialists", default="de=3,fr=2,it=1,nl=0",
                        help="user=count pairs (users without one get 1)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="test tokens per round and device")
    parser.add_argument("--router-period", type=int, default=10)
    parser.add_argument("--router-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/federation"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per device process")
    parser.add_argument("--export", default="de", help="user whose personalised model is exported to .pte and "
                        ".onnx at the end, and verified against PyTorch ('none' to skip)")
    args = parser.parse_args()

    users = sorted(p for p in args.data.iterdir() if p.is_dir()) if args.data.is_dir() else []
    if not users:
        print(f"error: no user folders in {args.data}", file=sys.stderr)
        return 2
    counts = dict(pair.split("=") for pair in args.specialists.split(",") if pair)
    args.out.mkdir(parents=True, exist_ok=True)
    admin = "demo-admin-" + os.urandom(8).hex()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AGGREGATOR_ADMIN_TOKEN": admin, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    for old in (args.out / "aggregator", args.out / "devices"):  # a demo starts a new federation every time
        shutil.rmtree(old, ignore_errors=True)
    data_dir = args.out / "aggregator"
    (args.out / "aggregator.log").unlink(missing_ok=True)
    server, port = start_aggregator(data_dir, args.out / "aggregator.log", env)
    url = f"http://127.0.0.1:{port}"
    procs = []
    try:
        print(f"aggregator on {url} (data in {data_dir}); OpenAPI docs at {url}/docs", flush=True)
        init = subprocess.run([sys.executable, "-m", "device_sdk", "init-federation", "--server", url,
                               "--admin-token", admin, "--model", args.model, "--min-devices", str(len(users))],
                              env=env, capture_output=True, text=True)
        if init.returncode != 0:
            print(init.stderr[-3000:], file=sys.stderr)
            return 1
        secret = json.loads(init.stdout.strip().splitlines()[-1])["enroll_secret"]
        results: dict[str, dict[int, float]] = {u.name: {} for u in users}
        pattern = re.compile(r"^\[(\w+)\] round (\d+): .*test ppl ([\d.]+)")

        def follow(proc: subprocess.Popen) -> None:
            for line in proc.stdout:
                print(line, end="", flush=True)
                m = pattern.match(line)
                if m:
                    results[m.group(1)][int(m.group(2))] = float(m.group(3))

        for i, user in enumerate(users):
            n = int(counts.get(user.name, 1))
            cmd = [sys.executable, "-m", "device_sdk", "join", "--server", url, "--data", str(user),
                   "--state", str(args.out / "devices" / user.name), "--enroll-secret", secret,
                   "--specialists", str(n), "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
                   "--batch", str(args.batch), "--model", args.model, "--eval-tokens", str(args.eval_tokens),
                   "--router-period", str(args.router_period), "--router-steps", str(args.router_steps),
                   "--seed", str(i)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=open(
                args.out / f"device-{user.name}.log", "wb"), text=True)
            threading.Thread(target=follow, args=(proc,), daemon=True).start()
            procs.append((user.name, n, proc))
            print(f"device {user.name}: 1 generalist + {n} specialist(s)", flush=True)
        failed = [name for name, _, p in procs if p.wait() != 0]
        time.sleep(0.5)
        if failed:
            print(f"error: device(s) {failed} failed; see {args.out}/device-*.log", file=sys.stderr)
            return 1
        rounds = range(0, args.rounds + 1)
        print("\ntest perplexity per round (first " f"{args.eval_tokens} test tokens of each user)")
        print("| device | experts | " + " | ".join("base" if r == 0 else f"round {r}" for r in rounds) + " |")
        print("|---|---|" + "---|" * len(rounds))
        for name, n, _ in procs:
            print(f"| {name} | {n + 1} | " + " | ".join(f"{results[name].get(r, float('nan')):.2f}" for r in rounds)
                  + " |")
        history = httpx.get(url + "/status").json()["history"]
        (args.out / "results.json").write_text(json.dumps({"perplexity": results, "rounds": history}, indent=1))
        print(f"\nwrote {args.out}/results.json")
    finally:
        for _, _, p in procs:
            if p.poll() is None:
                p.kill()
        stop_aggregator(server)
    if args.export != "none":
        return export_device(args, env)
    return 0


def export_device(args: argparse.Namespace, env: dict) -> int:
    """Export one device's personalised model for a phone and print the verification numbers."""
    target = args.out / f"export-{args.export}"
    print(f"\nexporting device {args.export} to {target} (ExecuTorch + ONNX, verified against PyTorch) ...",
          flush=True)
    done = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(args.out / "devices" / args.export),
                           "--out", str(target), "--format", "all", "--data", str(args.data / args.export)],
                          env={**env, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True)
    (args.out / "export.log").write_text(done.stderr)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    print(done.stdout, end="")
    print(f"phone stand-in: python examples/phone_inference.py --model-dir {target} --prompt 'Der Zug'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
