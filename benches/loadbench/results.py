"""Figures, the printed table, and the JSON result (what benches/compare.py reads)."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .procs import ROOT

SCHEMA = 1


@dataclass
class Figure:
    """One measured figure. `ratio` is `value / reference`, both from the same run, so that it holds
    across machines and moments where the absolute figure does not; `better` says which way is good."""

    key: str  # stable name, e.g. "paced.1000.lateness_p99_ms"
    label: str
    value: float
    unit: str
    better: str = "higher"  # or "lower"
    reference: float | None = None  # the figure of the same run it is a ratio to
    reference_is: str = ""  # what that reference is ("fake directly", "plain HTTP", ...)
    target: str = ""
    note: str = ""
    gate: bool = True  # benches/compare.py fails on this ratio (False: too noisy; reported only)

    @property
    def ratio(self) -> float | None:
        if (
            self.reference is None
            or not self.reference
            or math.isnan(self.reference)
            or math.isnan(self.value)
        ):
            return None
        return self.value / self.reference


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_times() -> list[int]:
    """The host's aggregate /proc/stat cpu line (user nice system idle iowait irq softirq steal ...)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return []


def machine() -> dict[str, object]:
    spec = importlib.util.find_spec("pwachat")
    source = Path(spec.origin).parent if spec and spec.origin else Path()
    if source.is_relative_to(ROOT):
        commit = _git("rev-parse", "HEAD")
        dirty: bool | None = bool(_git("status", "--porcelain", "--", "python", "rust"))
    else:
        marker = source.parent.parent / "COMMIT"
        commit = "export of " + marker.read_text().strip() if marker.exists() else "not from the repo"
        dirty = None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "granian": _version("granian"),
        "litestar": _version("litestar"),
        "pwachat": _version("pwachat"),
        # Where the server imports pwachat from: PYTHONPATH reaches the server too, so a run can
        # measure an export (`git archive HEAD python`, with a COMMIT file beside python/).
        "pwachat_source": str(source),
        "git_commit": commit,
        "git_dirty": dirty,
        "loadavg_at_start": os.getloadavg()[0],
    }


class Results:
    def __init__(self, settings: dict[str, object]) -> None:
        self.settings = settings
        self.machine = machine()
        self.started = datetime.datetime.now(datetime.UTC)
        self._cpu0 = cpu_times()
        self.figures: list[Figure] = []

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    def get(self, key: str) -> Figure | None:
        return next((f for f in self.figures if f.key == key), None)

    def _steal_pct(self) -> float | None:
        now = cpu_times()
        if len(now) < 8 or len(self._cpu0) < 8:
            return None
        delta = [b - a for a, b in zip(self._cpu0, now, strict=False)]
        return 100 * delta[7] / sum(delta) if sum(delta) else None

    def to_json(self) -> dict[str, object]:
        ended = datetime.datetime.now(datetime.UTC)
        return {
            "schema": SCHEMA,
            "started_at": self.started.isoformat(timespec="seconds"),
            "duration_s": round((ended - self.started).total_seconds(), 1),
            "machine": {**self.machine, "steal_pct_during_run": self._steal_pct()},
            "settings": self.settings,
            "figures": {
                f.key: {
                    **{k: v for k, v in asdict(f).items() if k != "key"},
                    "ratio": f.ratio,
                }
                for f in self.figures
            },
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        header = ("figure", "through pwachat", "reference (same run)", "ratio", "target")
        rows = [header]
        for f in self.figures:
            ref = "-" if f.reference is None else f"{fmt(f.reference, f.unit)} ({f.reference_is})"
            ratio = "-" if f.ratio is None else f"{f.ratio:.3f}" + ("" if f.gate else " (not gated)")
            value = fmt(f.value, f.unit) + (f" ({f.note})" if f.note else "")
            rows.append((f.label, value, ref, ratio, f.target))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "-|-".join("-" * w for w in widths))
        return "\n".join(lines)


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit in ("ms", "us"):
        return f"{value:.2f} {unit}" if value < 10 else f"{value:,.1f} {unit}"
    if unit == "fraction":
        return f"{value:.1%}"
    if unit == "%":
        return f"{value:.0f}%"
    return f"{value:,.0f} {unit}"
