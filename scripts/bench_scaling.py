"""Scaling of the Ray runner: the same job on 1 and on 2 actors (one torch thread each), side by side.

    python3 scripts/bench_scaling.py [--tokens 8192] [--job jobs/demo.yaml]

Prints tokens/s once the actors hold their model (the mining itself) and end to end, and the
2-actor/1-actor ratio. Each run is a fresh `mine run` process with its own embedded Ray.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"in ([\d.]+) s \(([\d,]+) tok/s overall; ([\d,]+) tok/s on (\d+) actor")


def run(job: str, tokens: int, actors: int, store: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "mining.cli", "run", job, "--store", str(store), "--no-progress",
           "--set", f"corpus.max_tokens={tokens}", "--set", f"compute.actors={actors}",
           "--set", "compute.cpus_per_actor=1", "--set", f"compute.shard_tokens={max(256, tokens // 8)}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    m = LINE.search(out)
    if not m:
        raise SystemExit(f"unexpected output: {out}")
    return float(m.group(3).replace(",", "")), float(m.group(2).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default=str(ROOT / "jobs" / "demo.yaml"))
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = {n: run(args.job, args.tokens, n, Path(tmp) / f"a{n}") for n in (1, 2)}
    print(f"job {args.job}, {args.tokens:,} tokens, one torch thread per actor")
    print(f"{'actors':>6}  {'mining tok/s':>12}  {'end-to-end tok/s':>16}")
    for n, (mining, overall) in rates.items():
        print(f"{n:>6}  {mining:>12,.0f}  {overall:>16,.0f}")
    print(f"ratio 2/1: mining {rates[2][0] / rates[1][0]:.2f}x, end to end {rates[2][1] / rates[1][1]:.2f}x")


if __name__ == "__main__":
    main()
