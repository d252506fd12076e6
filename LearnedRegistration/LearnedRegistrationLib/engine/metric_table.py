"""The one table of the metrics a registration reports: key, label, unit, format, direction.

Every place that shows metrics reads it: the panel's evaluation table and λ-sweep table, the
command line's summary line and ``lambda_sweep.json`` rows, the λ-sweep plots and the benchmark
tables. The keys are those of the metrics dictionary that the logic computes
(``bridge.logic.RegistrationLogic.computeRegistration``) and the benchmark scores; how each value is
computed lives in :mod:`metrics` (Learn2Reg: Dice, HD95, TRE, % folding, SDlogJ).

Pure Python (no torch), so that the Slicer panel can import it before PyTorch is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Metric:
    """How one metric is named and shown.

    Attributes:
        key: key in the metrics dictionary (and in ``metrics.json``).
        label: short name for tables and axes (DSC30: mean Dice of the worst 30 % of the labels;
            displacement error: distance to a known true displacement, mean or 95th percentile).
        unit: unit of the value ("mm", "%", "s", "GB") or "" when dimensionless.
        format: ``format()`` spec of the value (e.g. ".3f"), "" for text.
        lower_is_better: True for errors and costs, False for overlaps, None for a setting or a
            description (λ, device).
    """

    key: str
    label: str
    unit: str
    format: str
    lower_is_better: Optional[bool]

    @property
    def header(self) -> str:
        """Label with its unit, e.g. "HD95 (mm)"."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def text(self, value) -> str:
        """``value`` formatted for display; "—" when it is missing or not finite."""
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "—"
        if not self.format or not isinstance(value, (int, float)):
            return str(value)
        return format(value, self.format)


#: Every metric, in the order tables show them.
METRICS: tuple[Metric, ...] = (
    Metric("dice_mean", "Dice (mean)", "", ".3f", False),
    Metric("dice_mean_initial", "Dice before registration", "", ".3f", False),
    Metric("dsc30", "DSC30", "", ".3f", False),
    Metric("hd95_mean_mm", "HD95", "mm", ".2f", True),
    Metric("tre_mean_mm", "TRE", "mm", ".2f", True),
    Metric("tre_initial_mean_mm", "TRE before registration", "mm", ".2f", True),
    Metric("displacement_error_mean_mm", "Displacement error", "mm", ".2f", True),
    Metric("displacement_error_p95_mm", "Displacement error, p95", "mm", ".2f", True),
    Metric("folding_percent", "Folding (det J ≤ 0)", "%", ".4f", True),
    Metric("sdlogj", "SDlogJ", "", ".3f", True),
    Metric("lambda", "λ", "", ".2f", None),
    Metric("runtime_s", "Runtime", "s", ".1f", True),
    Metric("update_s", "λ update", "s", ".2f", True),
    Metric("peak_rss_gb", "Peak RSS", "GB", ".2f", True),
    Metric("device", "Device", "", "", None),
)

_BY_KEY = {m.key: m for m in METRICS}

#: Rows of the panel's evaluation table.
EVALUATION_KEYS = ("dice_mean", "dice_mean_initial", "hd95_mean_mm", "tre_mean_mm", "tre_initial_mean_mm",
                   "folding_percent", "sdlogj", "lambda", "runtime_s", "device")
#: Columns of a λ sweep (the panel's table, the command line's ``lambda_sweep.json``).
SWEEP_KEYS = ("lambda", "dice_mean", "hd95_mean_mm", "tre_mean_mm", "folding_percent", "sdlogj", "runtime_s", "update_s")
#: What the command line's one-line summary reports, when present.
SUMMARY_KEYS = ("dice_mean", "hd95_mean_mm", "tre_mean_mm", "displacement_error_mean_mm", "folding_percent",
                "sdlogj", "runtime_s")


def metric(key: str) -> Metric:
    """The :class:`Metric` of ``key``.

    Raises:
        KeyError: for a key that is not in :data:`METRICS`.
    """
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown metric {key!r}; known: {', '.join(_BY_KEY)}") from None


def summary(metrics: dict, keys=SUMMARY_KEYS) -> str:
    """"Dice 0.755, HD95 2.31 mm, ..." for the ``keys`` present in ``metrics`` with a numeric value."""
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            m = metric(key)
            parts.append(f"{m.label} {m.text(value)}" + (f" {m.unit}" if m.unit else ""))
    return ", ".join(parts)
