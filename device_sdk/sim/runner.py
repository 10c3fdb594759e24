"""One strategy x seed of a simulated federation, in one process: every user's model shares one frozen base.

Each round, every user runs the device's round (:func:`device_sdk.round.run_device_round`: local training, bi-level
or as the strategy says, and its upload), the strategy's server rule merges the uploads (the same function a server
runs) and every user loads what it gets back through its receive step; then each user's test perplexity and router
statistics are recorded. Results are plain dicts (JSON), cached by the runner's caller.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapters import assign_tensors
from ..data import UserData, eval_windows, interleave
from ..device_select import model_device
from ..errors import ConfigError
from ..evaluate import autocast, evaluate, loss_with
from ..hostinfo import host
from ..inject import adapter_config, inject_adapters, routed_blocks
from ..models import BaseModel
from ..parts import Role, count_parameters
from ..round import load_initial, receive_global, run_device_round
from ..strategies import Strategy, make_strategy
from ..strategies.base import device_upload, own_loss_of
from ..tokenizer import Tokenizer
from ..train import init_train_state
from .config import SimConfig
from .resume import load_progress, save_progress

log = logging.getLogger(__name__)

#: Tokens per sample text in the routing report.
ROUTING_SAMPLE_TOKENS = 48


def user_model(base: nn.Module, strategy: Strategy, user: int, n_experts: int, seed: int,
               mixing: str = "mlp") -> nn.Module:
    """A model for one user: a structural copy of ``base`` that shares (does not copy) the frozen base weights,
    with the strategy's adapters injected (initialised from ``seed``; experts mixed as ``mixing`` says).

    Adapters are initialised on the CPU (the same numbers on every device) and then follow the base model to its
    device; the shared base weights are not copied.

    Returns:
        The user's model, on ``base``'s device.
    """
    memo = {id(p): p for p in base.parameters()}
    memo.update({id(b): b for b in base.buffers()})
    model = copy.deepcopy(base, memo)
    torch.manual_seed(seed)
    model = inject_adapters(model, replace(strategy.adapter_config(user, n_experts), mixing=mixing))
    model.to(model_device(base))  # moves the new adapters only: the shared base already lives there
    strategy.prepare(user, model)
    return model


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (e.g. aggregated on the CPU) into the model's parameters of the same names, on the
    parameters' device (checked first: names, shapes, dtypes, finite values)."""
    params = dict(model.named_parameters())
    assign_tensors({name: params[name] for name in tensors if name in params}, tensors, "aggregated tensors")


def pooled(users: list[UserData], eos: int | None) -> UserData:
    """All users' data for the centralized baseline: training streams concatenated (batches are random windows),
    validation and test interleaved document by document (any prefix, e.g. the expert-score batch, holds every
    user)."""
    train = np.concatenate([u.train for u in users])
    return UserData("all", train, *(interleave([u.split(s) for u in users], eos) for s in ("valid", "test")))


@torch.no_grad()
def expert_scores(model: nn.Module, x: torch.Tensor, precision: str) -> list[dict]:
    """Mean top-k gate per layer given to generalists and to specialists (summed within each group) over the
    tokens of ``x`` (B, T, any device: it is moved to the model's); empty for models without routers (paper
    Fig. 3 / 10)."""
    blocks = [b for b in routed_blocks(model) if b.router is not None]
    if not blocks:
        return []
    n_gen = adapter_config(model).n_generalists
    device = model_device(model)
    with autocast(precision, device):
        model(input_ids=x.to(device), use_cache=False)
    scores = []
    for block in blocks:
        mean = block.gates.float().mean(dim=0)  # (E,)
        scores.append({"generalist": float(mean[:n_gen].sum()) if n_gen else None,
                       "specialist": float(mean[n_gen:].sum()) if block.n_experts > n_gen else None,
                       "experts": [float(v) for v in mean]})
        block.router_probs = block.gates = None
    return scores


@torch.no_grad()
def routing_sample(model: nn.Module, tokenizer: Tokenizer, ids: np.ndarray, precision: str) -> dict | None:
    """Top-1 expert of every token at every routed layer for one text (``ids``, 1-D), with token strings."""
    blocks = [b for b in routed_blocks(model) if b.router is not None]
    if not blocks:
        return None
    device = model_device(model)
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)[None]  # (1, T)
    with autocast(precision, device):
        model(input_ids=x, use_cache=False)
    top1 = [block.gates.float().argmax(dim=-1).tolist() for block in blocks]
    for block in blocks:
        block.router_probs = block.gates = None
    cfg = adapter_config(model)
    return {"tokens": token_texts(tokenizer, ids), "top1": top1,
            "roles": ["generalist"] * cfg.n_generalists + ["specialist"] * cfg.n_specialists}


