"""Pictures of a simulated comparison: learning curves (paper Fig. 4-6, 9), expert scores (Fig. 3, 10) and the
paired differences to the reference strategy with their intervals (the results table as a picture)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_strategy(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for r in records:
        grouped.setdefault(r["strategy"], []).append(r)
    return grouped


def plot_learning_curves(records: list[dict], path: Path, title: str = "") -> Path:
    """Test perplexity vs iteration, one panel per user, one line per strategy (mean over seeds; band = min..max
    over seeds)."""
    plt = _pyplot()
    users = records[0]["users"]
    fig, axes = plt.subplots(1, len(users), figsize=(4.2 * len(users), 3.6), squeeze=False)
    for name, runs in _by_strategy(records).items():
        iters = runs[0]["iterations"]
        for ax, user in zip(axes[0], users):
            values = [[r["test_ppl"][user][i] for r in runs] for i in range(len(iters))]
            mean = [sum(v) / len(v) for v in values]
            (line,) = ax.plot(iters, mean, marker="o", ms=3, lw=1.3, label=name)
            if len(runs) > 1:
                ax.fill_between(iters, [min(v) for v in values], [max(v) for v in values], alpha=0.15,
                                color=line.get_color())
    from matplotlib.ticker import FormatStrFormatter

    for ax, user in zip(axes[0], users):
        ax.set_title(user)
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FormatStrFormatter("%.0f"))  # plain numbers on the log axis
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("test perplexity")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_expert_scores(records: list[dict], strategy: str, path: Path, title: str = "") -> Path | None:
    """Mean router weight of the generalist(s) (solid) and specialist(s) (dashed) per layer over iterations, one
    panel per user (first seed); darker = deeper layer. ``None`` if the strategy has no learned router."""
    runs = [r for r in records if r["strategy"] == strategy]
    if not runs or not any(s["layers"] for series in runs[0]["expert_scores"].values() for s in series):
        return None
    plt = _pyplot()
    run = runs[0]
    users = list(run["expert_scores"])
    fig, axes = plt.subplots(1, len(users), figsize=(4.2 * len(users), 3.4), squeeze=False)
    for ax, user in zip(axes[0], users):
        series = run["expert_scores"][user]
        iters = [s["iteration"] for s in series]
        n_layers = len(series[0]["layers"])
        if not n_layers:
            ax.text(0.5, 0.5, "no router (one expert)", ha="center", transform=ax.transAxes)
        for x in iters[1:]:  # the end of every round (scores are taken after each aggregation)
            ax.axvline(x, color="0.85", lw=0.8, zorder=0)
        one_role = n_layers and any(series[0]["layers"][0][role] is None for role in ("generalist", "specialist"))
        per_expert = one_role and "experts" in series[0]["layers"][0]
        for layer in range(n_layers):
            shade = 0.25 + 0.75 * layer / max(1, n_layers - 1)
            if per_expert:  # one kind of expert only (2S, 2G): the group's sum is 1, so show expert 0's share
                role = "generalist" if series[0]["layers"][0]["generalist"] is not None else "specialist"
                cmap = plt.cm.Oranges if role == "generalist" else plt.cm.Blues
                style = "-" if role == "generalist" else "--"
                ax.plot(iters, [s["layers"][layer]["experts"][0] for s in series], style, color=cmap(shade),
                        lw=1.2, marker=".", ms=3)
                continue
            for role, style, cmap in (("generalist", "-", plt.cm.Oranges), ("specialist", "--", plt.cm.Blues)):
                values = [s["layers"][layer][role] for s in series]
                if values[0] is not None:
                    ax.plot(iters, values, style, color=cmap(shade), lw=1.2, marker=".", ms=3)
        if per_expert:
            ax.set_title(f"{user} (weight of expert 0 of 2)")
        if not per_expert:
            ax.set_title(user)
        ax.set_xlabel("iteration (grey: end of a round)")
        ax.set_ylim(-0.05, 1.05)  # a line at exactly 0 or 1 (e.g. two specialists summed) stays visible
        ax.grid(alpha=0.3, axis="y")
    from matplotlib.lines import Line2D

    legend = [Line2D([], [], color=plt.cm.Oranges(0.3), ls="-", label="generalists, first layer"),
              Line2D([], [], color=plt.cm.Oranges(1.0), ls="-", label="generalists, last layer"),
              Line2D([], [], color=plt.cm.Blues(0.3), ls="--", label="specialists, first layer"),
              Line2D([], [], color=plt.cm.Blues(1.0), ls="--", label="specialists, last layer")]
    axes[0][-1].legend(handles=legend, fontsize=7, loc="center right")
    axes[0][0].set_ylabel("mean router weight (sum over the group)")
    fig.suptitle(title or f"{strategy}: expert scores per layer (orange: generalists, blue: specialists; "
                 "darker: deeper)")
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_paired(results: list[dict], path: Path) -> Path | None:
    """Every strategy's mean paired difference to its comparison's reference (``results.json`` payloads: one
    panel each) as a dot with its 95% interval: red where the interval lies above zero (worse than the reference),
    green below (better), grey where it holds zero (inside the noise). ``None`` if no comparison has a reference.
    """
    from .report import reference_of

    panels = [r for r in results if any(s.get("vs_reference") for s in r["summary"].values())]
    if not panels:
        return None
    plt = _pyplot()
    names = list(dict.fromkeys(n for r in panels for n, s in r["summary"].items() if s.get("vs_reference")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 1.3 + 0.42 * len(names)), sharey=True,
                             squeeze=False)
    colours = {"worse": "tab:red", "better": "tab:green", "inside noise": "0.45"}
    for ax, result in zip(axes[0], panels):
        for y, name in enumerate(names):
            diff = result["summary"].get(name, {}).get("vs_reference")
            if diff is None:
                continue
            mean, low, high = (100 * diff[k] for k in ("mean", "low", "high"))
            ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", ms=5, capsize=3,
                        color=colours[diff["verdict"]])
            ax.annotate(f"{mean:+.1f}% (n={diff['n']})", (high, y), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{result['title']}\nagainst {reference_of(result['runs'])}", fontsize=9)
        ax.set_xlabel("test perplexity vs reference, %\n(mean over users x seeds, 95% interval)", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        ax.margins(x=0.35)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].set_ylim(len(names) - 0.4, -0.6)  # top to bottom in table order, half a row of room around
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
