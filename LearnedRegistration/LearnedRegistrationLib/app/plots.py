"""Figures shared by the command line and the benchmarks (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..engine import metric_table

#: Metrics a λ sweep can be plotted against % folding.
SWEEP_METRICS = ("dice_mean", "sdlogj")


def plot_lambda_sweep(
    path,
    series: Mapping[str, Sequence[dict]],
    peers: Sequence[dict] = (),
    metric: str = "dice_mean",
    title: str = "λ sweep",
) -> Path:
    """Write a PNG of ``metric`` against % folding, one line per series, each point labelled with its λ.

    Args:
        path: PNG file to write (parent folders are created).
        series: label -> rows with ``lambda``, ``folding_percent`` and ``metric`` (a λ sweep).
        peers: single points (other tools) with ``label``, ``folding_percent`` and ``metric``.
        metric: a key of :data:`SWEEP_METRICS`.
        title: figure title.

    Returns:
        The path written.

    Raises:
        ValueError: for an unknown metric or no rows carrying it.
    """
    if metric not in SWEEP_METRICS:
        raise ValueError(f"plot_lambda_sweep() 'metric' must be one of {sorted(SWEEP_METRICS)}, got {metric!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = {k: [r for r in rows if r.get(metric) is not None] for k, rows in series.items()}
    if not any(usable.values()):
        raise ValueError(f"no λ-sweep rows with {metric!r} to plot")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (label, rows) in enumerate(usable.items()):
        rows = sorted(rows, key=lambda r: r["lambda"])
        ax.plot([r["folding_percent"] for r in rows], [r[metric] for r in rows], "o-", color=f"C{i}", label=label)
        for r in rows:
            ax.annotate(f"λ={r['lambda']:g}", (r["folding_percent"], r[metric]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7, color=f"C{i}")
    for j, p in enumerate(p for p in peers if p.get(metric) is not None):
        ax.plot(p["folding_percent"], p[metric], "s^Dvp"[j % 5], color=f"C{len(usable) + j}", ms=8, label=p["label"])
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel(f"{metric_table.metric('folding_percent').header}, symlog")
    ax.set_ylabel(metric_table.metric(metric).header)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
