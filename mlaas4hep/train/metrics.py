"""Classifier metrics (AUC, ROC, confusion matrix, score distributions) and their PNG plots.

:func:`evaluate` returns plain JSON-ready values (lists and floats), so the result can be
written to ``runs/<run_id>/metrics.json`` and into a model bundle as it is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

#: At most this many points of the ROC curve are kept (enough for a plot, small as JSON).
ROC_POINTS = 200
#: Bins of the score histograms over [0, 1].
SCORE_BINS = 50


def _thin(n: int, keep: int) -> np.ndarray:
    """Indices of at most ``keep`` points spread over ``n`` points, first and last included."""
    if n <= keep:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, keep).round().astype(np.int64))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def evaluate(y_true: Any, scores: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Score a binary classifier.

    ``y_true`` holds 0/1 labels, ``scores`` the model outputs in [0, 1] (same length).
    Returns ``n``, ``auc`` (None when only one class is present), ``roc`` (``fpr``,
    ``tpr``, ``thresholds``), ``confusion_matrix`` ``[[tn, fp], [fn, tp]]`` at
    ``threshold``, accuracy/precision/recall/f1 and per-class score histograms.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if y.size == 0:
        raise ValueError("no events to evaluate")
    positive = y > 0.5
    predicted = s >= threshold
    tp = int(np.sum(positive & predicted))
    fp = int(np.sum(~positive & predicted))
    fn = int(np.sum(positive & ~predicted))
    tn = int(np.sum(~positive & ~predicted))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall > 0
        else None
    )
    both_classes = 0 < int(positive.sum()) < y.size
    if both_classes:
        fpr, tpr, thresholds = roc_curve(positive, s)
        keep = _thin(fpr.size, ROC_POINTS)
        # roc_curve's first threshold is +inf: not JSON, and means "nothing selected".
        thresholds = np.where(np.isinf(thresholds), 1.0, thresholds)
        roc = {
            "fpr": fpr[keep].tolist(),
            "tpr": tpr[keep].tolist(),
            "thresholds": thresholds[keep].tolist(),
        }
        auc: float | None = float(roc_auc_score(positive, s))
    else:
        roc, auc = {"fpr": [], "tpr": [], "thresholds": []}, None
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    clipped = np.clip(s, 0.0, 1.0)
    return {
        "n": int(y.size),
        "n_positive": int(positive.sum()),
        "threshold": float(threshold),
        "auc": auc,
        "accuracy": float((tp + tn) / y.size),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "roc": roc,
        "score_distribution": {
            "bin_edges": edges.tolist(),
            "signal": np.histogram(clipped[positive], bins=edges)[0].tolist(),
            "background": np.histogram(clipped[~positive], bins=edges)[0].tolist(),
        },
    }


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and servers
    import matplotlib.pyplot as plt

    return plt


def _plot_roc(plt, metrics: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    roc = metrics["roc"]
    ax.plot(roc["fpr"], roc["tpr"], label=f"AUC = {metrics['auc']:.4f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title="ROC curve")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_scores(plt, metrics: dict[str, Any], path: Path) -> None:
    dist = metrics["score_distribution"]
    edges = np.asarray(dist["bin_edges"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("background", "signal"):
        counts = np.asarray(dist[name], dtype=np.float64)
        total = counts.sum()
        density = counts / (total * np.diff(edges)) if total else counts
        ax.stairs(density, edges, label=f"{name} ({int(total)})", fill=False, linewidth=1.5)
    ax.axvline(metrics["threshold"], color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="Model score", ylabel="Density", title="Score distribution")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_confusion(plt, metrics: dict[str, Any], path: Path) -> None:
    matrix = np.asarray(metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color)
    ax.set_xticks([0, 1], labels=["background", "signal"])
    ax.set_yticks([0, 1], labels=["background", "signal"])
    ax.set(xlabel="Predicted", ylabel="True", title=f"Confusion (threshold {metrics['threshold']})")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_history(plt, history: list[dict[str, float]], path: Path) -> None:
    names = [n for n in ("loss", "accuracy", "auc") if any(n in row for row in history)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    step = "chunk" if any("chunk" in row for row in history) else "epoch"
    epochs = [row.get(step, i) + 1 for i, row in enumerate(history)]
    for ax, name in zip(axes[0], names, strict=True):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + name, math.nan) for row in history]
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker="o", label=label)
        ax.set(xlabel=step.capitalize(), ylabel=name, title=name)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_plots(metrics: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write PNG plots of ``metrics`` (from :func:`evaluate`) into ``out_dir``.

    Writes ``roc.png`` (when both classes are present), ``scores.png`` and
    ``confusion_matrix.png`` (when there are test metrics) and, when ``metrics`` has a
    ``history`` list of per-epoch rows, ``history.png``. Returns the paths written.
    """
    plt = _figure()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plots = []
    if metrics.get("auc") is not None:
        plots.append(("roc.png", _plot_roc))
    if "score_distribution" in metrics:  # absent when the test split was empty
        plots += [("scores.png", _plot_scores), ("confusion_matrix.png", _plot_confusion)]
    for name, plot in plots:
        plot(plt, metrics, out / name)
        written.append(out / name)
    if metrics.get("history"):
        _plot_history(plt, metrics["history"], out / "history.png")
        written.append(out / "history.png")
    return written
