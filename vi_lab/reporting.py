"""Tables and JSON for reports: what the examples, the CLI and the gap tools print and write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