def routing_report(models: list[nn.Module], names: list[str], texts: dict[str, np.ndarray], tokenizer: Tokenizer,
                   precision: str) -> dict[str, list[dict]]:
    """``{user: [sample, ...]}``: every user's model on a stretch of every user's text (its own: in
    distribution; the others': out of distribution), see :func:`routing_sample`."""
    report = {}
    for model, name in zip(models, names):
        samples = []
        for other, stream in texts.items():
            sample = routing_sample(model, tokenizer, _sample_ids(stream, ROUTING_SAMPLE_TOKENS, tokenizer),
                                    precision)
            if sample is not None:
                samples.append({"text_of": other, **sample})
        if samples:
            report[name] = samples
    return report


def token_texts(tokenizer: Tokenizer, ids) -> list[str]:
    """The text each token adds to the decoded sequence. A byte-level token holding part of a multi-byte character
    adds nothing on its own (decoding it alone gives a replacement character); the token that completes the
    character carries all of it, so the pieces join to the readable text."""
    ids = [int(t) for t in ids]
    texts, previous = [], ""
    for i in range(len(ids)):
        decoded = tokenizer.decode(ids[: i + 1])
        if decoded.endswith("\ufffd"):  # an incomplete character so far: it shows with the token that ends it
            texts.append("")
            continue
        texts.append(decoded[len(previous):] if decoded.startswith(previous) else tokenizer.decode([ids[i]]))
        previous = decoded
    return texts


