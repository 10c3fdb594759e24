"""``python -m device_sdk simulate``: run every strategy x seed (cached run by run), then write the report."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..data import UserData, load_users, ood_mixture
from ..device_select import device_name
from ..errors import ConfigError
from ..fileio import atomic_write_bytes
from ..models import default_cache_dir, load_base_model
from ..strategies import make_strategy
from .config import SimConfig, cap_training
from .figures import plot_expert_scores, plot_learning_curves, plot_paired
from .report import write_results
from .resume import discard
from .routing_html import routing_page
from .runner import run_strategy
from .via_server import LoopbackAggregator

log = logging.getLogger(__name__)


def read_cached(path: Path) -> dict | None:
    """A cached run, or ``None`` if missing or unreadable (a torn or foreign file is recomputed, not trusted)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "final" in record else None


def data_fingerprint(users: list[UserData]) -> str:
    """sha256 of what the simulation trains, validates and tests on: every user's token streams after the cuts and
    mixtures. A run cached on other data (the data folder rebuilt, a file edited, another tokenizer behind the same
    model name) does not match it; the same streams from an upgraded tokenizer library do."""
    digest = hashlib.sha256()
    for user in users:
        digest.update(user.name.encode() + b"\0")
        for split in ("train", "valid", "test"):
            stream = np.ascontiguousarray(user.split(split), dtype=np.int64)
            digest.update(len(stream).to_bytes(8, "little") + stream.tobytes())
    return digest.hexdigest()[:16]


def _same_data(found: str | None, fingerprint: str, what: Path) -> None:
    """Refuse a cached run or partial run made on other data than this run's (records from before the fingerprint
    existed hold none and are trusted)."""
    if found is not None and found != fingerprint:
        raise ConfigError(f"{what} was made on other data than this run's (data fingerprint {found}, now "
                          f"{fingerprint}): the data or its tokenizer changed since. Use another --out, or delete "
                          f"{what} to run it again on the current data")


def _run(cfg: SimConfig, strategy: str, seed: int, users, base, progress: bool, texts, partial: Path) -> dict:
    chosen = make_strategy(strategy)
    if cfg.engine == "flower":
        if chosen.collaborative:
            try:
                from ..flower.launch import run_flower_simulation
            except ImportError as err:
                raise ConfigError(f"--engine flower needs Flower ({err}); install the [flower] extra: "
                                  "pip install -e '.[flower]'") from err
            return run_flower_simulation(cfg, strategy, seed, [u.name for u in users])
        log.info("%s shares nothing through a server: in-process", strategy)
    if not (cfg.via_server and chosen.collaborative):
        if cfg.via_server:
            log.info("%s shares nothing through a server: in-process", strategy)
        return run_strategy(cfg, strategy, seed, users, base, progress=progress, sample_texts=texts,
                            resume_dir=partial)
    with LoopbackAggregator() as server:
        return run_strategy(cfg, strategy, seed, users, base, progress=progress, server=server, sample_texts=texts)


def prepare_users(cfg: SimConfig, tokenizer, cache_dir: Path) -> tuple[list[UserData], dict | None]:
    """Every user's token streams as the simulation's devices train and test on them (every engine calls this).

    Returns:
        ``(users, texts)``: the users (out-of-distribution: valid and test are the mixture of all users'; training
        and validation cut as configured) and, out of distribution, ``{user: own test stream}`` for the routing
        report (``None`` otherwise: each user's test stream).
    """
    users = load_users(Path(cfg.data), tokenizer, list(cfg.users) if cfg.users else None,
                       cache_dir=Path(cache_dir) / "tokens")
    texts = None
    if cfg.ood:  # targets become the mixture; the routing report keeps each user's own-topic text
        texts = {u.name: u.test for u in users}
        eos = tokenizer.eos_token_id
        valid, test = ood_mixture(users, "valid", eos), ood_mixture(users, "test", eos)
        users = [UserData(u.name, u.train, valid, test) for u in users]
    # after the mixture: a validation prefix of the (interleaved) mixture still holds every user in equal shares
    return cap_training(users, cfg.train_tokens, cfg.train_prefix, cfg.valid_prefix), texts


