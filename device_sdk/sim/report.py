"""Tables of a simulated comparison: ``results.json`` (every run) and ``results.md`` (the paper's layout)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..fileio import atomic_write_bytes
from ..strategies import ALL

#: Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

#: The strategies every other one is compared with, pair by pair: the first of these a comparison ran
#: (CoMiGS-1G1S with homogeneous models; CoMiGS-1GXS where devices hold different numbers of experts, as in the
#: paper's Table 2).
REFERENCES = ("comigs-1g1s", "comigs-1gxs")
REFERENCE = REFERENCES[0]


def reference_of(records: list[dict]) -> str | None:
    """The strategy a comparison's runs are measured against: the first of :data:`REFERENCES` among ``records``
    (``None``: none of them ran, so no paired differences are reported)."""
    ran = {r["strategy"] for r in records}
    return next((name for name in REFERENCES if name in ran), None)


def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df >= 1`` degrees of freedom."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_interval(values: list[float]) -> tuple[float, float, float] | None:
    """``(mean, low, high)``: the mean and its 95% t-interval; ``None`` for fewer than two values."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = t975(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def paired_difference(records: list[dict], strategy: str, reference: str = REFERENCE) -> dict | None:
    """Relative test-perplexity difference of ``strategy`` against ``reference`` among ``records`` (one comparison's
    runs), paired by (user, seed): :func:`paired_runs` of the two strategies' runs."""
    return paired_runs([r for r in records if r["strategy"] == strategy],
                       [r for r in records if r["strategy"] == reference])


def paired_runs(runs: list[dict], reference_runs: list[dict]) -> dict | None:
    """Relative test-perplexity difference of ``runs`` against ``reference_runs`` (run records, at most one per seed
    on each side), paired by (user, seed).

    Every user of every seed that both sides ran gives one value ``ppl / ppl_reference - 1``; the result is their
    mean with a 95% t-interval over those ``n`` pairs. The users of one seed share a federation, so the pairs are
    not fully independent: the interval is a yardstick for noise, not an exact test. The two sides may come from
    different settings (e.g. a load-balancing ablation against the default).

    Returns:
        ``{"n", "mean", "low", "high", "verdict"}`` (fractions; verdict ``better`` / ``worse`` when the interval
        excludes zero, else ``inside noise``), or ``None`` with fewer than two pairs.
    """
    own = {r["seed"]: r for r in runs}
    ref = {r["seed"]: r for r in reference_runs}
    diffs = [own[seed]["final"][u] / ref[seed]["final"][u] - 1
             for seed in sorted(set(own) & set(ref)) for u in ref[seed]["users"] if u in own[seed]["final"]]
    interval = mean_interval(diffs)
    if interval is None:
        return None
    mean, low, high = interval
    verdict = "better" if high < 0 else "worse" if low > 0 else "inside noise"
    return {"n": len(diffs), "mean": mean, "low": low, "high": high, "verdict": verdict}


def summarize(records: list[dict]) -> dict:
    """``{strategy: {"mean", "std", "seeds", "params", "per_user": {user: (mean, std)}, "vs_reference"}}`` over
    seeds, in table order. ``std`` (sample standard deviation over seeds of the mean over users) is ``None`` with
    one seed: one run has no spread to report. ``vs_reference`` is the paired difference against
    :func:`reference_of` the records (``None`` for the reference itself, or where no reference ran)."""
    reference = reference_of(records)
    by_strategy: dict[str, list[dict]] = {}
    for r in records:
        by_strategy.setdefault(r["strategy"], []).append(r)
    summary = {}
    for name in sorted(by_strategy, key=lambda n: ALL.index(n) if n in ALL else len(ALL)):
        runs = by_strategy[name]
        means = [r["mean"] for r in runs]
        users = runs[0]["users"]
        # records made before parameter counting lack it; a strategy's count is the same in every seed
        params = next((r["trainable_params"] for r in runs if r.get("trainable_params")), None)
        summary[name] = {
            "mean": statistics.fmean(means), "std": statistics.stdev(means) if len(means) > 1 else None,
            "seeds": [r["seed"] for r in runs],
            "params": statistics.fmean(params.values()) if params else None,
            "per_user": {u: (statistics.fmean(r["final"][u] for r in runs),
                             statistics.stdev([r["final"][u] for r in runs]) if len(runs) > 1 else None)
                         for u in users},
            "vs_reference": None if reference in (None, name) else paired_difference(records, name, reference),
        }
    return summary


def pretrained_mean(records: list[dict]) -> float | None:
    if not records:
        return None
    first = records[0]["pretrained"]
    return statistics.fmean(first.values())


def format_ppl(mean: float, std: float | None) -> str:
    """``"mean"``, or ``"mean (std)"`` where there is a spread over seeds."""
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ({std:.2f})"


