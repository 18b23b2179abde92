"""The instance's Prometheus metrics: counted in each worker process, summed when scraped.

The design (what `GET /metrics`, `routes/metrics.py`, serves):

- **One file per worker, fixed slots.** Each worker counts into a memory-mapped file of 8-byte
  float slots, `worker-<pid>-<n>.bin`, in the instance's directory: `pwachat serve` (the supervisor,
  `cli.py`) makes it (`$TMPDIR/pwachat-metrics-<its pid>-*`), hands it to the workers in
  `PWACHAT_METRICS_DIR` and removes it when it exits. A worker's file stays until then, so that a
  worker Granian restarts leaves its counts behind for the sum (its successor opens a new file).
  Without the supervisor (an app built in-process, or Granian run by hand), the app makes a
  directory of its own and removes it at the lifespan's end: the scrape then sums that process only.
- **The same layout everywhere.** Which slot is which family and label set is computed from the
  settings alone (`Layout`), so every worker of an instance agrees; a file's header holds the
  layout's fingerprint, and a file with another one (or another size) is left out of the sum. Label
  values are bounded sets fixed at start-up: the routes the app serves (anything else is `other`),
  a handful of methods, the statuses the app answers (others by their class, `5xx`), the
  providers and models of the settings, and the contract's enums. No label ever holds anything a
  client sent: no path, caller, token, address or text.
- **Increments are plain adds.** Only the worker that owns a file writes it, from its event loop
  thread, so `slot += 1.0` through a `memoryview.cast("d")` of the map needs no lock. One request's
  worth (the request counter, the duration histogram's bucket, sum and count) costs about 0.3 us;
  prometheus-client's multiprocess mode (a lock and a struct pack per value) took 5.7 us for the
  same (timeit, the development machine), against about 170 us per /api/chat request.
- **Histograms** keep one slot per bucket (not cumulative: one add per observation), one for +Inf,
  then the sum and the count; the renderer makes the buckets cumulative.
- **The scrape** reads every file of the directory (a copy of its bytes: 8-byte aligned stores are
  read whole), sums counters and histograms over all files, and gauges over the files of live
  processes only (a dead worker's open streams are not open). A scrape may see one observation's
  bucket but not yet its count: the values are each exact, the families a moment apart, as with
  any Prometheus client. `pwachat_redis_up` is not summed: the scraping worker's limiter answers it
  (every worker talks to the same Redis).

`METRICS` is this process's one writer, read where it is needed (the edge, the relay, the chat
route), as `drain.DRAIN` is: its file is per process, and that costs an attribute read per count.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pwachat.errors import ApiError
from pwachat.settings import Settings

__all__ = ["METRICS", "Layout", "Metrics", "lifespan", "render", "scrape"]

log = logging.getLogger("pwachat.metrics")

MAGIC = b"PWAMET01"
HEADER = struct.Struct("<8sQQQ")  # magic, layout fingerprint, pid, slot count: 4 slots
HEADER_SLOTS = HEADER.size // 8

# OpenTelemetry's semantic conventions: http.server.request.duration, then streams' long tail.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30, 60, 120, 300)
# OpenTelemetry GenAI conventions: gen_ai.client.operation.duration, gen_ai.server.time_to_first_token,
# gen_ai.client.token.usage.
GEN_AI_DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
GEN_AI_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
GEN_AI_TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ..., 67108864

#: The route label: the app's routes as templates; any other path is `other` (never the path itself).
ROUTES = (
    "/api/chat",
    "/api/chat/stream",
    "/api/health",
    "/api/health/live",
    "/api/health/ready",
    "/api/models",
    "/api/rate-limit",
    "/api/schema",
    "/",
    "/sw.js",
    "/manifest.webmanifest",
    "/metrics",
)
PREFIX_ROUTES = (("/static/", "/static/{name}"), ("/api/schema/", "/api/schema/{path}"))
OTHER = "other"
METHODS = ("GET", "HEAD", "POST", "OPTIONS", "PUT", "PATCH", "DELETE")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _catalogue_statuses() -> list[int]:
    found: set[int] = set()
    todo: list[type[ApiError]] = [ApiError]
    while todo:
        cls = todo.pop()
        found.add(cls.status)
        todo += cls.__subclasses__()
    return sorted(found)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # counter, gauge, histogram
    help: str
    labels: tuple[str, ...] = ()
    series: tuple[tuple[str, ...], ...] = ((),)
    buckets: tuple[float, ...] = ()
    sparse: bool = False  # render only the series that have counted something
    summed: bool = True  # False: answered by the scraping worker (redis_up)
    base: int = 0  # first slot, set by Layout
    index: dict[tuple[str, ...], int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def width(self) -> int:
        return len(self.buckets) + 3 if self.kind == "histogram" else 1


class Layout:
    """Every family of the contract's table, with its label sets and their slots, from the settings."""

    def __init__(self, settings: Settings) -> None:
        statuses = [200, 204, 304, 308, *_catalogue_statuses()]
        self.statuses = tuple(str(s) for s in dict.fromkeys([0, *statuses]))
        providers = settings.provider_models
        models = tuple((p, m) for p, ms in providers.items() for m in ms)
        names = tuple(providers)
        routes = (*ROUTES, *(t for _, t in PREFIX_ROUTES), OTHER)
        error_types = ("", *sorted({cls_code for cls_code in _catalogue_codes()}))
        upstream_codes = tuple(c for c in error_types if c.startswith("upstream_") or c == "internal_error")
        families = [
            Family(
                "pwachat_http_requests_total",
                "counter",
                "HTTP requests answered, by route template, method and status",
                ("route", "method", "status"),
                tuple(
                    (r, m, s)
                    for r in routes
                    for m in (*METHODS, OTHER)
                    for s in (*self.statuses, *STATUS_CLASSES, OTHER)
                ),
                sparse=True,
            ),
            Family(
                "pwachat_http_request_duration_seconds",
                "histogram",
                "Time from a request's head to the end of its answer (streams included), by route template",
                ("route",),
                tuple((r,) for r in routes),
                HTTP_BUCKETS,
                sparse=True,
            ),
            Family(
                "gen_ai_client_operation_duration_seconds",
                "histogram",
                "GenAI operation duration (a provider call, to its last byte)",
                ("gen_ai_provider_name", "gen_ai_request_model", "error_type"),
                tuple((p, m, e) for p, m in models for e in error_types),
                GEN_AI_DURATION_BUCKETS,
                sparse=True,
            ),
            Family(
                "gen_ai_server_time_to_first_token_seconds",
                "histogram",
                "Time to the first token of a streamed answer",
                ("gen_ai_provider_name", "gen_ai_request_model"),
                models,
                GEN_AI_TTFT_BUCKETS,
                sparse=True,
            ),
            Family(
                "gen_ai_client_token_usage",
                "histogram",
                "Tokens used per provider call, input and output",
                ("gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"),
                tuple((p, m, t) for p, m in models for t in ("input", "output")),
                GEN_AI_TOKEN_BUCKETS,
                sparse=True,
            ),
            Family("pwachat_streams_active", "gauge", "Streams being relayed now"),
            Family(
                "pwachat_stream_events_total",
                "counter",
                "Streams ended, by how they ended",
                ("outcome",),
                (("done",), ("error",), ("cancelled",), ("grace_expired",)),
            ),
            Family(
                "pwachat_stream_resumes_total",
                "counter",
                "Stream resumptions, by outcome",
                ("outcome",),
                (("ok",), ("not_found",)),
            ),
            Family(
                "pwachat_budget_tokens_total",
                "counter",
                "Token budget tokens: reserved before the provider call, settled (used) at the end, "
                "released (reserved but not used)",
                ("kind",),
                (("reserved",), ("settled",), ("released",)),
            ),
            Family(
                "pwachat_ratelimit_decisions_total",
                "counter",
                "Rate-limit decisions, by decision and by who decided",
                ("decision", "source"),
                tuple((d, s) for d in ("admitted", "refused") for s in ("local", "redis")),
            ),
            Family(
                "pwachat_budget_tokens_total",
                "counter",
                "Token budget movements, by kind",
                ("kind",),
                (("reserved",), ("settled",), ("released",)),
            ),
            Family(
                "pwachat_upstream_errors_total",
                "counter",
                "Provider failures, by provider and contract error code",
                ("gen_ai_provider_name", "code"),
                tuple((p, c) for p in names for c in upstream_codes),
            ),
            Family(
                "pwachat_provider_fallbacks_total",
                "counter",
                "Requests moved from one provider to its fallback (N_FALLBACK), by both names",
                ("from", "to"),
                # Only the configured pairs: a request goes nowhere else.
                tuple((s.name, s.fallback[0]) for s in settings.providers if s.fallback is not None),
            ),
            Family(
                "pwachat_redis_up",
                "gauge",
                "1 when the rate limiter's Redis answers, 0 when it does not or none is configured",
                summed=False,
            ),
        ]
        slot = HEADER_SLOTS
        self.families: dict[str, Family] = {}
        for fam in families:
            placed = Family(**{**fam.__dict__, "base": slot, "index": {}})
            for labels in placed.series:
                placed.index[labels] = slot
                slot += placed.width
            self.families[fam.name] = placed
        self.slots = slot
        spec = repr([(f.name, f.kind, f.labels, f.series, f.buckets) for f in self.families.values()])
        self.fingerprint = zlib.crc32(spec.encode())