def simulate(cfg: SimConfig, out: Path, progress: bool = False, cached_only: bool = False) -> dict:
    """Run the comparison and write ``results.json``, ``results.md``, ``curves.png``, ``experts-<strategy>.png``
    and ``routing.html`` to ``out``. Finished runs are cached in ``out/runs/`` and reused.

    Args:
        cached_only: run nothing; report the runs already cached (a partial table while a long job goes on).

    Returns:
        ``{"records", "files", "missing"}`` (``missing``: ``(strategy, seed)`` pairs not in the report).

    Raises:
        ConfigError: with ``cached_only``, if no run is cached yet.
    """
    out = Path(out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    base = load_base_model(cfg.model, cache_dir=cache_dir)
    users, texts = prepare_users(cfg, base.tokenizer, cache_dir)
    fingerprint = data_fingerprint(users)
    names = [u.name for u in users]
    cfg.experts_for(len(users))  # fail early on a wrong --experts list
    records, missing = [], []
    jobs = [(s, seed) for seed in cfg.seeds for s in cfg.strategies]
    for i, (strategy, seed) in enumerate(jobs, 1):
        path = runs_dir / f"{cfg.run_key(strategy, seed, names)}.json"
        record = read_cached(path)
        if record is not None:
            _same_data(record.get("data_fingerprint"), fingerprint, path)
        if record is None and cached_only:
            missing.append((strategy, seed))
            continue
        if record is None:
            log.info("[%d/%d] %s seed %d%s%s", i, len(jobs), strategy, seed, " via the aggregator" * cfg.via_server,
                     " on Flower's simulation engine" * (cfg.engine == "flower"))
            partial = runs_dir / "partial" / path.stem
            marker = partial / "data_fingerprint"
            _same_data(marker.read_text().strip() if marker.is_file() else None, fingerprint, partial)
            atomic_write_bytes(marker, fingerprint.encode())
            record = {**_run(cfg, strategy, seed, users, base, progress, texts, partial),
                      "data_fingerprint": fingerprint}
            atomic_write_bytes(path, json.dumps(record).encode())
            discard(partial)
        else:
            log.info("[%d/%d] %s seed %d: cached (%s)", i, len(jobs), strategy, seed, path.name)
        records.append(record)
    if not records:
        raise ConfigError(f"no finished run of these settings is cached in {runs_dir}; run without --cached-only")
    if missing:
        log.warning("%d of %d runs not finished yet (left out): %s", len(missing), len(jobs),
                    ", ".join(f"{s} seed {seed}" for s, seed in missing))
    files = write_report(cfg, records, out, missing)
    return {"records": records, "files": files, "missing": missing}


def write_report(cfg: SimConfig, records: list[dict], out: Path,
                 missing: list[tuple[str, int]] | tuple = ()) -> dict[str, Path]:
    """Write the report of ``records`` (finished runs of ``cfg``'s settings) into ``out``: ``results.json``,
    ``results.md``, ``curves.png``, ``paired.png``, ``experts-<strategy>.png`` and ``routing.html``.

    Args:
        missing: ``(strategy, seed)`` pairs of ``cfg`` not finished yet (named in the settings line).

    Returns:
        ``{file name: path}`` of what was written (strategies without a learned router get no expert plot).
    """
    out = Path(out)
    title = f"{Path(cfg.data).name}{' (out of distribution)' if cfg.ood else ''}"
    if cfg.train_tokens:
        title += " (low data: " + ", ".join(f"{u} {n} training tokens" for u, n in cfg.train_tokens) + ")"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("extra", "cache_dir")}
    settings.update(users=records[0]["users"], torch_threads=torch.get_num_threads(), cpus=os.cpu_count(),
                    machine=platform.machine(), device_name=device_name(cfg.device),
                    runs_missing=[f"{s} seed {seed}" for s, seed in missing])
    json_path, md_path, payload = write_results(out, records, title, settings)
    files = {"results.json": json_path, "results.md": md_path,
             "curves.png": plot_learning_curves(records, out / "curves.png", title)}
    for strategy in cfg.strategies:
        picture = plot_expert_scores(records, strategy, out / f"experts-{strategy}.png")
        if picture is not None:
            files[picture.name] = picture
    paired = plot_paired([payload], out / "paired.png")
    if paired is not None:
        files["paired.png"] = paired
    page = routing_page(records, out / "routing.html", title, cfg.routing_layers)
    if page is not None:
        files["routing.html"] = page
    return files
