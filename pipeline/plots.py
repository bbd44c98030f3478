"""Small matplotlib plots written into the run folder (matplotlib is imported only here, lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_training_curves(history: list[dict[str, Any]], path: Path, title: str = "classifier") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.runfolder import save_figure

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [h["loss"] for h in history], label="train loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE loss")
    if any("val_map" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val_map") for h in history], label="val mAP", color="tab:orange")
        ax2.set_ylabel("val mAP")
        ax2.set_ylim(0, 1)
    ax.set_title(title)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=2, frameon=False)
    save_figure(path, fig)
    plt.close(fig)