def format_versus(diff: dict | None) -> str:
    """A paired difference (:func:`paired_runs`) as ``"+x.x% [low, high] worse"``; ``(noise)`` where the interval
    holds zero; empty for ``None``."""
    if diff is None:
        return ""
    text = f"{100 * diff['mean']:+.1f}% [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
    return text + (f" {diff['verdict']}" if diff["verdict"] != "inside noise" else " (noise)")


def _params(n: float | None) -> str:
    return "" if n is None else f"{n / 1e6:.2f}M"


def markdown(summary: dict, records: list[dict], title: str, settings: dict) -> str:
    """The comparison as Markdown: mean test perplexity over users (std over seeds, with two or more seeds), the
    trainable parameters per device, and every strategy's paired difference against the reference
    (:func:`reference_of`) with its 95% interval (a difference is called only when the interval excludes zero; no
    winner is marked), then per-user values."""
    lines = [f"# {title}", ""]
    reference = reference_of(records) or "the reference (none ran)"
    lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    base = pretrained_mean(records)
    if summary:
        users = next(iter(summary.values()))["per_user"].keys()
        lines += ["| strategy | mean test ppl (std over seeds) | seeds | trainable params per device | "
                  f"vs {reference}: mean paired difference [95% interval] over users x seeds |",
                  "|---|---|---|---|---|"]
        if base is not None:
            lines.append(f"| *pretrained* | {base:.2f} | | | |")
        for name, s in summary.items():
            lines.append(f"| {name} | {format_ppl(s['mean'], s['std'])} | {len(s['seeds'])} | {_params(s['params'])} | "
                         f"{format_versus(s['vs_reference'])} |")
        lines += ["", "Per user (mean over seeds):", "",
                  "| strategy | " + " | ".join(users) + " |", "|---|" + "---|" * len(users)]
        for name, s in summary.items():
            lines.append(f"| {name} | " + " | ".join(f"{m:.2f}" for m, _ in s["per_user"].values()) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, records: list[dict], title: str, settings: dict) -> tuple[Path, Path, dict]:
    """Write ``results.json`` (summary and every run) and ``results.md``; returns their paths and the payload
    written to ``results.json`` (``{"title", "settings", "summary", "runs"}``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    payload = {"title": title, "settings": settings, "summary": summary, "runs": records}
    json_path, md_path = out / "results.json", out / "results.md"
    atomic_write_bytes(json_path, json.dumps(payload, indent=1, default=str).encode())
    atomic_write_bytes(md_path, markdown(summary, records, title, settings).encode())
    return json_path, md_path, payload


def combined_markdown(results: list[dict]) -> str:
    """One table in the paper's Table 1 layout: a row per strategy, a column per data split (``results.json``
    payloads), each cell the mean test perplexity over users (std over seeds where there are two or more, and the
    seed count) and the paired difference against the column's reference (:func:`reference_of`) with its 95%
    interval; a last row names each column's reference."""
    columns = [r["title"] for r in results]
    names = [n for n in ALL if any(n in r["summary"] for r in results)]
    lines = ["| strategy | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    pretrained = [pretrained_mean(r["runs"]) for r in results]
    lines.append("| *pretrained* | " + " | ".join(f"{p:.2f}" if p else "" for p in pretrained) + " |")
    for name in names:
        cells = []
        for r in results:
            s = r["summary"].get(name)
            if s is None:
                cells.append("")
                continue
            versus = format_versus(s.get("vs_reference"))
            cells.append(f"{format_ppl(s['mean'], s['std'])}, n={len(s['seeds'])}" + (f"; {versus}" if versus else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| *paired against* | " + " | ".join(reference_of(r["runs"]) or "" for r in results) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m device_sdk.sim.report A/results.json B/results.json ...``: print the combined table."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m device_sdk.sim.report",
        description="One markdown table of several simulations' results.json files (one column each: mean test "
                    "perplexity +- std over seeds, the seed count, and the paired comparison with the reference).",
        epilog="example: python -m device_sdk.sim.report docs/results/scaled/*/results.json")
    parser.add_argument("results", nargs="+", type=Path, help="results.json written by python -m device_sdk simulate")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also draw every column's paired differences with their intervals into this PNG")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)} (simulate --out FOLDER writes FOLDER/results.json)")
    try:
        results = [json.loads(p.read_text()) for p in args.results]
    except ValueError as err:
        parser.error(f"not a results.json file: {err}")
    print(combined_markdown(results), end="")
    if args.plot is not None:
        from .figures import plot_paired

        picture = plot_paired(results, args.plot)
        print(f"\n{picture}" if picture else "\nno plot: no column has a reference strategy to pair against")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
