"""Command line of the device SDK: ``python -m device_sdk train-local ...``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import LB_MODES, MIXINGS, AdapterConfig, TrainConfig
from .errors import SDKError
from .local import LocalRunConfig, run_local
from .precision import PRECISIONS
from .strategies import DEFAULT_NETWORKED, NETWORKED

log = logging.getLogger("device_sdk")

DEVICE_HELP = ("where to train and evaluate: auto (default) = cuda when torch.cuda.is_available(), else cpu; "
               "cpu; cuda; cuda:N (one GPU by index)")
PRECISION_HELP = "auto: bf16 on a GPU that supports it or a CPU with native bf16, else fp32"


def _add_train_local(sub) -> None:
    p = sub.add_parser("train-local", help="personalise a base model on one user's data (no federation)")
    p.add_argument("--data", required=True, type=Path, help="user folder with train/valid/test.txt[.gz]")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (offline), tiny-gpt2, tiny-llama, a "
                   "Hugging Face model folder or hub id")
    p.add_argument("--out", required=True, type=Path, help="output folder (adapters, metrics.json, curves.png)")
    p.add_argument("--specialists", type=int, default=None, help="specialists per MLP block (overrides budget)")
    p.add_argument("--generalists", type=int, default=1, help="generalists per MLP block (default 1)")
    p.add_argument("--budget-mb", type=float, default=None, help="memory budget; picks the specialist count")
    p.add_argument("--budget-step-s", type=float, default=None,
                   help="with --budget-mb: also fit this many seconds per expert step")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-3, help="peak expert learning rate")
    p.add_argument("--router-lr", type=float, default=2e-3)
    p.add_argument("--router-period", type=int, default=30, help="tau")
    p.add_argument("--router-steps", type=int, default=10, help="s")
    p.add_argument("--lb-weight", type=float, default=0.01)
    p.add_argument("--lb-mode", choices=LB_MODES, default="switch")
    p.add_argument("--routing", choices=("auto", "dense", "sparse"), default="auto")
    p.add_argument("--mixing", choices=MIXINGS, default="mlp",
                   help="mlp: every expert a whole MLP (the paper's model); projection: gates per projection")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps (0: at the end)")
    p.add_argument("--eval-tokens", type=int, default=None, help="evaluate on the first N test tokens only "
                   "(default: the whole test set)")
    p.add_argument("--cache-dir", type=Path, default=None, help="converted models and token caches")


def _train_local(args: argparse.Namespace) -> int:
    adapter = AdapterConfig(rank=args.rank, alpha=args.alpha, n_generalists=args.generalists,
                            n_specialists=args.specialists if args.specialists is not None else 0,
                            routing=args.routing, mixing=args.mixing)
    train = TrainConfig(steps=args.steps, batch_size=args.batch, context=args.ctx, lr_experts=args.lr,
                        lr_router=args.router_lr, lb_weight=args.lb_weight, lb_mode=args.lb_mode,
                        router_period=args.router_period, router_steps=args.router_steps,
                        precision=args.precision, device=args.device, seed=args.seed, eval_every=args.eval_every)
    run = LocalRunConfig(data=args.data, model=args.model, out=args.out, adapter=adapter, train=train,
                         specialists_from_budget=args.specialists is None, budget_mb=args.budget_mb,
                         budget_step_s=args.budget_step_s,
                         eval_tokens=args.eval_tokens, cache_dir=args.cache_dir)
    metrics = run_local(run, progress=True)
    before, after = metrics["test"]["before"]["perplexity"], metrics["test"]["after"]["perplexity"]
    print(f"\n{metrics['user']}: test perplexity {before:.2f} -> {after:.2f} "
          f"({metrics['test']['after']['tokens']} tokens, {metrics['adapter']['n_specialists']} specialist(s)); "
          f"{metrics['train']['tokens_per_second']:.0f} train tokens/s, peak RSS {metrics['peak_rss_mb']:.0f} MiB")
    print(f"wrote {args.out}/metrics.json, {args.out}/curves.png and adapters in {args.out}/adapters")
    return 0


def _add_join(sub) -> None:
    p = sub.add_parser("join", help="take part in a federation (Algorithm 1) through an aggregator")
    p.add_argument("--server", required=True, help="aggregator URL, e.g. http://127.0.0.1:8700")
    p.add_argument("--data", required=True, type=Path, help="user folder with train/valid/test.txt[.gz]")
    p.add_argument("--state", type=Path, default=None, help="credentials and checkpoints (default: "
                   "./device-state/<data folder name>); restart with the same folder to resume")
    p.add_argument("--enroll-secret", default=None, help="the admin's enrollment secret (first start only)")
    p.add_argument("--budget-mb", type=float, default=None, help="memory budget; picks the specialist count")
    p.add_argument("--specialists", type=int, default=None, help="overrides --budget-mb")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10, help="expert steps per round (paper: 10)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--name", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--router-period", type=int, default=30)
    p.add_argument("--router-steps", type=int, default=10)
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--eval-tokens", type=int, default=0, help="test tokens for per-round perplexity "
                   "(0: skip, -1: whole test set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--strategy", default=DEFAULT_NETWORKED,
                   help=f"the federation's strategy: {', '.join(NETWORKED)} (default {DEFAULT_NETWORKED})")
    p.add_argument("--peer-eval-tokens", type=int, default=2048,
                   help="validation tokens per peer model when the strategy scores peers (pcl)")


def _join(args: argparse.Namespace) -> int:
    from .device import Device, DeviceConfig

    train = TrainConfig(steps=args.local_steps, batch_size=args.batch, context=args.ctx,
                        router_period=args.router_period, router_steps=args.router_steps, precision=args.precision,
                        device=args.device)
    cfg = DeviceConfig(server=args.server, data=args.data, state_dir=args.state or Path("device-state") / args.data.name,
                       enroll_secret=args.enroll_secret, model=args.model, name=args.name or args.data.name,
                       train=train, rounds=args.rounds, n_specialists=args.specialists, budget_mb=args.budget_mb,
                       eval_tokens=None if args.eval_tokens < 0 else args.eval_tokens, seed=args.seed,
                       cache_dir=args.cache_dir, strategy=args.strategy, peer_eval_tokens=args.peer_eval_tokens)
    device = Device(cfg)
    log.info("device %d: %d specialist(s), %d round(s) done of %d", device.device_id, device.adapter.n_specialists,
             device.completed_rounds, cfg.rounds)
    if cfg.eval_tokens != 0 and device.completed_rounds == 0:
        print(f"[{args.data.name}] round 0: base model  test ppl {device.test_perplexity():.2f}", flush=True)
    for report in device.rounds():
        ppl = "" if report.test_perplexity is None else f"  test ppl {report.test_perplexity:.2f}"
        print(f"[{args.data.name}] round {report.round}: {'uploaded' if report.accepted else 'late'}  "
              f"train loss {report.train_loss:.3f}  valid loss {report.valid_loss:.3f}{ppl}", flush=True)
    print(f"[{args.data.name}] done: synced to global version {device.global_version}", flush=True)
    return 0


def _add_init_federation(sub) -> None:
    p = sub.add_parser("init-federation", help="(admin) create a federation and upload its initial shared tensors")
    p.add_argument("--server", required=True)
    p.add_argument("--admin-token", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--min-devices", type=int, default=1)
    p.add_argument("--deadline-s", type=float, default=600.0)
    p.add_argument("--aggregation", choices=("mean", "token_weighted"), default="mean")
    p.add_argument("--enroll-secret", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default=DEFAULT_NETWORKED,
                   help=f"collaboration strategy every device runs: {', '.join(NETWORKED)}")
    p.add_argument("--max-experts", type=int, default=4,
                   help="hetlora-*/flexlora-*: the most experts a device may have (fixes the largest LoRA rank of "
                        "the global tensors; devices above it are refused at enrollment)")


def _init_federation(args: argparse.Namespace) -> int:
    from .client import AggregatorClient
    from .device import initial_shared_tensors

    from .strategies import networked_strategy

    strategy = networked_strategy(args.strategy)  # before anything is created on the server
    initial = initial_shared_tensors(args.model, args.rank, args.alpha, args.seed, strategy=args.strategy,
                                     max_experts=args.max_experts)
    client = AggregatorClient(args.server, args.admin_token)
    created = client.create_federation({"base_model": args.model, "rank": args.rank, "alpha": args.alpha,
                                        "min_devices": args.min_devices, "round_deadline_s": args.deadline_s,
                                        "aggregation": args.aggregation, "strategy": args.strategy,
                                        "shared_roles": sorted(r.value for r in strategy.shared_roles)},
                                       args.enroll_secret)
    client.set_initial(initial)
    print(json.dumps({"enroll_secret": created["enroll_secret"]}))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,2,2,2, got {text!r}")


def _user_ints(text: str) -> tuple[tuple[str, int], ...]:
    pairs = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        user, _, number = item.partition("=")
        try:
            pairs.append((user.strip(), int(number)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected USER=TOKENS pairs such as nl=16384,de=16384, got {item!r}")
    return tuple(pairs)


def _add_simulate(sub) -> None:
    from .sim import PRESETS
    from .strategies import ALL

    p = sub.add_parser("simulate", help="compare collaboration strategies on per-user data, in one process")
    p.add_argument("--data", required=True, type=Path, help="split folder with one folder per user")
    p.add_argument("--out", required=True, type=Path, help="report folder (runs are cached in OUT/runs)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="scaled: the paper's epochs and validation ratio at our compute (the results table); quick: the "
                        "same compute on all data; paper: the paper's settings; demo: minutes")
    p.add_argument("--strategies", type=lambda t: tuple(s.strip() for s in t.split(",") if s.strip()),
                   default=None, help=f"comma-separated, from: {', '.join(ALL)}")
    p.add_argument("--experts", type=_int_list, default=None,
                   help="LoRA modules per user for 1GXS/HetLoRA/FlexLoRA, e.g. 4,2,2,2 (users in name order)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--local-steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--ctx", type=int, default=None)
    p.add_argument("--router-period", type=int, default=None, help="tau")
    p.add_argument("--router-steps", type=int, default=None, help="s")
    p.add_argument("--seeds", type=_int_list, default=None, help="e.g. 1,2,3")
    p.add_argument("--ood", action="store_true", default=None,
                   help="validation/test = uniform mixture of all users' (out-of-distribution setting)")
    p.add_argument("--users", type=lambda t: tuple(t.split(",")), default=None, help="subset of user folders")
    p.add_argument("--train-tokens", type=_user_ints, default=None,
                   help="low-data users: train these on the first N tokens of their data only, e.g. de=16384,nl=16384")
    p.add_argument("--train-prefix", type=int, default=None,
                   help="every user trains on the first N tokens of its training data (preset scaled: 16384)")
    p.add_argument("--valid-prefix", type=int, default=None,
                   help="every user's validation data is its first N tokens (preset scaled: 8192)")
    p.add_argument("--mixing", choices=MIXINGS, default=None,
                   help="mlp: every expert a whole MLP (the paper's model, default); projection: gates per projection")
    p.add_argument("--lb-mode", choices=LB_MODES, default=None,
                   help="load balancing (default: each strategy's own: switch; importance for comigs-1gxs)")
    p.add_argument("--routing-layers", type=_int_list, default=None,
                   help="layers (1-based) shown in routing.html, e.g. 1,15,30 (default: first and last)")
    p.add_argument("--cached-only", action="store_true",
                   help="run nothing: report the runs already finished (while a long job is still going)")
    p.add_argument("--via-server", action="store_true", default=None,
                   help="aggregate through a real aggregator on loopback (same results as in-process)")
    p.add_argument("--model", default=None, help="default smollm2-135m")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP + " (default auto)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--eval-tokens", type=int, default=None, help="test tokens per user per evaluation (0: all)")
    p.add_argument("--cache-dir", type=Path, default=None)


def _simulate(args: argparse.Namespace) -> int:
    from .sim import with_preset
    from .sim.simulate import simulate

    cfg = with_preset(args.preset, data=args.data, strategies=args.strategies, experts=args.experts,
                      rounds=args.rounds, local_steps=args.local_steps, batch=args.batch, ctx=args.ctx,
                      router_period=args.router_period, router_steps=args.router_steps, seeds=args.seeds,
                      ood=args.ood, users=args.users, model=args.model, precision=args.precision,
                      eval_tokens=args.eval_tokens, cache_dir=args.cache_dir, via_server=args.via_server,
                      routing_layers=args.routing_layers, train_tokens=args.train_tokens,
                      train_prefix=args.train_prefix, valid_prefix=args.valid_prefix, mixing=args.mixing,
                      lb_mode=args.lb_mode, device=args.device)
    result = simulate(cfg, args.out, progress=True, cached_only=args.cached_only)
    print()
    print(result["files"]["results.md"].read_text())
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


COMMANDS = {"train-local": _train_local, "join": _join, "init-federation": _init_federation,
            "simulate": _simulate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_sdk", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_local(sub)
    _add_join(sub)
    _add_init_federation(sub)
    _add_simulate(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    try:
        return COMMANDS[args.command](args)
    except SDKError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
