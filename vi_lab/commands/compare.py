"""``vi-lab compare RUN_DIR...``: one table across saved runs of ``vi-lab train``.

Reads each run's ``metrics.json`` (what training measured: train and test ELBO, the
importance-sampled log p(x) with its K, seconds per epoch) and the ``eval_*.json`` files
``vi-lab eval`` wrote there, and prints one row per measurement, best log p(x) first.
``--out FILE`` also writes the rows as JSON (``.json``) or a Markdown table (``.md``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vi_lab import runs
from vi_lab.commands.evaluate import read_json
from vi_lab.reporting import format_table

COLUMNS = ("run", "guide", "D", "epochs", "data", "train ELBO", "test ELBO", "log p(x)", "K", "s/epoch")


@dataclass(frozen=True)
class Config:
    """What ``vi-lab compare`` was asked."""

    runs: tuple[str, ...]
    out: str | None = None


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The options of ``vi-lab compare``, declared once."""
    p = runs.parser(__doc__, prog)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by vi-lab train")
    p.add_argument("--out", default=None, help="also write the table: FILE.json or FILE.md")
    a = p.parse_args(argv)
    if a.out is not None and Path(a.out).suffix not in (".json", ".md"):
        p.error(f"--out must end in .json or .md, got {a.out!r}")
    return Config(tuple(a.runs), a.out)


def _num(value: Any, sem: Any = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" +/- {sem:.2f}" if isinstance(sem, (int, float)) and sem == sem else "")


def rows_of(run: str | Path) -> list[dict[str, Any]]:
    """The measurements of one run directory: its training metrics, then each ``vi-lab eval`` result.

    :param run: a directory written by ``vi-lab train``.
    :raises ValueError: when it holds neither ``metrics.json`` nor ``eval_*.json``.
    """
    run = Path(run)
    found: list[dict[str, Any]] = []
    metrics_path = run / "metrics.json"
    if metrics_path.is_file():
        m = read_json(metrics_path)
        cfg = m.get("config", {})
        if not {"guide", "latent_dim", "likelihood"} <= set(cfg):  # another command's run (cvae: log p(x | y))
            raise ValueError(f"{run} was not written by vi-lab train (its metrics are another command's); "
                             f"compare VAE runs of vi-lab train and their vi-lab eval results")
        found.append({"run": str(run), "guide": m.get("guide"), "D": cfg.get("latent_dim"), "epochs": m.get("epochs"),
                      "data": f"{m.get('dataset')} test ({m.get('eval_size')})", "train ELBO": m.get("train_elbo"),
                      "test ELBO": m.get("test_elbo"), "log p(x)": m.get("test_log_likelihood"),
                      "log p(x) sem": m.get("test_log_likelihood_sem"), "K": m.get("eval_samples"),
                      "s/epoch": m.get("seconds_per_epoch")})
    for path in sorted(run.glob("eval_*.json")):
        e = read_json(path)
        found.append({"run": str(run), "guide": e.get("guide"), "D": e.get("latent_dim"), "epochs": e.get("run_epochs"),
                      "data": f"{e.get('dataset')} {e.get('split')} ({e.get('eval_size')})", "train ELBO": None,
                      "test ELBO": e["elbo"]["mean"], "log p(x)": e["log_likelihood"]["mean"],
                      "log p(x) sem": e["log_likelihood"]["sem"], "K": e.get("eval_samples"), "s/epoch": None})
    if not found:
        raise ValueError(f"{run} holds no metrics.json or eval_*.json: give directories written by vi-lab train "
                         f"(and vi-lab eval)")
    return found


def main(cfg: Config) -> list[dict[str, Any]]:
    runs.one_process("compare")
    rows: list[dict[str, Any]] = []
    for run in cfg.runs:
        try:
            rows += rows_of(run)
        except ValueError as err:  # one unusable directory (another command's, damaged) does not stop the table
            if len(cfg.runs) == 1:
                raise
            print(f"skipped: {err}", file=sys.stderr)
    if not rows:
        raise ValueError(f"none of {', '.join(cfg.runs)} holds results of vi-lab train or vi-lab eval")
    rows.sort(key=lambda r: -(r["log p(x)"] if r["log p(x)"] is not None else float("-inf")))
    table = [COLUMNS] + [
        (r["run"], r["guide"] or "-", r["D"] if r["D"] is not None else "-", r["epochs"] if r["epochs"] is not None
         else "-", r["data"], _num(r["train ELBO"]), _num(r["test ELBO"]), _num(r["log p(x)"], r["log p(x) sem"]),
         r["K"] if r["K"] is not None else "-", _num(r["s/epoch"]))
        for r in rows]
    print("nats per datapoint (higher is better)\n")
    print(format_table(table))
    if cfg.out:
        out = Path(cfg.out)
        if out.suffix == ".json":
            runs.write_json(out, {"rows": rows, "units": "nats per datapoint (higher is better)"})
        else:
            lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table[1:]]
            out.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {out}")
    return rows


def run(argv: list[str] | None = None, prog: str | None = None) -> list[dict[str, Any]]:
    """``vi-lab compare RUN_DIR...``; user errors end in one line (exit status 1)."""
    return runs.run_command(parse_args, main, argv, prog)
