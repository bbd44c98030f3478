"""Small matplotlib plots written into the run folder (matplotlib is imported only here, lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.runfolder import save_figure


def plot_training_curves(history: list[dict[str, Any]], path: Path, title: str = "classifier",
                         loss_label: str = "BCE loss", metric: tuple[str, str] = ("val_map", "val mAP")) -> None:
    """Train loss per epoch, and the validation score ``metric`` (key, label) on a second axis when logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [h["loss"] for h in history], label="train loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel(loss_label)
    key, label = metric
    if any(key in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get(key) for h in history], label=label, color="tab:orange")
        ax2.set_ylabel(label)
        ax2.set_ylim(0, 1)
    ax.set_title(title)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=2, frameon=False)
    save_figure(path, fig)
    plt.close(fig)


def faithfulness_curves_figure(results: dict[str, dict[str, Any]]):
    """A matplotlib figure of every method's mean deletion and insertion curves side by side (``results``: the
    faithfulness section of metrics.json, ``pipeline.metrics.faithfulness``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2), sharey=True)
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher"), strict=True):
        for m, r in results.items():
            if r.get("curves"):
                ax.plot(r["curves"]["fraction"], r["curves"][kind], label=f"{m} ({r[kind + '_auc']:.3f})")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_title(f"{kind}: AUC {better} is better")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("class probability")
    return fig


def plot_faithfulness_curves(results: dict[str, dict[str, Any]], path: Path) -> None:
    """``faithfulness_curves_figure`` written to ``path`` (atomically)."""
    import matplotlib.pyplot as plt

    fig = faithfulness_curves_figure(results)
    save_figure(path, fig)
    plt.close(fig)
