"""Report figures: log-log ROC curves and a query | generations sample grid (PNG, atomic).

Uses matplotlib's object API with the Agg canvas directly (no pyplot, no global backend
switch), so it works headless and does not disturb a caller's matplotlib state.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from t2i_mia.errors import DataError


def _save_atomic(fig: Figure, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    tmp = path + ".tmp"
    FigureCanvasAgg(fig)
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=fig.dpi)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_roc(path: str | os.PathLike,
             curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> None:
    """Writes a log-log ROC plot (Carlini et al. 2022 style) with the chance line.

    Args:
      path: the PNG to write (atomically).
      curves: name -> (fpr f[M], tpr f[M]) as from ``metrics.roc_curve``. Zero rates cannot
        be drawn on a log axis; they are drawn at the axis floor (half the smallest non-zero
        rate of any curve, at most 1e-3), so the curve's start stays visible.
    """
    cleaned = {}
    positives = []
    for name, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr, np.float64)
        tpr = np.asarray(tpr, np.float64)
        if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size == 0:
            raise DataError(f"plot_roc: curve {name!r}: fpr and tpr must be 1-D of equal "
                            f"non-zero length, got shapes {fpr.shape} and {tpr.shape}")
        if not (np.all(np.isfinite(fpr)) and np.all(np.isfinite(tpr))):
            raise DataError(f"plot_roc: curve {name!r} has non-finite rates")
        if fpr.min() < 0 or fpr.max() > 1 or tpr.min() < 0 or tpr.max() > 1:
            raise DataError(f"plot_roc: curve {name!r} has rates outside [0, 1]")
        cleaned[name] = (fpr, tpr)
        positives += [fpr[fpr > 0], tpr[tpr > 0]]
    pos = np.concatenate(positives) if positives else np.zeros(0)
    floor = min(1e-3, float(pos.min()) / 2.0) if pos.size else 1e-3

    fig = Figure(figsize=(5.0, 5.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([floor, 1.0], [floor, 1.0], "k--", lw=1, label="chance")
    for name, (fpr, tpr) in cleaned.items():
        # straight segments between ROC vertices (a tie group is a diagonal, not a step)
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), lw=1.5, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(floor, 1.0)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (log-log)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    _save_atomic(fig, path)


def plot_samples(path: str | os.PathLike, queries, generated, labels, captions) -> None:
    """Writes a grid: one row per query, ``query | generation 1..k``.

    Args:
      queries: uint8[M, H, W, 3]. generated: uint8[M, k, H, W, 3] (from the query's caption).
      labels: {0,1}[M] (1 = member: green frame, 0 = non-member: red frame).
      captions: M strings, shown (shortened) above each row.
    """
    q = np.asarray(queries)
    g = np.asarray(generated)
    y = np.asarray(labels)
    if q.ndim != 4 or q.shape[-1] != 3 or q.dtype != np.uint8:
        raise DataError(f"plot_samples: queries must be uint8[M, H, W, 3], got {q.dtype} "
                        f"{q.shape}")
    if g.ndim != 5 or g.shape[0] != q.shape[0] or g.shape[2:] != q.shape[1:] \
            or g.dtype != np.uint8:
        raise DataError(f"plot_samples: generated must be uint8[{q.shape[0]}, k, "
                        f"{', '.join(map(str, q.shape[1:]))}], got {g.dtype} {g.shape}")
    if y.shape != (q.shape[0],) or len(captions) != q.shape[0]:
        raise DataError(f"plot_samples: need {q.shape[0]} labels and captions, got "
                        f"{y.shape} labels and {len(captions)} captions")
    m, k = g.shape[0], g.shape[1]
    if m == 0:
        raise DataError("plot_samples: no samples to plot")
    cols = k + 1
    fig = Figure(figsize=(1.4 * cols, 1.6 * m), dpi=100)
    for i in range(m):
        member = bool(y[i])
        colour = "tab:green" if member else "tab:red"
        for j in range(cols):
            ax = fig.add_subplot(m, cols, i * cols + j + 1)
            ax.imshow(q[i] if j == 0 else g[i, j - 1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                for side in ax.spines.values():
                    side.set_edgecolor(colour)
                    side.set_linewidth(3)
                ax.set_ylabel("member" if member else "non-member", color=colour, fontsize=7)
                cap = str(captions[i])
                ax.set_title(cap if len(cap) <= 60 else cap[:57] + "...", fontsize=6,
                             loc="left")
            elif i == 0:
                ax.set_xlabel(f"gen {j}", fontsize=6)
                ax.xaxis.set_label_position("top")
    fig.tight_layout()
    _save_atomic(fig, path)
