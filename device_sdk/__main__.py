"""Command line of the device SDK: ``python -m device_sdk COMMAND ...``; ``COMMAND --help`` describes each.

Symbols of the paper (CoMiGS, Algorithm 1) and their options:
  r       --rank           LoRA rank of every expert (paper: 8)
  alpha   --alpha          LoRA alpha; each update is scaled by alpha / sqrt(r) (eq. 4)
  tau     --router-period  the routers are updated after every tau expert steps (paper: 30)
  s       --router-steps   router steps per update, on validation batches (paper: 10)
  lambda  --lb-weight      weight of the load-balancing loss (eq. 5)
  T       --rounds         communication rounds (paper: 20)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .backends import BACKENDS
from .cli import (EVAL_TOKENS_HELP, HelpFormatter, add_verbose, example, nonnegative_int, option_for, option_message,
                  run_command, setup_logging, timed)
from .config import LB_MODES, MIXINGS, ROUTING_MODES, AdapterConfig, TrainConfig
from .errors import SDKError
from .federated.catalog import DEFAULT_NETWORKED, NETWORKED
from .precision import PRECISIONS
from .runfolder import RunFolder, claim_run_folder

log = logging.getLogger("device_sdk")

DEVICE_HELP = ("where to train and evaluate: auto = cuda when torch.cuda.is_available(), else cpu; cpu; cuda; "
               "cuda:N (one GPU by index)")
PRECISION_HELP = "auto: bf16 on a GPU that supports it or a CPU with native bf16, else fp32"
MODEL_HELP = ("base model: smollm2-135m (offline), tiny-gpt2 or tiny-llama (random, for tests), a Hugging Face "
              "model folder, or a hub id such as gpt2 (needs network access or a filled cache)")
COMPILE_HELP = ("run the decoder blocks through torch.compile in training steps: faster steps after a one-time "
                "compilation of about a minute (needs a C++ compiler on a CPU), the same numbers to float rounding")
ROUTER_PERIOD_HELP = "tau: the routers are updated after every tau expert steps"
ROUTER_STEPS_HELP = "s: router steps per router update, each on a fresh validation batch"
BATCH_HELP = "sequences per step, training and validation batches alike (paper: 64)"
CTX_HELP = "tokens per sequence (context length; paper: 128)"
BUDGET_STEP_HELP = "with --budget-mb: also fit this many seconds per expert step (default: no time limit)"
CACHE_HELP = "converted models and token caches (default: $DEVICE_SDK_CACHE or ~/.cache/device_sdk)"
RETRIES_HELP = ("retries of a request that failed transiently (connection refused, timeout, 5xx answer), waiting "
                "0.25 s, 0.5 s, ... up to 8 s between tries; a URL without http:// and any 4xx answer fail at once")
SERVER_HELP = "the aggregator's URL with its scheme, e.g. http://127.0.0.1:8700"
RANK_HELP = "r: LoRA rank of every expert and of the attention LoRA (paper: 8)"
ALPHA_HELP = "LoRA alpha: each LoRA update is scaled by alpha / sqrt(r) (paper eq. 4)"
FROM_FEDERATION = " (default: the federation's; a different value is an error)"
#: Folder rules (device_sdk/runfolder.py): train-local never continues a run; join resumes a device on the same
#: data; simulate caches runs by key, so any simulation may share its --out.
TRAIN_LOCAL_OUT = RunFolder("train-local")
JOIN_STATE = RunFolder("join", option="--state", resume_keys=("data",))
SIMULATE_OUT = RunFolder("simulate", resume_keys=())


def _parser(sub, name: str, help: str, description: str, *examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description, epilog=example(*examples),
                       formatter_class=HelpFormatter)
    add_verbose(p, top=False)
    return p


def _check_folder(path: Path, option: str, what: str) -> None:
    if not path.is_dir():
        raise SDKError(f"{option} {path} does not exist or is not a folder ({what})")


def _check_model(name: str | None) -> None:
    if name is not None:
        from .models import check_model_name

        check_model_name(name)


# train-local ---------------------------------------------------------------------------------------------------------
def _add_train_local(sub) -> None:
    p = _parser(sub, "train-local", "personalise a base model on one user's data (no federation)",
                "Personalise a base model on one user's data: every MLP block becomes a mixture of LoRA experts "
                "(generalists + specialists) mixed by a top-2 router; the experts train on the training set, the "
                "router on the validation set (bi-level). Prints test perplexity before and after.",
                "python -m device_sdk train-local --data data/multilingual/nl --specialists 1 --steps 150 "
                "--out runs/nl")
    p.add_argument("--data", required=True, type=Path, help="user folder with train/valid/test.txt[.gz]")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (adapters/, metrics.json, curves.png, run.json); must be new or empty")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds an earlier run (only folders this SDK wrote are deleted)")
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--specialists", type=int, default=None,
                   help="specialists per MLP block, never shared (default: from --budget-mb, else 1)")
    p.add_argument("--generalists", type=int, default=1, help="generalists per MLP block (shared in a federation)")
    p.add_argument("--budget-mb", type=float, default=None,
                   help="memory budget in MiB: picks the largest specialist count that fits (default: none)")
    p.add_argument("--budget-step-s", type=float, default=None, help=BUDGET_STEP_HELP)
    p.add_argument("--steps", type=int, default=100, help="expert steps (optimizer steps on training batches)")
    p.add_argument("--batch", type=int, default=8, help=BATCH_HELP)
    p.add_argument("--ctx", type=int, default=128, help=CTX_HELP)
    p.add_argument("--rank", type=int, default=8, help=RANK_HELP)
    p.add_argument("--alpha", type=float, default=16.0, help=ALPHA_HELP)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the experts (one-cycle schedule)")
    p.add_argument("--router-lr", type=float, default=2e-3, help="learning rate of the routers (constant)")
    p.add_argument("--router-period", type=int, default=30, help=ROUTER_PERIOD_HELP + " (paper: 30)")
    p.add_argument("--router-steps", type=int, default=10, help=ROUTER_STEPS_HELP + " (paper: 10)")
    p.add_argument("--lb-weight", type=float, default=0.01, help="lambda: weight of the load-balancing loss")
    p.add_argument("--lb-mode", choices=LB_MODES, default="switch",
                   help="load balancing: switch (uniform), importance (generalist-favoured, paper eq. 5), count / "
                        "importance-count (fractions from top-k memberships, eq. 6), none")
    p.add_argument("--routing", choices=ROUTING_MODES, default="auto",
                   help="dense: fixed shapes; sparse: each expert runs on its routed tokens only; auto: dense while "
                        "experts x rank <= 256")
    p.add_argument("--mixing", choices=MIXINGS, default="mlp",
                   help="mlp: every expert a whole MLP (the paper's model); projection: gates per projection")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of adapter initialisation and batch sampling")
    p.add_argument("--eval-every", type=int, default=0, help="validation loss every N expert steps (0: at the end)")
    p.add_argument("--eval-tokens", type=nonnegative_int, default=0, help=EVAL_TOKENS_HELP)
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_HELP)


def _train_local(args: argparse.Namespace) -> int:
    from .local import LocalRunConfig, run_local

    _check_model(args.model)
    _check_folder(args.data, "--data", "a user folder with train/valid/test.txt[.gz]")
    adapter = AdapterConfig(rank=args.rank, alpha=args.alpha, n_generalists=args.generalists,
                            n_specialists=args.specialists if args.specialists is not None else 0,
                            routing=args.routing, mixing=args.mixing)
    train = TrainConfig(steps=args.steps, batch_size=args.batch, context=args.ctx, lr_experts=args.lr,
                        lr_router=args.router_lr, lb_weight=args.lb_weight, lb_mode=args.lb_mode,
                        router_period=args.router_period, router_steps=args.router_steps,
                        precision=args.precision, device=args.device, seed=args.seed, eval_every=args.eval_every,
                        compile=args.compile)
    run = LocalRunConfig(data=args.data, model=args.model, out=args.out, adapter=adapter, train=train,
                         specialists_from_budget=args.specialists is None, budget_mb=args.budget_mb,
                         budget_step_s=args.budget_step_s,
                         eval_tokens=args.eval_tokens or None, cache_dir=args.cache_dir)
    claim_run_folder(args.out, TRAIN_LOCAL_OUT, _settings(args), args.overwrite, inputs=(args.data,))
    metrics = run_local(run, progress=True)
    before, after = metrics["test"]["before"]["perplexity"], metrics["test"]["after"]["perplexity"]
    print(f"\n{metrics['user']}: test perplexity {before:.2f} -> {after:.2f} "
          f"({metrics['test']['after']['tokens']} tokens, {metrics['adapter']['n_specialists']} specialist(s)); "
          f"{metrics['train']['tokens_per_second']:.0f} train tokens/s, peak RSS {metrics['peak_rss_mb']:.0f} MiB")
    print(f"wrote {args.out}/metrics.json, {args.out}/curves.png and adapters in {args.out}/adapters")
    return 0


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "overwrite", "enroll_secret",
                                                             "admin_token")}


# join ----------------------------------------------------------------------------------------------------------------
def _add_join(sub) -> None:
    p = _parser(sub, "join", "take part in a federation (Algorithm 1) through an aggregator",
                "Take part in a federation: each round, fetch the global shared tensors, train locally (bi-level) "
                "and upload the shared tensors; specialists and routers never leave the device. The base model, "
                "strategy, rank and alpha come from the federation. The server and the credentials are checked "
                "before the base model loads. Restart with the same --state to resume.",
                "python -m device_sdk join --server http://127.0.0.1:8700 --enroll-secret S "
                "--data data/multilingual/de --budget-mb 4000 --rounds 20")
    p.add_argument("--server", required=True, help=SERVER_HELP)
    p.add_argument("--data", required=True, type=Path, help="user folder with train/valid/test.txt[.gz]")
    p.add_argument("--state", type=Path, default=None, help="credentials and checkpoints (default: "
                   "./device-state/<data folder name>); restart with the same folder to resume")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the device in --state (credentials, checkpoints) and enroll afresh")
    p.add_argument("--enroll-secret", default=None,
                   help="the admin's enrollment secret (first start only; default: none, the device must be "
                        "enrolled already)")
    p.add_argument("--retries", type=nonnegative_int, default=9, help=RETRIES_HELP)
    p.add_argument("--budget-mb", type=float, default=None,
                   help="memory budget in MiB: picks the specialist count (default: none)")
    p.add_argument("--budget-step-s", type=float, default=None, help=BUDGET_STEP_HELP)
    p.add_argument("--specialists", type=int, default=None,
                   help="specialists per MLP block; overrides --budget-mb (default: from --budget-mb, else 1)")
    p.add_argument("--rounds", type=int, default=3, help="T: rounds to take part in (counted across restarts)")
    p.add_argument("--local-steps", type=int, default=10, help="expert steps per round (paper: 10)")
    p.add_argument("--model", default=None, help="base model" + FROM_FEDERATION)
    p.add_argument("--strategy", default=None, help=f"collaboration strategy, one of {', '.join(NETWORKED)}"
                   + FROM_FEDERATION)
    p.add_argument("--rank", type=int, default=None, help=RANK_HELP + FROM_FEDERATION)
    p.add_argument("--alpha", type=float, default=None, help=ALPHA_HELP + FROM_FEDERATION)
    p.add_argument("--name", default=None, help="device name shown to the admin (default: the data folder's name)")
    p.add_argument("--batch", type=int, default=8, help=BATCH_HELP)
    p.add_argument("--ctx", type=int, default=128, help=CTX_HELP)
    p.add_argument("--router-period", type=int, default=30, help=ROUTER_PERIOD_HELP + " (paper: 30)")
    p.add_argument("--router-steps", type=int, default=10, help=ROUTER_STEPS_HELP + " (paper: 10)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP + " (backend pytorch)")
    p.add_argument("--backend", choices=BACKENDS, default="pytorch",
                   help="how the device computes its gradients: pytorch (eager autograd) or executorch (an exported "
                        "ExecuTorch training program, fp32 on the CPU; the optimizers, checkpoints and uploads are "
                        "the same)")
    p.add_argument("--program", type=Path, default=None,
                   help="--backend executorch: the training program folder (python -m export --format pte-train); "
                        "default: <state>/train-program, exported there on the first start")
    p.add_argument("--eval-tokens", type=nonnegative_int, default=None,
                   help=EVAL_TOKENS_HELP + ", before the first round and after each (default: no evaluation)")
    p.add_argument("--seed", type=int, default=0, help="seed of adapter initialisation and batch sampling")
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_HELP)
    p.add_argument("--peer-eval-tokens", type=int, default=2048,
                   help="validation tokens per peer model when the strategy scores peers (pcl)")


def _join(args: argparse.Namespace) -> int:
    from .client import RetryPolicy, check_url
    from .device import Device, DeviceConfig

    check_url(args.server)
    _check_model(args.model)
    _check_folder(args.data, "--data", "a user folder with train/valid/test.txt[.gz]")
    train = TrainConfig(steps=args.local_steps, batch_size=args.batch, context=args.ctx,
                        router_period=args.router_period, router_steps=args.router_steps, precision=args.precision,
                        device=args.device, backend=args.backend, compile=args.compile,
                        program=str(args.program) if args.program is not None else None)
    eval_tokens = 0 if args.eval_tokens is None else (args.eval_tokens or None)  # DeviceConfig: 0 skips, None all
    state = args.state or Path("device-state") / args.data.name
    cfg = DeviceConfig(server=args.server, data=args.data, state_dir=state, enroll_secret=args.enroll_secret,
                       model=args.model, name=args.name, train=train, rounds=args.rounds,
                       rank=args.rank, alpha=args.alpha, n_specialists=args.specialists, budget_mb=args.budget_mb,
                       budget_step_s=args.budget_step_s, eval_tokens=eval_tokens, seed=args.seed,
                       cache_dir=args.cache_dir, strategy=args.strategy,
                       peer_eval_tokens=args.peer_eval_tokens, retry=RetryPolicy.retries(args.retries))
    claim_run_folder(state, JOIN_STATE, {"data": str(args.data.resolve()), "server": args.server}, args.overwrite,
                     inputs=(args.data,))
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


def _add_admin_connection(p) -> None:
    """The options of every admin command: the aggregator, the admin token, the retries."""
    p.add_argument("--server", required=True, help=SERVER_HELP)
    p.add_argument("--admin-token", required=True, help="the aggregator's admin token (<data-dir>/admin_token)")
    p.add_argument("--retries", type=nonnegative_int, default=9, help=RETRIES_HELP)


# init-federation -----------------------------------------------------------------------------------------------------
def _add_init_federation(sub) -> None:
    p = _parser(sub, "init-federation", "(admin) create a federation and upload its initial shared tensors",
                "Create the federation on an aggregator and upload global version 0 (the strategy's freshly "
                "initialised shared tensors). Prints the enrollment secret devices join with. The server and the "
                "admin token are checked before the base model loads.",
                "python -m device_sdk init-federation --server http://127.0.0.1:8700 "
                "--admin-token \"$(cat agg-data/admin_token)\" --min-devices 4")
    _add_admin_connection(p)
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP + "; every device must use it")
    p.add_argument("--rank", type=int, default=8, help=RANK_HELP)
    p.add_argument("--alpha", type=float, default=16.0, help=ALPHA_HELP)
    p.add_argument("--min-devices", type=int, default=1, help="a round never closes with fewer reports")
    p.add_argument("--deadline-s", type=float, default=600.0,
                   help="after this many seconds a round closes with whoever reported (at least --min-devices)")
    p.add_argument("--aggregation", choices=("mean", "token_weighted"), default="mean",
                   help="how the server averages the uploads of mean-rule strategies")
    p.add_argument("--enroll-secret", default=None, type=_secret("--enroll-secret"),
                   help="the secret devices enroll with (default: generated)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial shared tensors")
    p.add_argument("--strategy", default=DEFAULT_NETWORKED,
                   help=f"collaboration strategy every device runs: {', '.join(NETWORKED)}")
    p.add_argument("--max-experts", type=int, default=4,
                   help="hetlora-*/flexlora-*: the most experts a device may have (fixes the largest LoRA rank of "
                        "the global tensors; devices above it are refused at enrollment)")
    p.add_argument("--initial-adapter", type=Path, default=None, metavar="DIR",
                   help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) of the same "
                        "base model and LoRA ranks; it seeds the attention LoRA and the generalist (expert 0) of "
                        "global version 0 (e.g. the output of `python -m export --format peft`)")
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_HELP)


def _init_federation(args: argparse.Namespace) -> int:
    from .client import AggregatorClient, RetryPolicy
    from .device import initial_shared_tensors
    from .strategies import networked_strategy

    strategy = networked_strategy(args.strategy)  # before anything is created on the server
    _check_model(args.model)
    with AggregatorClient(args.server, args.admin_token, RetryPolicy.retries(args.retries)) as client:
        client.health()
        client.check_admin_token()
        existing = client.federation_config()
        if existing is not None:
            raise SDKError(f"the aggregator at {client.url} already has a federation (model "
                           f"{existing.get('base_model')!r}, strategy {existing.get('strategy')!r}); devices join it "
                           "with `python -m device_sdk join`; a new federation needs a new aggregator --data-dir")
        with timed(f"initialising the shared tensors of {args.model} ({args.strategy})", log):
            initial = initial_shared_tensors(args.model, args.rank, args.alpha, args.seed, cache_dir=args.cache_dir,
                                             strategy=args.strategy, max_experts=args.max_experts,
                                             initial_adapter=args.initial_adapter)
        created = client.create_federation({"base_model": args.model, "rank": args.rank, "alpha": args.alpha,
                                            "min_devices": args.min_devices, "round_deadline_s": args.deadline_s,
                                            "aggregation": args.aggregation, "strategy": args.strategy,
                                            "shared_roles": sorted(r.value for r in strategy.shared_roles)},
                                           args.enroll_secret)
        client.set_initial(initial)
    print(json.dumps({"enroll_secret": created["enroll_secret"]}))
    return 0


def _secret(option: str):
    """An argparse type refusing a secret the server would refuse (:func:`device_sdk.federated.secrets.check_secret`),
    before the model loads."""
    from .federated.secrets import check_secret

    def parse(text: str) -> str:
        try:
            return check_secret(text, option)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


# simulate ------------------------------------------------------------------------------------------------------------
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
    from .federated.catalog import ALL
    from .sim import PRESETS, SimConfig

    def preset(text: str, field: str | None = None) -> str:
        default = "" if field is None else f", else {getattr(SimConfig, field)}"
        return f"{text} (default: the preset's{default})"

    p = _parser(sub, "simulate", "compare collaboration strategies on per-user data, in one process",
                "Compare collaboration strategies in a simulated federation: one process, one frozen base shared "
                "by every simulated device. Each finished (strategy, seed, settings) run is cached in OUT/runs and "
                "reused, so a table can be completed across sittings and an interrupted run resumes. Writes "
                "results.json, results.md, curves.png, experts-<strategy>.png and routing.html to --out. Options "
                "given explicitly override the --preset.",
                "python -m device_sdk simulate --data data/multilingual --preset quick --out runs/compare")
    p.add_argument("--data", required=True, type=Path, help="split folder with one folder per user")
    p.add_argument("--out", required=True, type=Path,
                   help="report folder; runs are cached in OUT/runs, so any simulation may reuse it, but not a "
                        "folder of another command")
    p.add_argument("--overwrite", action="store_true", help="delete --out, cached runs included, and start afresh")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="scaled: the paper's epochs and validation ratio at our compute (the results table); quick: "
                        "the same compute on all data; paper: the paper's settings; demo: minutes (default: none, "
                        "the defaults below)")
    p.add_argument("--strategies", type=lambda t: tuple(s.strip() for s in t.split(",") if s.strip()),
                   default=None, help=f"comma-separated, from: {', '.join(ALL)} (default: the preset's, else the six "
                   "core strategies)")
    p.add_argument("--experts", type=_int_list, default=None,
                   help="LoRA modules per user for 1GXS/HetLoRA/FlexLoRA, e.g. 4,2,2,2 (users in name order; "
                        "default: 2 for every user)")
    p.add_argument("--rounds", type=int, default=None, help=preset("T: communication rounds", "rounds"))
    p.add_argument("--local-steps", type=int, default=None, help=preset("expert steps per round", "local_steps"))
    p.add_argument("--batch", type=int, default=None, help=preset(BATCH_HELP, "batch"))
    p.add_argument("--ctx", type=int, default=None, help=preset(CTX_HELP, "ctx"))
    p.add_argument("--router-period", type=int, default=None, help=preset(ROUTER_PERIOD_HELP, "router_period"))
    p.add_argument("--router-steps", type=int, default=None, help=preset(ROUTER_STEPS_HELP, "router_steps"))
    p.add_argument("--seeds", type=_int_list, default=None, help="seeds, one run each, e.g. 1,2,3 (default: 1)")
    p.add_argument("--ood", action="store_true", default=None,
                   help="validation/test = uniform mixture of all users' (out-of-distribution setting)")
    p.add_argument("--users", type=lambda t: tuple(t.split(",")), default=None,
                   help="subset of user folders, e.g. de,nl (default: all)")
    p.add_argument("--train-tokens", type=_user_ints, default=None,
                   help="low-data users: train these on the first N tokens of their data only, e.g. de=16384,nl=16384 "
                        "(default: none)")
    p.add_argument("--train-prefix", type=int, default=None,
                   help="every user trains on the first N tokens of its training data (preset scaled: 16384; "
                        "default: all)")
    p.add_argument("--valid-prefix", type=int, default=None,
                   help="every user's validation data is its first N tokens (preset scaled: 8192; default: all)")
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
    p.add_argument("--engine", choices=("local", "flower"), default=None,
                   help="local: one process, one device after the other (default); flower: every simulated device a "
                        "node of Flower's simulation engine (Ray workers in parallel; needs the [flower] extra), the "
                        "same numbers")
    p.add_argument("--client-cpus", type=int, default=None,
                   help="--engine flower: CPU cores (torch threads) per simulated device (default: 1)")
    p.add_argument("--flower-cpus", type=int, default=None,
                   help="--engine flower: CPU cores Ray may use in all (default: every core)")
    p.add_argument("--model", default=None, help=MODEL_HELP + " (default: smollm2-135m)")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP + " (default: auto)")
    p.add_argument("--device", default=None, help=DEVICE_HELP + " (default: auto)")
    p.add_argument("--compile", action="store_true", default=None, help=COMPILE_HELP + " (part of the cache key)")
    p.add_argument("--eval-tokens", type=nonnegative_int, default=None,
                   help=preset(EVAL_TOKENS_HELP + ", per user and evaluation", "eval_tokens"))
    p.add_argument("--peer-eval-tokens", type=int, default=None,
                   help=preset("validation tokens per model evaluation for PCL's trust in its peers and for the "
                               "expert-score plots", "peer_eval_tokens"))
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_HELP)


def sim_config(args: argparse.Namespace):
    """The :class:`device_sdk.sim.SimConfig` of parsed ``simulate`` arguments (the preset, then explicit options)."""
    from .sim import with_preset

    return with_preset(args.preset, data=args.data, strategies=args.strategies, experts=args.experts,
                       rounds=args.rounds, local_steps=args.local_steps, batch=args.batch, ctx=args.ctx,
                       router_period=args.router_period, router_steps=args.router_steps, seeds=args.seeds,
                       ood=args.ood, users=args.users, model=args.model, precision=args.precision,
                       eval_tokens=args.eval_tokens, cache_dir=args.cache_dir, via_server=args.via_server,
                       routing_layers=args.routing_layers, train_tokens=args.train_tokens,
                       train_prefix=args.train_prefix, valid_prefix=args.valid_prefix, mixing=args.mixing,
                       lb_mode=args.lb_mode, device=args.device, peer_eval_tokens=args.peer_eval_tokens,
                       engine=args.engine, client_cpus=args.client_cpus, flower_cpus=args.flower_cpus,
                       compile=args.compile)


def _simulate(args: argparse.Namespace) -> int:
    from .sim.simulate import simulate

    _check_model(args.model)
    _check_folder(args.data, "--data", "a split folder with one folder per user")
    cfg = sim_config(args)
    claim_run_folder(args.out, SIMULATE_OUT, {"data": str(args.data.resolve())}, args.overwrite, inputs=(args.data,))
    result = simulate(cfg, args.out, progress=True, cached_only=args.cached_only)
    print()
    print(result["files"]["results.md"].read_text())
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


# retire-device -------------------------------------------------------------------------------------------------------
def _add_retire_device(sub) -> None:
    p = _parser(sub, "retire-device", "(admin) retire a device: rounds stop waiting for it",
                "Retire an enrolled device: its token stops working and rounds stop waiting for it (a device whose "
                "state was lost and that enrolled again, a phone gone for good). Its uploads stay in their rounds. "
                "Device ids: the aggregator's page or GET /status/devices.",
                "python -m device_sdk retire-device --server http://127.0.0.1:8700 "
                "--admin-token \"$(cat agg-data/admin_token)\" --device-id 3")
    _add_admin_connection(p)
    p.add_argument("--device-id", required=True, type=int, help="the device's id")


def _retire_device(args: argparse.Namespace) -> int:
    from .client import AggregatorClient, RetryPolicy

    with AggregatorClient(args.server, args.admin_token, RetryPolicy.retries(args.retries)) as client:
        print(json.dumps(client.retire_device(args.device_id)))
    return 0


COMMANDS = {"train-local": _train_local, "join": _join, "init-federation": _init_federation,
            "retire-device": _retire_device, "simulate": _simulate}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m device_sdk`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m device_sdk", description=__doc__, formatter_class=HelpFormatter,
        epilog=example("python -m device_sdk train-local --data data/multilingual/nl --steps 150 --out runs/nl",
                       "python -m device_sdk join --help"))
    add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (each has --help)")
    _add_train_local(sub)
    _add_join(sub)
    _add_init_federation(sub)
    _add_retire_device(sub)
    _add_simulate(sub)
    return parser


def error_message(err: SDKError, command: str | None) -> str:
    """One line for the terminal, naming command-line options instead of configuration fields."""
    from .device import FederationMismatch

    if isinstance(err, FederationMismatch):
        option = option_for(err.field, command)
        return (f"{option} {err.mine!r} contradicts the federation's {err.field} {err.theirs!r} (at {err.server}); "
                f"leave {option} out to take the federation's")
    return option_message(str(err), command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: COMMANDS[args.command](args), args.command, args.verbose,
                       lambda err: error_message(err, args.command), log)


if __name__ == "__main__":
    sys.exit(main())
