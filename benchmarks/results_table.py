"""Issue 10's results table: every ``python -m device_sdk simulate`` command that makes it, lane by lane.

A lane is a list of simulate commands that run one after the other in one process of one thread; two lanes run
side by side on two cores. Runs are cached per (strategy, seed, settings) in ``<root>/<folder>/runs``, so running a
lane again skips every finished run, and a run cut off mid-way resumes from its last round (on the same machine).
Finished records are committed under ``docs/results/scaled/<folder>/runs``; ``--seed-cache`` copies them back into
the cache on a fresh machine, ``--collect`` copies new ones there and rebuilds each folder's report from them.
Every run imports ``device_sdk`` as of one commit, :data:`TABLE_CODE` (exported from git into the cache), so the
table keeps one set of numerics while main moves on.

    python benchmarks/results_table.py --list                         # every command of every lane
    python benchmarks/results_table.py --seed-cache                   # fresh machine: docs records -> cache
    python benchmarks/results_table.py --lane multilingual &          # one process per lane, in the background
    python benchmarks/results_table.py --lane topic &
    python benchmarks/results_table.py --collect                      # finished records and reports -> docs

Lanes (the paper's Tables 1, 2, 4 and 5 and section 4.3.2; users in name order):
  multilingual  core strategies, seeds 1 and 2 (Table 1); then, seed 1: CoMiGS-tr; CoMiGS-1GXS with 2,2,4,4 experts
                against HetLoRA/FlexLoRA matched on active parameters (Table 2); the other Table 4 rows, PCL and
                centralized; 1G1S without load balancing (Table 5); low-data German and Dutch with 8,8,2,2 experts
                (section 4.3.2); last, Table 2's runs with seed 2
  topic         the same with 2,4,4,2 experts (the paper's SlimPajama layout), without the low-data runs, and with
                1GXS with uniform and without load balancing (Table 5) for topic, then for multilingual
  topic-ood     core strategies, seeds 1 and 2, out of distribution (Table 1's third column)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.paper_tables import write_tables  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "results" / "scaled"
DATA = Path("..") / "shared" / "data"  # from ROOT, where every command runs (cache keys resolve it)
CORE = "local,fedavg,pfedmoe,comigs-2s,comigs-2g,comigs-1g1s"
TABLE4 = "local-moe-tr,fedavg-moe-tr,local-moe,fedavg-moe,ffa-lora,pcl,centralized"
HETERO = {"multilingual": "2,2,4,4", "topic": "2,4,4,2"}  # the paper's Table 2 layouts for these splits
#: The commit whose ``device_sdk`` makes every run of the table (the code of the 36 core runs). Lanes import it from
#: a copy exported from git (:func:`code_tree`), so main can change numerics (kernels, fusions, precision choices)
#: without mixing two sets of numerics in one table.
TABLE_CODE = "aa52b31b79c5395a49c00a5d34e0fd5c42ad3fcc"

log = logging.getLogger("results_table")


@dataclass(frozen=True)
class Step:
    """One simulate command of a lane: its ``--out`` folder, its settings (every argument but the strategies and
    seeds; one set per folder), the strategies and the seeds."""

    folder: str
    settings: tuple[str, ...]
    strategies: str
    seeds: str = "1"

    def arguments(self) -> list[str]:
        return [*self.settings, "--strategies", self.strategies, "--seeds", self.seeds]


def lanes() -> dict[str, list[Step]]:
    """``{lane: [step, ...]}`` in run order (most informative first). Each split's steps make its lane, but for
    balance: multilingual runs its three low-data runs (section 4.3.2) right after its 1G1S without load balancing,
    then its 1GXS with uniform load balancing (Table 5); the topic lane takes over multilingual's 1GXS without load
    balancing after its own two."""
    out: dict[str, list[Step]] = {}
    moved: list[Step] = []
    for split, experts in HETERO.items():
        data = ("--data", str(DATA / split))
        hetero = (*data, "--experts", experts)
        steps = [
            Step(f"scaled-{split}", data, CORE, "1,2"),
            Step(f"scaled-{split}", data, "comigs-tr"),
            Step(f"scaled-{split}-hetero", hetero, "comigs-1gxs,hetlora-active,flexlora-active"),
            Step(f"scaled-{split}", data, TABLE4),
            Step(f"scaled-{split}-lbnone", (*data, "--lb-mode", "none"), "comigs-1g1s"),
        ]
        balancing = [Step(f"scaled-{split}-hetero-lbnone", (*hetero, "--lb-mode", "none"), "comigs-1gxs"),
                     Step(f"scaled-{split}-hetero-lbswitch", (*hetero, "--lb-mode", "switch"), "comigs-1gxs")]
        if split == "multilingual":
            steps.append(Step(f"scaled-{split}-lowdata",
                              (*data, "--experts", "8,8,2,2", "--train-tokens", "de=4096,nl=4096"),
                              "comigs-1gxs,comigs-1g1s,local"))
            steps.append(balancing[1])
            moved = balancing[:1]
        else:
            steps += balancing + moved
        # Table 2 with one seed leaves 4 user pairs: a second seed narrows what its intervals can tell apart
        steps.append(Step(f"scaled-{split}-hetero", hetero, "comigs-1gxs,hetlora-active,flexlora-active", "2"))
        out[split] = steps
    out["topic-ood"] = [Step("scaled-topic-ood", ("--data", str(DATA / "topic"), "--ood"), CORE, "1,2")]
    return out


def command(root: Path, folder: str, args: list[str], cached_only: bool = False) -> list[str]:
    """The full simulate command of one lane step's arguments (the scaled preset in bf16)."""
    return ([sys.executable, "-m", "device_sdk", "simulate", "--preset", "scaled", "--precision", "bf16"] + args
            + ["--out", str(root / folder)] + (["--cached-only"] if cached_only else []))


