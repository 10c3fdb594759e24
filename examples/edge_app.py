"""Edge-app prototype: a phone that holds only exported programs joins a federation and trains through ExecuTorch.

The app holds
  --train-program    python -m export --format pte-train: train.pte (frozen base + forward/backward),
                     trainable.ptd (adapters by name), train_program.json
  --inference-program  python -m export --format pte: model.pte, base.ptd, adapters.ptd, adapter_keys.json and the
                     tokenizer
  --data             the user's text (train/valid/test.txt)
and no model code: it never builds or loads a PyTorch model. Each round it downloads the global shared tensors
(attention LoRA and generalists), writes them into the training program, runs the bi-level update through the
program (the SDK's AdamW, schedule and tau/s alternation over the program's own tensors), uploads the shared
tensors, and swaps the new adapters into the inference program (adapters.ptd) and scores the validation text with
it.

Both programs must come from one device checkpoint (same adapter shapes), e.g.:
  python -m export --checkpoint device-state/de --format pte-train --batch-size 4 --context 64 --out phone/train
  python -m export --checkpoint device-state/de --format pte --out phone/infer
  python examples/edge_app.py --server http://127.0.0.1:8700 --enroll-secret S --train-program phone/train \
      --inference-program phone/infer --data data/multilingual/de --state phone/state --rounds 2 --local-steps 4
Supports strategies whose receive step loads the global tensors as they are at one rank (CoMiGS, FedAvg).
Not included: resuming an interrupted app (the SDK's Device checkpoints; here a restart starts from the programs'
data files).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_sdk.backends.executorch import (  # noqa: E402
    ProgramGradients,
    ProgramModel,
    TrainProgram,
    program_valid_loss,
)
from device_sdk.client import AggregatorClient  # noqa: E402
from device_sdk.config import GRAPH_FIELDS, TrainConfig, graph_differences  # noqa: E402
from device_sdk.data import load_user_data  # noqa: E402
from device_sdk.enrollment import NotEnrolled, credentials  # noqa: E402
from device_sdk.round import load_initial, receive_global  # noqa: E402
from device_sdk.strategies import DEFAULT_NETWORKED, networked_strategy  # noqa: E402
from device_sdk.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402
from device_sdk.train import init_train_state, train_local  # noqa: E402
from export.executorch import PROGRAM, PteRunner, write_adapters  # noqa: E402

log = logging.getLogger("edge_app")


def load_tokenizer(folder: Path):
    """The tokenizer an export wrote next to its program (Hugging Face files or the byte tokenizer)."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    if spec.get("type") == ByteTokenizer.name:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(folder)), f"exported:{folder.resolve()}")