def _catalogue_codes() -> list[str]:
    found: set[str] = set()
    todo: list[type[ApiError]] = [ApiError]
    while todo:
        cls = todo.pop()
        if cls.code:
            found.add(cls.code)
        todo += cls.__subclasses__()
    return sorted(found)


def route_of(path: str) -> str:
    """The route label for a request path: a template of the app's, or `other`."""
    if path in _ROUTE_SET:
        return path
    for prefix, template in PREFIX_ROUTES:
        if path.startswith(prefix):
            return template
    return OTHER


_ROUTE_SET = frozenset(ROUTES)


class Metrics:
    """This process's counts: a buffer of float slots laid out by `Layout`, in a file once `open`ed."""

    __slots__ = (
        "_budget",
        "_duration",
        "_fallbacks",
        "_outcomes",
        "_ratelimit",
        "_requests",
        "_resumes",
        "_route_base",
        "_streams",
        "_tokens",
        "_ttft",
        "_upstream_errors",
        "file",
        "layout",
        "mm",
        "mv",
        "path",
        "statuses",
    )

    def __init__(self, settings: Settings | None = None) -> None:
        self.mm: mmap.mmap | None = None
        self.file: Any = None
        self.path: Path | None = None
        self._use(Layout(settings or Settings()), memoryview(bytearray(0)))

    def _use(self, layout: Layout, buffer: memoryview | None) -> None:
        self.layout = layout
        if buffer is None or buffer.nbytes != layout.slots * 8:
            buffer = memoryview(bytearray(layout.slots * 8))
        self.mv = buffer.cast("d")
        fams = layout.families
        requests = fams["pwachat_http_requests_total"]
        # Keyed by (route, method, status as sent): the hot path's one dict lookup.
        self._requests: dict[tuple[str, str, int], int] = {}
        for (route, method, status), slot in requests.index.items():
            if status.isdigit():
                self._requests[(route, method, int(status))] = slot
        self.statuses = frozenset(int(s) for s in layout.statuses)
        duration = fams["pwachat_http_request_duration_seconds"]
        self._route_base = {route: slot for (route,), slot in duration.index.items()}
        self._streams = fams["pwachat_streams_active"].base
        self._ratelimit = fams["pwachat_ratelimit_decisions_total"].index
        self._duration = fams["gen_ai_client_operation_duration_seconds"].index
        self._ttft = fams["gen_ai_server_time_to_first_token_seconds"].index
        self._tokens = fams["gen_ai_client_token_usage"].index
        self._upstream_errors = fams["pwachat_upstream_errors_total"].index
        self._outcomes = fams["pwachat_stream_events_total"].index
        self._resumes = fams["pwachat_stream_resumes_total"].index
        self._budget = fams["pwachat_budget_tokens_total"].index
        self._fallbacks = fams["pwachat_provider_fallbacks_total"].index

    # -- the file ---------------------------------------------------------------------------------

    def open(self, settings: Settings, directory: Path) -> None:
        """Count into a new file of this process in `directory`, laid out for `settings`, from zero."""
        self.close()
        layout = Layout(settings)
        pid = os.getpid()
        for n in range(1000):
            path = directory / f"worker-{pid}-{n}.bin"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # this pid's earlier life in the same instance: its counts stay
            break
        else:
            raise OSError(f"no free metrics file name for pid {pid}")
        os.ftruncate(fd, layout.slots * 8)
        mm = mmap.mmap(fd, layout.slots * 8)
        os.close(fd)
        HEADER.pack_into(mm, 0, MAGIC, layout.fingerprint, pid, layout.slots)
        self.mm, self.path = mm, path
        self._use(layout, memoryview(mm))

    def close(self) -> None:
        """Stop counting into the file (it stays for the sum); gauges there go to zero."""
        if self.mm is None:
            return
        mv, mm = self.mv, self.mm
        mv[self._streams] = 0.0
        self._use(self.layout, None)  # counts from here on go to memory only
        mv.release()
        with contextlib.suppress(BufferError):
            mm.close()
        self.mm = self.path = None

    def in_memory(self, settings: Settings) -> None:
        """Count in memory only (no file could be made): the scrape shows this process alone."""
        self.close()
        self._use(Layout(settings), None)

    # -- the counts (hot paths) -------------------------------------------------------------------

    def request(self, path: str, method: str, status: int, seconds: float) -> None:
        """One answered request: its counter and its duration."""
        route = route_of(path)
        mv = self.mv
        slot = self._requests.get((route, method, status))
        if slot is None:
            slot = self._odd_request(route, method, status)
        mv[slot] += 1.0
        base = self._route_base[route]
        mv[base + bisect.bisect_left(HTTP_BUCKETS, seconds)] += 1.0
        mv[base + len(HTTP_BUCKETS) + 1] += seconds
        mv[base + len(HTTP_BUCKETS) + 2] += 1.0

    def _odd_request(self, route: str, method: str, status: int) -> int:
        if method not in METHODS:
            method = OTHER
        if status in self.statuses:
            label = str(status)
        else:
            label = f"{status // 100}xx" if 100 <= status < 600 else OTHER
        return self.layout.families["pwachat_http_requests_total"].index[(route, method, label)]

    def stream_opened(self) -> None:
        self.mv[self._streams] += 1.0

    def stream_closed(self) -> None:
        self.mv[self._streams] -= 1.0

    def ratelimit(self, admitted: bool, source: str) -> None:
        self.mv[self._ratelimit[("admitted" if admitted else "refused", source)]] += 1.0

    # -- per provider call (once a request or a stream, never per event) ----------------------------
    # A provider or model outside the settings' sets (none can pass validation) is not counted.

    def _observe(self, base: int | None, buckets: tuple[float, ...], value: float) -> None:
        if base is None:
            return
        mv = self.mv
        mv[base + bisect.bisect_left(buckets, value)] += 1.0
        mv[base + len(buckets) + 1] += value
        mv[base + len(buckets) + 2] += 1.0

    def provider_call(self, provider: str, model: str, error: str, seconds: float) -> None:
        """A provider call ended: from its request to its last byte (a stream's whole length);
        `error` is the contract code it ended with, "" for success."""
        self._observe(self._duration.get((provider, model, error)), GEN_AI_DURATION_BUCKETS, seconds)

    def first_token(self, provider: str, model: str, seconds: float) -> None:
        """A stream's first text, `seconds` after its provider request began."""
        self._observe(self._ttft.get((provider, model)), GEN_AI_TTFT_BUCKETS, seconds)

    def token_usage(self, provider: str, model: str, input_tokens: int, output_tokens: int) -> None:
        self._observe(self._tokens.get((provider, model, "input")), GEN_AI_TOKEN_BUCKETS, input_tokens)
        self._observe(self._tokens.get((provider, model, "output")), GEN_AI_TOKEN_BUCKETS, output_tokens)

    def upstream_error(self, provider: str, code: str) -> None:
        slot = self._upstream_errors.get((provider, code))
        if slot is not None:
            self.mv[slot] += 1.0

    def fallback(self, source: str, target: str) -> None:
        """A request went from `source` to its fallback `target` (its failure, or its breaker open)."""
        slot = self._fallbacks.get((source, target))
        if slot is not None:
            self.mv[slot] += 1.0

    def stream_ended(self, outcome: str) -> None:
        """`done`, `error`, `cancelled` (stopped, or the reader left with no grace period) or
        `grace_expired` (nobody came back within STREAM_GRACE_S)."""
        self.mv[self._outcomes[(outcome,)]] += 1.0

    def stream_resumed(self, outcome: str) -> None:
        """`GET /api/chat/stream/{id}`: `ok`, or `not_found` (unknown, expired or another's)."""
        self.mv[self._resumes[(outcome,)]] += 1.0

    def budget_tokens(self, kind: str, tokens: int) -> None:
        """`reserved`, `settled` (used) or `released` (reserved, not used) budget tokens."""
        self.mv[self._budget[(kind,)]] += float(tokens)