def _sample_ids(tokens: np.ndarray, n: int, tokenizer: Tokenizer | None = None) -> np.ndarray:
    """``n`` tokens from the middle of a stream (past any leading boilerplate), starting at a word boundary (the
    first token within the next ``n`` whose text begins with whitespace) when a tokenizer is given."""
    start = max(0, len(tokens) // 2 - n // 2)
    if tokenizer is not None:
        for offset in range(min(n, len(tokens) - start - 1)):
            piece = tokenizer.decode([int(tokens[start + offset])])
            if piece[:1].isspace():
                start += offset
                break
    return tokens[start : start + n]


def run_strategy(cfg: SimConfig, name: str, seed: int, users: list[UserData], base: BaseModel,
                 progress: bool = False, models_out: list | None = None, server=None,
                 sample_texts: dict[str, np.ndarray] | None = None, resume_dir: Path | None = None) -> dict:
    """Run ``rounds`` rounds of strategy ``name`` for every user and return its record (see module doc).

    Args:
        users: every user's token streams (already in-/out-of-distribution as configured).
        base: the frozen base model (shared by all users' models) and its tokenizer; its model is moved to
            ``cfg.device`` (in place, once: later runs find it there).
        models_out: if given, receives the trained models (one per user; one for ``centralized``).
        server: a running :class:`device_sdk.sim.via_server.LoopbackAggregator` to aggregate through (the server
            runs the strategy's server rule, each simulated device its receive step), or ``None`` for in-process.
        sample_texts: ``{user: token stream}`` to draw the routing report's texts from (default: each user's test
            stream; in the out-of-distribution setting pass each user's own-topic stream).
        resume_dir: save every finished round here and continue from the last saved one (in-process runs only;
            see :mod:`device_sdk.sim.resume`); the caller removes it once the record is stored.
    """
    start = time.perf_counter()
    strategy = make_strategy(name)
    experts = cfg.experts_for(len(users))
    members = [pooled(users, base.tokenizer.eos_token_id)] if strategy.centralized else users
    batch = cfg.batch * (len(users) if strategy.centralized else 1)
    base.model.to(cfg.device)  # a no-op once there; every user's model follows it (user_model)
    models = [user_model(base.model, strategy, i, experts[i], seed, cfg.mixing) for i in range(len(members))]
    train_cfgs = [cfg.train_config(strategy, i, seed, batch) for i in range(len(members))]
    states = [init_train_state(m, c) for m, c in zip(models, train_cfgs)]

    if strategy.collaborative:  # shared tensors (and FFA's fixed A) agree before the first round
        starts = strategy.initial([device_upload(i, m, strategy.initial_tensors(m)) for i, m in enumerate(models)])
        for m, t in zip(models, starts):
            load_initial(strategy, m, t)
    rounds_via = None
    if server is not None and strategy.collaborative:
        from .via_server import ServerRounds

        initial = max((strategy.initial_tensors(m) for m in models),  # the largest shapes (per-device ranks)
                      key=lambda tensors: sum(t.numel() for t in tensors.values()))
        rounds_via = ServerRounds(server, strategy, cfg.model, strategy.rank, adapter_config(models[0]).alpha,
                                  initial, [(m.name, adapter_config(model)) for m, model in zip(members, models)])

    def test_model(u: int) -> nn.Module:
        return models[0] if strategy.centralized else models[u]

    def evaluate_all() -> list[float]:
        return [evaluate(test_model(u), users[u].test, cfg.ctx, max(8, cfg.batch), cfg.precision,
                         max_tokens=cfg.eval_tokens, spread=True).perplexity for u in range(len(users))]

    score_batches = [next(eval_windows(m.valid, cfg.ctx, max(1, cfg.peer_eval_tokens // cfg.ctx)))[0]
                     for m in members]

    def peer_loss(i: int, tensors: dict[str, torch.Tensor]) -> float:
        return loss_with(models[i], tensors, members[i].valid, cfg.ctx, max(8, cfg.batch), cfg.precision,
                         max_tokens=cfg.peer_eval_tokens)

    names = [u.name for u in users]
    learned_routers = strategy.router_mode != "fixed"

    def score(model: nn.Module, x: torch.Tensor) -> list[dict]:
        return expert_scores(model, x, cfg.precision) if learned_routers else []

    if resume_dir is not None and rounds_via is not None:
        raise ConfigError("a run through the aggregator cannot resume mid-way (the server's rounds restart)")
    saved = None if resume_dir is None else load_progress(resume_dir, models, states, base.name)
    if saved is not None:
        log.info("%s seed %d: resuming after round %d from %s", name, seed, saved["round"], resume_dir)
        iterations, curves, scores = saved["iterations"], saved["test_ppl"], saved["expert_scores"]
        train_loss, strategy.state = saved["train_loss"], saved["strategy_state"]
        start -= saved["seconds"]
    else:
        iterations = [0]
        curves = {n: [p] for n, p in zip(names, evaluate_all())}
        scores = {m.name: [{"iteration": 0, "layers": score(model, x)}]
                  for m, model, x in zip(members, models, score_batches)}
        train_loss = {m.name: [] for m in members}
    rounds = range(1 if saved is None else saved["round"] + 1, cfg.rounds + 1)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=f"{name} seed {seed}", unit="round", leave=False)
    for number in rounds:
        uploads = []
        for i, (member, model) in enumerate(zip(members, models)):
            done = run_device_round(strategy, i, model, states[i], member, train_cfgs[i])
            states[i] = done.state
            train_loss[member.name].append(done.train_loss)
            uploads.append(done.upload)
        if strategy.collaborative:  # the server's rule, then every device's receive step
            if rounds_via is not None:
                downloads = rounds_via.exchange(uploads)
            else:
                downloads = [strategy.server_rule(uploads)] * len(uploads)
            for i, (model, merged, upload) in enumerate(zip(models, downloads, uploads)):
                receive_global(strategy, i, model, merged, own_loss_of(peer_loss, i), own=upload)
        iterations.append(states[0].step)
        for n, p in zip(names, evaluate_all()):
            curves[n].append(p)
        for m, model, x in zip(members, models, score_batches):
            scores[m.name].append({"iteration": states[0].step, "layers": score(model, x)})
        log.info("%s seed %d iteration %d: mean test ppl %.2f", name, seed, states[0].step,
                 float(np.mean([c[-1] for c in curves.values()])))
        if resume_dir is not None:
            save_progress(resume_dir, number, models, states, base.name,
                          {"iterations": iterations, "test_ppl": curves, "expert_scores": scores,
                           "train_loss": train_loss, "strategy_state": jsonable(strategy.state),
                           "seconds": time.perf_counter() - start})

    texts = sample_texts or {u.name: u.test for u in users}
    routing = routing_report([test_model(u) for u in range(len(users))], names, texts, base.tokenizer,
                             cfg.precision) if learned_routers else {}
    if rounds_via is not None:
        rounds_via.close()
    if models_out is not None:
        models_out.extend(models)
    final = {n: c[-1] for n, c in curves.items()}
    return {
        "strategy": name, "seed": seed, "users": names, "experts": list(experts),
        "iterations": iterations, "test_ppl": curves, "final": final,
        "mean": float(np.mean(list(final.values()))), "pretrained": {n: c[0] for n, c in curves.items()},
        "train_loss": train_loss, "expert_scores": scores, "routing": routing,
        "strategy_state": jsonable(strategy.state), "seconds": time.perf_counter() - start,
        "via_server": rounds_via is not None, "host": host(),  # the machine of the last round (runs resume elsewhere)
        "trainable_params": {n: sum(count_parameters(test_model(u))[r.value] for r in Role)  # adapters, all roles
                             for u, n in enumerate(names)},
    }


def jsonable(value):
    """``value`` with non-finite floats as ``None`` (``null`` in JSON), dict keys as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