class EdgeApp:
    """One phone: a training program, an inference program, a tokenizer and the user's data."""

    def __init__(self, train_dir: Path, infer_dir: Path, data_dir: Path, server: str, state_dir: Path,
                 cfg: TrainConfig, enroll_secret: str | None = None, name: str = "edge-app") -> None:
        self.program = TrainProgram(train_dir)
        meta = self.program.meta
        self.cfg = replace(cfg, backend="executorch", batch_size=meta.batch_size, context=meta.context,
                           lb_mode=meta.lb_mode, lb_weight=meta.lb_weight, program=str(train_dir))
        self.adapters = ProgramModel(self.program)  # the program's tensors with their names and roles
        self.state = init_train_state(self.adapters, self.cfg)
        self.state.program = ProgramGradients(self.adapters, self.program)
        self.infer_dir = Path(infer_dir)
        self.tokenizer = load_tokenizer(self.infer_dir)
        self.data = load_user_data(data_dir, self.tokenizer)
        self.runner = PteRunner(self.infer_dir / PROGRAM)
        exported = json.loads((self.infer_dir / "manifest.json").read_text())["adapter"]
        differ = graph_differences(exported, meta.adapter, tuple(f for f in GRAPH_FIELDS if f != "routing"))
        if differ:  # the swap writes the training program's tensors into the inference program
            raise SystemExit(f"the training and inference programs compute different adapters ({', '.join(differ)});"
                             " export both from one checkpoint")
        with AggregatorClient(server) as probe:
            federation = probe.federation_config() or {}
        self.strategy = networked_strategy(federation.get("strategy") or DEFAULT_NETWORKED)
        self.strategy.rank = self.program.meta.adapter["rank"]
        self.client = self._connect(server, Path(state_dir), enroll_secret, name)
        if self.strategy.rank_per_device:
            raise SystemExit(f"the federation's strategy {self.strategy.name!r} cuts tensors to a rank per device; "
                             "this prototype supports strategies with one rank (CoMiGS, FedAvg)")
        self.last_round, self.version = 0, None

    def _connect(self, server: str, state_dir: Path, secret: str | None, name: str) -> AggregatorClient:
        state_dir.mkdir(parents=True, exist_ok=True)
        adapter = self.program.meta.adapter
        capabilities = ({k: adapter[k] for k in ("n_specialists", "n_generalists", "rank", "alpha")}
                        | {"base_model": self.program.meta.base_model, "strategy": self.strategy.name})
        try:
            found = credentials(server, state_dir, secret, name, capabilities)
        except NotEnrolled as err:
            raise SystemExit(f"{err}: pass --enroll-secret to enroll this app") from err
        return AggregatorClient(server, found["token"])

    def sync(self, version: int) -> None:
        """Load global version ``version`` into the training program (version 0: the federation's start)."""
        if version == self.version:
            return
        tensors = self.client.download_global(version)
        if version == 0:
            load_initial(self.strategy, self.adapters, tensors)
        else:
            receive_global(self.strategy, 0, self.adapters, tensors)
        self.version = version

    def swap_adapters(self) -> float:
        """Write the current adapters into the inference program and return its validation loss (nats/token)."""
        write_adapters(self.infer_dir, {n: p.detach() for n, p in self.adapters.named_parameters()})
        self.runner = PteRunner(self.infer_dir / PROGRAM)
        t = self.cfg.context
        ids = torch.as_tensor(self.data.valid[: t + 1].astype(np.int64))[None]
        logits = self.runner(ids[:, :-1])  # (1, T, V)
        return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]))

    def run_round(self) -> dict:
        delay = 0.2
        while True:
            current = self.client.current_round()
            if current["round"] > self.last_round and not current["you_reported"] and current["status"] == "open":
                break  # (a failed or closing round takes no uploads)
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)
        self.sync(current["base_version"])
        result, self.state = train_local(self.adapters, self.data, self.cfg, self.state,
                                         validate=lambda _: program_valid_loss(self.program, self.data.valid))
        self.version = None  # trained since: the next sync loads a global, the same version included
        train_loss = sum(r["lm"] for r in result.train) / max(1, len(result.train))
        self.client.upload(current["round"], self.strategy.shared_tensors(self.adapters), result.tokens,
                           {"train_loss": train_loss, "valid_loss": result.valid[-1]["loss"]})
        self.last_round = current["round"]
        return {"round": current["round"], "train_loss": train_loss, "valid_loss": result.valid[-1]["loss"],
                "inference_valid_loss": self.swap_adapters(), "seconds": result.seconds}

    def final_sync(self) -> None:
        """Wait for the last round to close, load its global tensors and swap them into the inference program."""
        while (current := self.client.current_round())["round"] <= self.last_round:
            time.sleep(0.5)
        self.sync(current["base_version"])
        self.swap_adapters()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python examples/edge_app.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--enroll-secret", default=None)
    parser.add_argument("--train-program", required=True, type=Path)
    parser.add_argument("--inference-program", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--state", required=True, type=Path, help="where the app keeps its credentials")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--router-period", type=int, default=30)
    parser.add_argument("--router-steps", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(steps=args.local_steps, router_period=args.router_period, router_steps=args.router_steps,
                      schedule_steps=args.local_steps * args.rounds, backend="executorch")
    app = EdgeApp(args.train_program, args.inference_program, args.data, args.server, args.state, cfg,
                  args.enroll_secret, args.data.name)
    for _ in range(args.rounds):
        report = app.run_round()
        print(f"[edge-app] round {report['round']}: train loss {report['train_loss']:.3f}, valid loss (training "
              f"program) {report['valid_loss']:.3f}, inference program after the swap: valid ppl "
              f"{math.exp(report['inference_valid_loss']):.2f} ({report['seconds']:.1f} s training)", flush=True)
    app.final_sync()
    print(f"[edge-app] done: synced to global version {app.version}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
