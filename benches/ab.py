"""Before/after of two commits in one sitting: their Python alternated under the same load bench.

    python benches/ab.py b7cc662 HEAD --rounds 4 -- --only chat,stream --seconds 3

Each commit's `python/` is exported (`git archive`) to a temporary directory with the extension
built in this checkout copied in (so the comparison is of the Python, and a commit whose Python
needs a newer extension works), then `benches/load.py` of this checkout runs with
`PYTHONPATH=<export>/python`, A then B, `--rounds` times. It prints, per figure, the median over the
rounds of B's value / A's value from the same round, and of B's ratio / A's ratio (each figure's ratio
to its same-run reference: the fake's or the pacer's own). The machines are shared and noisy: trust
the median of adjacent pairs, not one run. Hold /tmp/bench.lock while it runs (README "Regression
check").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "python"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    for so in (ROOT / "python" / "pwachat").glob("_native*.so"):
        shutil.copy2(so, into / "python" / "pwachat" / so.name)
    return into / "python"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="the commit before")
    parser.add_argument("b", help="the commit after")
    parser.add_argument("--rounds", type=int, default=3)
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    load_args = argv[cut + 1 :]  # after --: benches/load.py's own arguments
    tmp = Path(tempfile.mkdtemp(prefix="pwachat-ab-"))
    try:
        paths = {rev: export(rev, tmp / f"tree-{i}") for i, rev in enumerate((args.a, args.b))}
        runs: dict[str, list[dict]] = {args.a: [], args.b: []}
        for n in range(args.rounds):
            for rev, path in paths.items():
                out = tmp / f"{len(runs[rev])}-{rev.replace('/', '_')}.json"
                cmd = [sys.executable, str(ROOT / "benches" / "load.py"), *load_args, "--json", str(out)]
                env = {**os.environ, "PYTHONPATH": str(path)}
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                runs[rev].append(json.loads(out.read_text())["figures"])
                print(f"round {n + 1}: {rev} done", file=sys.stderr)
        before, after = runs[args.a], runs[args.b]
        print(f"{'figure':40s} | {'after/before (median)':>22s} | {'ratio after/before':>18s} | pairs")
        for key in before[0]:
            pairs = [(x[key], y[key]) for x, y in zip(before, after, strict=True) if key in y]
            values = [y["value"] / x["value"] for x, y in pairs if x["value"]]
            ratios = [y["ratio"] / x["ratio"] for x, y in pairs if x.get("ratio") and y.get("ratio")]
            med_v = f"{statistics.median(values):.3f}" if values else "-"
            med_r = f"{statistics.median(ratios):.3f}" if ratios else "-"
            print(f"{key:40s} | {med_v:>22s} | {med_r:>18s} | {', '.join(f'{v:.2f}' for v in values)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
