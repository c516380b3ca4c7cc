"""Tables and JSON for reports: what the examples, the CLI and the gap tools print and write."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def format_table(rows: list[tuple[Any, ...]]) -> str:
    """Left-aligned text table; the first row is the header."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values as strings)."""
    path = Path(path)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path


def mean_sem(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of per-datapoint values (finite entries only).

    :param values: shape ``(N,)``.
    :returns: ``(mean, sem)``; the sem is NaN for a single value.
    """
    v = values.detach().double().flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    sem = (v.std() / math.sqrt(v.numel())).item() if v.numel() > 1 else float("nan")
    return v.mean().item(), sem