def code_tree(root: Path) -> Path:
    """``<root>/code-<sha>``: the ``device_sdk`` package of :data:`TABLE_CODE`, exported from this repository's git
    history the first time (into a temporary folder, then renamed, so a second lane never sees half a copy)."""
    target = root / f"code-{TABLE_CODE[:12]}"
    if (target / "device_sdk").is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", TABLE_CODE, "device_sdk"], cwd=ROOT,
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"cannot export the table's code {TABLE_CODE[:12]} from {ROOT}: "
                         f"{archive.stderr.decode().strip()} (a full clone of the repository has it; fetch it)")
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".code-"))
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(staging, filter="data")
    try:
        staging.rename(target)
    except OSError:  # another lane exported it first
        shutil.rmtree(staging)
    return target


def run_step(root: Path, step: Step) -> int:
    """Run one lane step with one thread, importing ``device_sdk`` from :func:`code_tree` (``python -P``: the
    repository root, where the command runs so that its relative ``--data`` paths hold, is not on ``sys.path``)."""
    cmd = command(root, step.folder, step.arguments())
    log.info("%s (device_sdk of %s)", " ".join(cmd[1:]), TABLE_CODE[:12])
    return subprocess.run([cmd[0], "-P", *cmd[1:]], cwd=ROOT, env=lane_env(root)).returncode


def lane_env(root: Path) -> dict[str, str]:
    """The environment of a lane's commands: one thread, offline hub, ``PYTHONPATH`` = :func:`code_tree`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "PYTHONPATH": str(code_tree(root))}


def seed_cache(root: Path) -> int:
    """Copy every committed record into the cache (never over an existing file); returns how many were copied."""
    copied = 0
    for record in sorted(DOCS.glob("*/runs/*.json")):
        target = root / f"scaled-{record.parent.parent.name}" / "runs" / record.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(record, target)
            copied += 1
    return copied


def folders() -> dict[str, tuple[tuple[str, ...], list[tuple[str, int]]]]:
    """``{folder: (settings, planned)}``: every folder's settings (one set per folder) and the ``(strategy, seed)``
    runs its lanes plan there, in run order."""
    out: dict[str, tuple[tuple[str, ...], list[tuple[str, int]]]] = {}
    for steps in lanes().values():
        for step in steps:
            settings, planned = out.setdefault(step.folder, (step.settings, []))
            if settings != step.settings:
                raise AssertionError(f"{step.folder}: two settings in one folder ({settings} and {step.settings})")
            runs = [(s, int(seed)) for seed in step.seeds.split(",") for s in step.strategies.split(",")]
            planned.extend(run for run in runs if run not in planned)
    return out


def collect(root: Path) -> None:
    """Copy new finished records of every folder into ``docs/results/scaled/<folder minus 'scaled-'>/runs`` and
    write each folder's report there from its committed records (every strategy and seed its lanes name that has
    finished; no model is loaded), then ``docs/results/scaled/tables.md`` (:func:`paper_tables.write_tables`)."""
    from device_sdk.__main__ import build_parser, sim_config
    from device_sdk.sim.simulate import write_report

    for folder, (settings, planned) in folders().items():
        docs = DOCS / folder.removeprefix("scaled-")
        new = [r for r in sorted((root / folder / "runs").glob("*.json")) if not (docs / "runs" / r.name).exists()]
        for record in new:
            (docs / "runs").mkdir(parents=True, exist_ok=True)
            shutil.copy2(record, docs / "runs" / record.name)
            log.info("new record: %s", docs / "runs" / record.name)
        union = Step(folder, settings, ",".join(dict.fromkeys(s for s, _ in planned)),
                     ",".join(map(str, sorted({seed for _, seed in planned}))))
        cfg = sim_config(build_parser().parse_args(command(root, folder, union.arguments())[3:]))
        found = {}
        for path in sorted((docs / "runs").glob("*.json")):
            record = json.loads(path.read_text())
            if path.stem == cfg.run_key(record["strategy"], record["seed"], record["users"]):  # these settings
                found[record["strategy"], record["seed"]] = record
        records = [found[run] for run in planned if run in found]
        if records:
            write_report(cfg, records, docs, missing=[run for run in planned if run not in found])
            log.info("report of %d runs: %s", len(records), docs / "results.md")
    tables = write_tables(DOCS, {folder.removeprefix("scaled-"): planned for folder, (_, planned) in folders().items()})
    log.info("the paper's tables beside ours: %s", tables)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--lane", choices=sorted(lanes()), help="run this lane's commands in order")
    parser.add_argument("--list", action="store_true", help="print every lane's commands and exit")
    parser.add_argument("--seed-cache", action="store_true", help="copy docs records into the cache first")
    parser.add_argument("--collect", action="store_true", help="copy new records and reports into docs")
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "comigs-sdk" / "sim",
                        help="folder of the simulations' --out folders (default: %(default)s)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the commands' relative --data paths, and the cache keys made from them, start here
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (args.lane or args.list or args.seed_cache or args.collect):
        parser.error("nothing to do: give --lane, --list, --seed-cache or --collect")
    if args.list:
        for lane, steps in lanes().items():
            print(f"# {lane}")
            for step in steps:
                print(" ".join(command(args.root, step.folder, step.arguments())[1:]))
        return 0
    if args.seed_cache:
        log.info("copied %d committed records into %s", seed_cache(args.root), args.root)
    if args.lane:
        for step in lanes()[args.lane]:
            if run_step(args.root, step) != 0:
                log.error("failed; the lane goes on with its next command")
    if args.collect:
        collect(args.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
