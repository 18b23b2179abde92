"""Compare a load-bench result's ratios with the committed baseline.

    python benches/compare.py [--baseline benches/baseline.json] [--tolerance 10] RESULT.json

Every figure of benches/load.py that has a reference measured in the same run (the fake directly,
or plain HTTP for the TLS figures) carries `ratio = value / reference`. Ratios, not absolute
figures, are compared: the machines this runs on are shared and noisy, and a ratio of two figures
measured moments apart on the same machine moves far less than either figure does.

A figure's score is its ratio where higher is better and 1 / ratio where lower is better, so that a
fall of the score is always a regression. Exit status 1 when any gated figure's score falls more
than --tolerance percent below the baseline's, or a gated baseline figure is missing; 2 when the
two runs were made with different settings; 0 otherwise. Figures marked `gate: false` in the
baseline (too noisy to gate on) are shown, not judged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def score(fig: dict) -> float | None:
    ratio = fig.get("ratio")
    if not ratio:
        return None
    return ratio if fig.get("better", "higher") == "higher" else 1 / ratio


def compare(baseline: dict, now: dict, tolerance: float) -> tuple[list[tuple[str, ...]], list[str]]:
    rows: list[tuple[str, ...]] = []
    failures: list[str] = []
    for key, base in baseline["figures"].items():
        b = score(base)
        if b is None:
            continue
        gated = base.get("gate", True)
        fig = now["figures"].get(key)
        n = None if fig is None else score(fig)
        direction = "higher" if base.get("better", "higher") == "higher" else "lower"
        if n is None:
            verdict = "MISSING" if gated else "missing (not gated)"
            if gated:
                failures.append(key)
            rows.append((key, direction, f"{base['ratio']:.3f}", "-", "-", verdict))
            continue
        delta = (n / b - 1) * 100
        if not gated:
            verdict = "(not gated)"
        elif delta < -tolerance:
            verdict = "REGRESSION"
            failures.append(key)
        else:
            verdict = "ok"
        rows.append(
            (key, direction, f"{base['ratio']:.3f}", f"{fig['ratio']:.3f}", f"{delta:+.1f}%", verdict)
        )
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("--baseline", type=Path, default=ROOT / "benches" / "baseline.json")
    parser.add_argument("--tolerance", type=float, default=10.0, help="percent a score may fall")
    args = parser.parse_args(argv)
    baseline = json.loads(args.baseline.read_text())
    now = json.loads(args.result.read_text())
    if baseline.get("settings") != now.get("settings"):
        print(
            "the runs differ in settings:"
            f"\n  baseline {baseline.get('settings')}\n  now      {now.get('settings')}",
            file=sys.stderr,
        )
        return 2
    rows, failures = compare(baseline, now, args.tolerance)
    header = ("figure", "better", "baseline ratio", "now", "delta (score)", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip())
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    bm, nm = baseline.get("machine", {}), now.get("machine", {})
    print(
        f"\nbaseline: {baseline.get('started_at')} {bm.get('git_commit', '')} on {bm.get('cpu_model')}"
        f"\nnow:      {now.get('started_at')} {nm.get('git_commit', '')}"
        f"{' (tree dirty)' if nm.get('git_dirty') else ''} on {nm.get('cpu_model')},"
        f" pwachat from {nm.get('pwachat_source')}, steal {nm.get('steal_pct_during_run') or 0:.1f}%"
    )
    if failures:
        print(
            f"\nFAIL: {len(failures)} ratio(s) fell more than {args.tolerance:g}% below the baseline: "
            + ", ".join(failures)
        )
        return 1
    print(f"\nok: no gated ratio fell more than {args.tolerance:g}% below the baseline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
