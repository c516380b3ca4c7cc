"""Start-up time of the command and the package: `vi-lab --help`, `vi-lab train --help`, `import vi_lab`.

Each command runs in a fresh Python process (what a user waits for), in alternating rounds;
medians are reported. With ``--old DIR`` (a checkout of an earlier commit) the same
measurements of that checkout run in the same rounds, side by side:

    git worktree add /tmp/old a0f32d3
    python benchmarks/startup.py --rounds 10 --old /tmp/old --out benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}: {done.stderr[-500:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--old", type=Path, default=None, help="a checkout of an earlier commit, measured beside")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    py = sys.executable
    cases = {
        "vi-lab --help": ([py, "-m", "vi_lab", "--help"], ROOT),
        "vi-lab train --help": ([py, "-m", "vi_lab", "train", "--help"], ROOT),
        "python examples/vae_mnist.py --help": ([py, "examples/vae_mnist.py", "--help"], ROOT),
        "import vi_lab": ([py, "-c", "import vi_lab"], ROOT),
        "import vi_lab; vi_lab.fit": ([py, "-c", "import vi_lab; vi_lab.fit"], ROOT),
    }
    if a.old is not None:
        cases["before: python examples/vae_mnist.py --help"] = ([py, "examples/vae_mnist.py", "--help"], a.old)
        cases["before: import vi_lab"] = ([py, "-c", "import vi_lab"], a.old)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.rounds):
        for name, (cmd, cwd) in cases.items():
            times[name].append(timed(cmd, cwd))
    medians = {k: statistics.median(v) for k, v in times.items()}
    width = max(map(len, medians))
    for k, v in medians.items():
        print(f"{k:<{width}}  {v * 1000:7.0f} ms")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"median_seconds": medians, "rounds": a.rounds, "python": sys.version.split()[0],
                                     "date": time.strftime("%Y-%m-%d"), "load": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
