"""A real federation on one machine: the aggregator on loopback and one device process per user.

Starts ``python -m aggregator serve`` on a port the system picks, creates the federation (``init-federation``),
then runs ``python -m device_sdk join`` for every user folder under --data with its own specialist count, and
prints each device's test perplexity per round as it comes. Ends with a table of test perplexity per device and
round (part 1). Then it exports one device's personalised model to ExecuTorch and ONNX and verifies both against
PyTorch (part 2) and, with --compare, compares collaboration strategies with ``python -m device_sdk simulate``
(part 3), all side by side: the ExecuTorch lowering keeps one core busy for minutes, the ONNX export and the
comparison use the other.
``make demo`` runs it with small settings; ``make demo-full`` with the defaults below.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_sdk.cli import HelpFormatter, example, format_seconds  # noqa: E402
from device_sdk.errors import SDKError  # noqa: E402
from device_sdk.loopback import start_aggregator, stop_aggregator  # noqa: E402
from device_sdk.runfolder import RunFolder, claim_run_folder  # noqa: E402

#: The demo starts a new federation every time in its own --out (it never mixes with another command's folder).
DEMO_OUT = RunFolder("federation-demo", resume_keys=())
#: A log line of a child process (a progress bar may precede it on the same line): logger name and message.
LOG_LINE = re.compile(r" INFO ([\w.]+): (.*)$")
#: A prompt in each user's language for the phone stand-in.
PROMPTS = {"de": "Der Zug", "fr": "Le train", "it": "Il treno", "nl": "De trein"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python examples/federation_demo.py", description=__doc__, formatter_class=HelpFormatter,
        epilog=example("python examples/federation_demo.py --data data/multilingual --specialists de=3,fr=2,it=1,nl=0 "
                       "--rounds 2 --local-steps 4 --ctx 64 --eval-tokens 2048 --export nl "
                       "--compare '--preset demo --out runs/compare'"))
    parser.add_argument("--data", type=Path, default=Path("data/multilingual"),
                        help="split folder, one folder per user")
    parser.add_argument("--specialists", default="de=3,fr=2,it=1,nl=0",
                        help="user=count pairs (users without one get 1)")
    parser.add_argument("--model", default="smollm2-135m", help="base model of the federation")
    parser.add_argument("--rounds", type=int, default=3, help="T: communication rounds")
    parser.add_argument("--local-steps", type=int, default=10, help="expert steps per round (paper: 10)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--ctx", type=int, default=128, help="tokens per sequence (context length; paper: 128)")
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="test perplexity on the first N tokens of each test set (0: the whole test set), "
                             "before the first round and after each")
    parser.add_argument("--router-period", type=int, default=10,
                        help="tau: the routers are updated after every tau expert steps")
    parser.add_argument("--router-steps", type=int, default=5,
                        help="s: router steps per router update, each on a fresh validation batch")
    parser.add_argument("--out", type=Path, default=Path("runs/federation"),
                        help="demo folder (aggregator, device states, logs, results.json, export-<user> and "
                             "export-<user>-onnx); a new federation replaces the previous demo's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per device process")
    parser.add_argument("--export", default="de", help="user whose personalised model is exported to .pte and "
                        ".onnx at the end, and verified against PyTorch ('none' to skip)")
    parser.add_argument("--compare", default=None, metavar="SIMULATE_OPTIONS",
                        help="also compare collaboration strategies: `python -m device_sdk simulate --data DATA` with "
                             "these options, alongside the export (default: no comparison)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    users = sorted(p for p in args.data.iterdir() if p.is_dir()) if args.data.is_dir() else []
    if not users:
        print(f"error: no user folders in {args.data}", file=sys.stderr)
        return 2
    counts = dict(pair.split("=") for pair in args.specialists.split(",") if pair)
    try:
        claim_run_folder(args.out, DEMO_OUT, {"data": str(args.data.resolve())})
    except SDKError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    admin = "demo-admin-" + os.urandom(8).hex()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AGGREGATOR_ADMIN_TOKEN": admin, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    for old in (args.out / "aggregator", args.out / "devices"):  # a demo starts a new federation every time
        shutil.rmtree(old, ignore_errors=True)
    data_dir = args.out / "aggregator"
    (args.out / "aggregator.log").unlink(missing_ok=True)
    started = time.perf_counter()
    print(f"== part 1 of 3: a federation of {len(users)} devices ({', '.join(u.name for u in users)}), "
          f"{args.rounds} round(s) of {args.local_steps} expert steps", flush=True)
    server, port = start_aggregator(data_dir, args.out / "aggregator.log", env)
    url = f"http://127.0.0.1:{port}"
    procs = []
    try:
        print(f"aggregator on {url} (data in {data_dir}); OpenAPI docs at {url}/docs", flush=True)
        print(f"creating the federation ({args.model}, initial shared tensors) ...", flush=True)
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
                   "--batch", str(args.batch), "--ctx", str(args.ctx), "--eval-tokens", str(args.eval_tokens),
                   "--router-period", str(args.router_period), "--router-steps", str(args.router_steps),
                   "--seed", str(i)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=open(
                args.out / f"device-{user.name}.log", "wb"), text=True)
            threading.Thread(target=follow, args=(proc,), daemon=True).start()
            procs.append((user.name, n, proc))
            print(f"device {user.name}: 1 generalist + {n} specialist(s)", flush=True)
        print(f"each device loads {args.model}, measures the base model's test perplexity (round 0), then trains "
              f"and uploads round by round (logs: {args.out}/device-*.log) ...", flush=True)
        failed = [name for name, _, p in procs if p.wait() != 0]
        time.sleep(0.5)
        if failed:
            print(f"error: device(s) {failed} failed; see {args.out}/device-*.log", file=sys.stderr)
            return 1
        rounds = range(0, args.rounds + 1)
        tokens = ("the whole test set" if args.eval_tokens == 0
                  else f"{args.eval_tokens} tokens spread over the test set")
        print(f"\ntest perplexity per round ({tokens} of each user)")
        print("| device | experts | " + " | ".join("base" if r == 0 else f"round {r}" for r in rounds) + " |")
        print("|---|---|" + "---|" * len(rounds))
        for name, n, _ in procs:
            print(f"| {name} | {n + 1} | " + " | ".join(f"{results[name].get(r, float('nan')):.2f}" for r in rounds)
                  + " |")
        history = httpx.get(url + "/status").json()["history"]
        (args.out / "results.json").write_text(json.dumps({"perplexity": results, "rounds": history}, indent=1))
        print(f"\nwrote {args.out}/results.json (part 1 took {format_seconds(time.perf_counter() - started)})",
              flush=True)
    finally:
        for _, _, p in procs:
            if p.poll() is None:
                p.kill()
        stop_aggregator(server)
    code = export_and_compare(args, env)
    print(f"\nthe demo took {format_seconds(time.perf_counter() - started)}")
    return code


class Job:
    """A child process run alongside others: the log lines of the given loggers are shown, prefixed, as they come;
    the whole log goes to a file; when it ends, its output (stdout) is shown with the time it took, or, if it failed,
    the end of its log."""

    lock = threading.Lock()  # one job prints at a time

    def __init__(self, label: str, cmd: list[str], env: dict, log_path: Path, show: tuple[str, ...]) -> None:
        self.label, self.log_path, self.show = label, log_path, show
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._log = threading.Thread(target=self._follow, daemon=True)
        self._log.start()
        self._end = threading.Thread(target=self._finish, daemon=True)
        self._end.start()

    def _say(self, text: str, file=sys.stdout) -> None:
        with self.lock:
            print(text, file=file, flush=True)

    def _follow(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.proc.stderr:  # tqdm's carriage returns end lines here too: bars are not shown
                log.write(line)
                m = LOG_LINE.search(line)
                if m and m.group(1).startswith(self.show):
                    self._say(f"  [{self.label}] {m.group(2)}")

    def _finish(self) -> None:
        stdout = self.proc.stdout.read()
        code = self.proc.wait()
        self._log.join()
        took = format_seconds(time.perf_counter() - self.started)
        if code == 0:
            self._say(f"\n== {self.label}: done in {took} (log: {self.log_path})\n{stdout.rstrip()}")
        else:
            self._say(f"error: {self.label} failed after {took}; the end of {self.log_path}:\n"
                      f"{self.log_path.read_text(errors='replace')[-3000:]}", file=sys.stderr)

    def ok(self) -> bool:
        """Wait for the end; ``True`` if the process succeeded."""
        self._end.join()
        return self.proc.returncode == 0


def export_and_compare(args: argparse.Namespace, env: dict) -> int:
    """Part 2 (export one device for a phone: the ExecuTorch program and the ONNX model, each verified against
    PyTorch) and part 3 (compare strategies), all side by side: the ExecuTorch lowering is single-threaded and takes
    minutes, the ONNX export and the comparison share the other core."""
    jobs = []
    single = {**env, "OMP_NUM_THREADS": "1"}
    if args.export != "none":
        base = args.out / f"export-{args.export}"
        folders = {"pte": base, "onnx": base.with_name(base.name + "-onnx")}
        print(f"\n== part 2 of 3: exporting device {args.export} for a phone: ExecuTorch to {folders['pte']}, ONNX to "
              f"{folders['onnx']}, each verified against PyTorch (the ExecuTorch lowering takes several minutes)",
              flush=True)
        for fmt, folder in folders.items():
            cmd = [sys.executable, "-m", "export", "--checkpoint", str(args.out / "devices" / args.export), "--out",
                   str(folder), "--overwrite", "--format", fmt, "--data", str(args.data / args.export)]
            jobs.append(Job(f"export {fmt}", cmd, single, args.out / f"export-{fmt}.log", ("export.",)))
    if args.compare is not None:
        print("\n== part 3 of 3: comparing collaboration strategies in a simulated federation "
              f"(`simulate {args.compare}`{', alongside part 2' if jobs else ''})", flush=True)
        cmd = [sys.executable, "-m", "device_sdk", "simulate", "--data", str(args.data), *shlex.split(args.compare)]
        jobs.append(Job("compare", cmd, single if jobs else {**env, "OMP_NUM_THREADS": "2"},
                        args.out / "compare.log", ("device_sdk.sim.",)))
    failed = [job.label for job in jobs if not job.ok()]
    if args.export != "none" and not any(label.startswith("export") for label in failed):
        prompt = PROMPTS.get(args.export, "The")
        for folder in folders.values():
            print(f"phone stand-in: python examples/phone_inference.py --model-dir {folder} --prompt '{prompt}'")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
