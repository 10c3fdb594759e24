"""Pictures of training runs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_learning_curves(train: list[dict], valid: list[dict], router: list[dict], path: Path,
                         title: str = "") -> Path:
    """Training LM loss per expert step, router (validation-batch) loss, and held-out validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["lm"] for r in train], lw=0.8, alpha=0.7, label="train LM loss")
    if router:
        ax.scatter([r["step"] for r in router], [r["lm"] for r in router], s=6, c="tab:green",
                   label="router step LM loss (valid batch)")
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", c="tab:red", label="valid loss")
    ax.set_xlabel("expert step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