#: This process's one writer (see the module's docstring).
METRICS = Metrics()


def lifespan(settings: Settings) -> Any:
    """The app's lifespan part: open this worker's file (in the supervisor's directory, or one of
    its own), close it at the end (and remove the directory if it was its own)."""

    @asynccontextmanager
    async def metrics_lifespan(_app: Any) -> AsyncIterator[None]:
        own: Path | None = None
        try:
            if settings.metrics_dir is None:
                own = directory = Path(tempfile.mkdtemp(prefix="pwachat-metrics-"))
            else:
                directory = Path(settings.metrics_dir)
                directory.mkdir(parents=True, exist_ok=True)
            METRICS.open(settings, directory)
        except OSError as err:
            log.warning("metrics: no file for them (%s); this worker counts in memory only", err.strerror)
            METRICS.in_memory(settings)
        mine = METRICS.path
        try:
            yield
        finally:
            if mine is not None and METRICS.path == mine:  # not another app's since (tests build several)
                METRICS.close()
            if own is not None:
                shutil.rmtree(own, ignore_errors=True)

    return metrics_lifespan


# -- the scrape -------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(directory: Path, layout: Layout) -> tuple[list[float], list[float]]:
    """Every file's slots summed, and the same over live processes only (for gauges)."""
    total = [0.0] * layout.slots
    live = [0.0] * layout.slots
    for path in sorted(directory.glob("worker-*.bin")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) != layout.slots * 8:
            continue
        magic, fingerprint, pid, _ = HEADER.unpack_from(data)
        if magic != MAGIC or fingerprint != layout.fingerprint:
            continue
        values = memoryview(data).cast("d")
        total = [a + b for a, b in zip(total, values, strict=True)]
        if pid == os.getpid() or _alive(pid):
            live = [a + b for a, b in zip(live, values, strict=True)]
    return total, live


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    # Every value is one of the layout's fixed strings; escaped anyway, as the format requires.
    parts = [
        f'{n}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for n, v in zip(names, values, strict=True)
    ]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def render(layout: Layout, total: list[float], live: list[float], redis_up: bool) -> str:
    """The text format 0.0.4 for the summed slots."""
    out: list[str] = []
    for fam in layout.families.values():
        out.append(f"# HELP {fam.name} {fam.help}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        if not fam.summed:
            out.append(f"{fam.name} {1 if redis_up else 0}")
            continue
        values = live if fam.kind == "gauge" else total
        for labels in fam.series:
            slot = fam.index[labels]
            if fam.kind == "histogram":
                n = len(fam.buckets)
                count = values[slot + n + 2]
                if fam.sparse and count == 0:
                    continue
                running = 0.0
                for i, le in enumerate((*fam.buckets, float("inf"))):
                    running += values[slot + i]
                    bound = "+Inf" if le == float("inf") else repr(float(le))
                    le_label = 'le="' + bound + '"'
                    out.append(f"{fam.name}_bucket{_labels(fam.labels, labels, le_label)} {_number(running)}")
                out.append(f"{fam.name}_sum{_labels(fam.labels, labels)} {_number(values[slot + n + 1])}")
                out.append(f"{fam.name}_count{_labels(fam.labels, labels)} {_number(count)}")
            else:
                value = values[slot]
                if fam.sparse and value == 0:
                    continue
                out.append(f"{fam.name}{_labels(fam.labels, labels)} {_number(value)}")
    return "\n".join(out) + "\n"


def scrape(redis_up: bool) -> str:
    """Every worker's counts in this instance's directory, summed and rendered."""
    layout = METRICS.layout
    if METRICS.path is None:  # counting in memory only
        values = list(METRICS.mv)
        return render(layout, values, values, redis_up)
    total, live = _read(METRICS.path.parent, layout)
    return render(layout, total, live, redis_up)
