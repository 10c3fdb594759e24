"""Tables of a simulated comparison: ``results.json`` (every run) and ``results.md`` (the paper's layout)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..fileio import atomic_write_bytes
from ..strategies import ALL


def summarize(records: list[dict]) -> dict:
    """``{strategy: {"mean", "std", "seeds", "per_user": {user: (mean, std)}}}`` over seeds, in table order."""
    by_strategy: dict[str, list[dict]] = {}
    for r in records:
        by_strategy.setdefault(r["strategy"], []).append(r)
    summary = {}
    for name in sorted(by_strategy, key=lambda n: ALL.index(n) if n in ALL else len(ALL)):
        runs = by_strategy[name]
        means = [r["mean"] for r in runs]
        users = runs[0]["users"]
        summary[name] = {
            "mean": statistics.fmean(means), "std": statistics.pstdev(means) if len(means) > 1 else 0.0,
            "seeds": [r["seed"] for r in runs],
            "per_user": {u: (statistics.fmean(r["final"][u] for r in runs),
                             statistics.pstdev([r["final"][u] for r in runs]) if len(runs) > 1 else 0.0)
                         for u in users},
        }
    return summary


def pretrained_mean(records: list[dict]) -> float | None:
    if not records:
        return None
    first = records[0]["pretrained"]
    return statistics.fmean(first.values())


def markdown(summary: dict, records: list[dict], title: str, settings: dict) -> str:
    """The comparison as Markdown: mean test perplexity over users (std over seeds) with a rank marker, like the
    paper's Table 1, then per-user values."""
    lines = [f"# {title}", ""]
    lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    base = pretrained_mean(records)
    if summary:
        best = min(s["mean"] for s in summary.values())
        users = next(iter(summary.values()))["per_user"].keys()
        lines += ["| strategy | mean test ppl (std over seeds) | seeds | vs best |", "|---|---|---|---|"]
        if base is not None:
            lines.append(f"| *pretrained* | {base:.2f} | | |")
        for name, s in summary.items():
            mark = "**best**" if s["mean"] == best else f"+{100 * (s['mean'] / best - 1):.1f}%"
            lines.append(f"| {name} | {s['mean']:.2f} ({s['std']:.2f}) | {len(s['seeds'])} | {mark} |")
        lines += ["", "Per user (mean over seeds):", "",
                  "| strategy | " + " | ".join(users) + " |", "|---|" + "---|" * len(users)]
        for name, s in summary.items():
            lines.append(f"| {name} | " + " | ".join(f"{m:.2f}" for m, _ in s["per_user"].values()) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, records: list[dict], title: str, settings: dict) -> tuple[Path, Path]:
    """Write ``results.json`` (summary and every run) and ``results.md``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    payload = {"title": title, "settings": settings, "summary": summary, "runs": records}
    json_path, md_path = out / "results.json", out / "results.md"
    atomic_write_bytes(json_path, json.dumps(payload, indent=1, default=str).encode())
    atomic_write_bytes(md_path, markdown(summary, records, title, settings).encode())
    return json_path, md_path


def combined_markdown(results: list[dict]) -> str:
    """One table in the paper's Table 1 layout: a row per strategy, a column per data split (``results.json``
    payloads), each cell the mean test perplexity over users with its std over seeds and seed count."""
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
            best = min(v["mean"] for v in r["summary"].values())
            cell = f"{s['mean']:.2f} ({s['std']:.2f}, n={len(s['seeds'])})"
            cells.append(f"**{cell}**" if s["mean"] == best else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m device_sdk.sim.report A/results.json B/results.json ...``: print the combined table."""
    import sys

    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print("usage: python -m device_sdk.sim.report RESULTS.json [RESULTS.json ...]", file=sys.stderr)
        return 2
    print(combined_markdown([json.loads(Path(p).read_text()) for p in paths]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
