"""Token budgets across real processes (contract, "Token budgets", with `REDIS_URL`): two server
instances with two workers each, one real redis-server, the fake upstream over real HTTP. A
caller's budget and the deployment's hold across every process (one reservation per script call,
so a concurrent burst admits exactly what fits); settles land in Redis whoever ends the answer;
during a Redis outage each process keeps a budget of its own and what it admitted reaches Redis
once it is back; a spent caller's flood costs Redis about one call a second. In one process with
`memory://`: tests/test_e2e_budgets.py."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fake_upstream import FakeUpstream
from pwachat._native import estimate_input_tokens
from redis_server import RedisServer
from server import Server, poll, sse_request, start_server, stop_server
from sse_client import SseReader, begin, events

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-test-budgets-redis"
SYSTEM = "Answer briefly, in plain words."
MAX_TOKENS = 200
MESSAGE = "how much does this cost"
#: Admissions a caller's budget holds in the burst tests: the budget is K reservations and a half.
K = 6
DELTAS = [f"b{i} " for i in range(4)]
NO_REQUEST_LIMITS = {
    "RATELIMIT_PER_MINUTE": "100000",
    "RATELIMIT_PER_HOUR": "100000",
    "RATELIMIT_PER_DAY": "100000",
}


def cost(message: str = MESSAGE, max_tokens: int = MAX_TOKENS) -> int:
    """What a request reserves: the documented upper-bound estimate of its input plus max_tokens."""
    return estimate_input_tokens(SYSTEM, [], message) + max_tokens


COST = cost()
LIMIT = K * COST + COST // 2  # K reservations fit, the (K+1)-th does not
GLOBAL_PLENTY = 10**9
GLOBAL_HASH = "pwachat:budget:global"  # redis_limiter.py GLOBAL_BUDGET_KEY


def caller_hash(token: str) -> str:
    """The caller's hash in Redis (pwachat/ratelimit.py `caller_key`, redis_limiter.py KEY_PREFIX)."""
    return "pwachat:rl:t:" + hashlib.sha256(token.encode()).hexdigest()[:32]


def tok_fields(redis: RedisServer, key: str) -> int:
    """The tokens a budget hash counts: its `tok:<day>` fields summed (whatever the day bucket)."""
    flat = redis.command("HGETALL", key)
    assert isinstance(flat, list)
    return sum(int(v) for f, v in zip(flat[::2], flat[1::2], strict=True) if f.startswith("tok:"))


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(OPENAI_KEY, "sk-ant-unused") as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeUpstream) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()


def serve(tmp: Path, fake: FakeUpstream, redis: RedisServer, count: int, **env: str) -> list[Server]:
    """`count` instances on `redis` and the fake, started at once (each takes seconds)."""
    settings = {
        "REDIS_URL": redis.url,
        "WORKERS": "2",
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_base_url,
        "UPSTREAM_MAX_RETRIES": "0",
        "SSE_HEARTBEAT_S": "0.5",
        "SYSTEM_PROMPT": SYSTEM,
        "MAX_TOKENS": str(MAX_TOKENS),
        **NO_REQUEST_LIMITS,
        **env,
    }
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(start_server, tmp, **settings) for _ in range(count)]
        servers = []
        errors = []
        for f in futures:
            try:
                servers.append(f.result())
            except RuntimeError as err:
                errors.append(err)
    if errors:
        for srv in servers:
            stop_server(srv)
        raise errors[0]
    return servers


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream, shared_redis: RedisServer
) -> Iterator[list[Server]]:
    """Two instances, two workers each, every caller's budget LIMIT (K reservations and a half), and
    the deployment's on too, far from binding: every reservation and settle counts in both."""
    servers = serve(
        tmp_path_factory.mktemp("pair"),
        fake,
        shared_redis,
        2,
        API_TOKENS="burst,settle,stopped",
        TOKENS_PER_DAY=str(LIMIT),
        TOKENS_GLOBAL_PER_DAY=str(GLOBAL_PLENTY),
    )
    yield servers
    for srv in servers:
        stop_server(srv)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(srv: Server, token: str, message: str = MESSAGE) -> tuple[int, dict[str, str], Any]:
    status, headers, body = srv.post_json(
        "/api/chat", {"message": message, "provider": "openai"}, **auth(token)
    )
    return status, headers, json.loads(body) if body else None


def warm_up(servers: list[Server], token: str) -> None:
    """A few sequential `/api/rate-limit` reads (a Redis round trip each, nothing consumed) on every
    instance just before a burst: every worker has a connection and has just heard from Redis.

    Without it, a burst reaching a worker that has not heard from Redis for a second gives each of
    its concurrent checks a hard 50 ms, connecting included; on a busy 2-core machine they can all
    time out in the same watchdog tick, which counts as three strikes and marks Redis down, and that
    worker's budgets go per process for half a second (see `RedisBackend._failed`: the strikes
    count checks, not stalls)."""
    for _ in range(8):
        for srv in servers:
            assert srv.request("GET", "/api/rate-limit", headers=auth(token))[0] == 200


def burst(servers: list[Server], tokens: list[str], count: int) -> list[tuple[int, dict[str, str], Any]]:
    """`count` concurrent requests, spread over the instances and the tokens in turn."""
    # 16 client threads: enough for every worker to race its siblings on the 2-core test machine,
    # few enough that redis-server is still scheduled promptly (as tests/test_e2e_redis.py).
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [
            pool.submit(post, servers[i % len(servers)], tokens[i % len(tokens)]) for i in range(count)
        ]
        return [f.result() for f in futures]


def rate_limit(srv: Server, token: str) -> dict[str, Any]:
    status, _, body = srv.request("GET", "/api/rate-limit", headers=auth(token))
    assert status == 200, body
    return json.loads(body)


def tokens_block(srv: Server, token: str) -> dict[str, int]:
    return rate_limit(srv, token)["tokens"]


def request_quota(srv: Server, token: str) -> dict[str, int]:
    return rate_limit(srv, token)["remaining"]


def assert_budget_refusal(status: int, headers: dict[str, str], body: Any) -> None:
    assert status == 429, (status, body)
    assert body["error"]["code"] == "budget_exceeded", body
    assert int(headers["retry-after"]) >= 1
    assert headers["content-type"].startswith("application/json")


def limiter_events(servers: list[Server]) -> list[str]:
    """What the limiters logged (to tell a Redis stall or a lost connection from a budget bug)."""
    lines = [json.loads(ln) for srv in servers for ln in srv.app_log.read_text().splitlines()]
    return [f"{x['event']}: {x['msg']}" for x in lines if "event" in x]


def server_errors(servers: list[Server]) -> list[str]:
    """The first line of every ERROR the servers logged (an exception in a background task, say)."""
    lines = [json.loads(ln) for srv in servers for ln in srv.app_log.read_text().splitlines()]
    return [x["msg"].splitlines()[-1][:300] for x in lines if x.get("level") == "ERROR"]


def until_counted(redis: RedisServer, key: str, expected: int, what: str, servers: list[Server]) -> None:
    """Poll until the budget hash `key` counts `expected` tokens (settles are sent in batches, every
    ~10 ms); on failure say what it counts, and what the servers logged."""
    try:
        poll(lambda: tok_fields(redis, key) == expected, 10, what)
    except AssertionError as err:
        raise AssertionError(
            f"{err}: Redis counts {tok_fields(redis, key)} tokens, not {expected}; limiter events "
            f"{limiter_events(servers)}; errors {server_errors(servers)}"
        ) from None


def used(usage: dict[str, int]) -> int:
    return usage["input_tokens"] + usage["output_tokens"]


def open_authorised_stream(srv: Server, token: str, message: str = MESSAGE) -> SseReader:
    payload = json.dumps({"message": message, "provider": "openai"}).encode()
    return SseReader(sse_request(srv.port, payload, f"Authorization: Bearer {token}\r\n"))


# -- shared by every process -------------------------------------------------------------------------


def test_a_burst_over_four_processes_admits_exactly_what_the_callers_budget_covers(
    pair: list[Server], fake: FakeUpstream, shared_redis: RedisServer
) -> None:
    """A caller hammering two instances (four workers) at once gets exactly the K answers its
    budget covers, the rest `429 budget_exceeded`; the provider is called K times, no more."""
    # Each answer uses exactly what it reserved: settles give nothing back, the burst is all there is.
    fake.behave("openai", input_tokens=COST - MAX_TOKENS, output_tokens=MAX_TOKENS, deltas=DELTAS)
    warm_up(pair, "burst")
    results = burst(pair, ["burst"], 40)
    statuses = [s for s, _, _ in results]
    assert not [s for s in statuses if s >= 500], statuses
    assert statuses.count(200) == K, (statuses, limiter_events(pair))
    assert statuses.count(429) == 40 - K, statuses
    for status, headers, body in results:
        if status == 429:
            assert_budget_refusal(status, headers, body)
            # What is left cannot cover one more request, and says so.
            assert headers["x-tokenbudget-remaining"] == str(COST // 2), headers
    # Each admitted answer was told what its reservation left: one reservation after another, none
    # counted twice or missed (the counts are Redis's, whichever process answered).
    left = sorted((int(h["x-tokenbudget-remaining"]) for s, h, _ in results if s == 200), reverse=True)
    assert left == [LIMIT - i * COST for i in range(1, K + 1)], left
    assert all(h["x-tokenbudget-limit"] == str(LIMIT) for _, h, _ in results)
    assert len(fake.requests("openai")) == K
    until_counted(shared_redis, caller_hash("burst"), K * COST, "the burst's tokens counted in Redis", pair)
    for srv in pair:
        assert tokens_block(srv, "burst")["remaining"] == COST // 2


def test_the_deployments_budget_is_shared_by_every_caller_on_every_instance(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    """Ten callers, each with plenty of budget of their own, together get exactly the K answers the
    deployment's budget (TOKENS_GLOBAL_PER_DAY) covers, wherever they land; the others are told
    the deployment's budget is spent."""
    redis = RedisServer(tmp_path).start()
    callers = [f"tenant-{i}" for i in range(10)]
    servers: list[Server] = []
    try:
        servers = serve(
            tmp_path,
            fake,
            redis,
            2,
            API_TOKENS=",".join(callers),
            TOKENS_PER_DAY=str(100 * COST),
            TOKENS_GLOBAL_PER_DAY=str(LIMIT),
        )
        fake.behave("openai", input_tokens=COST - MAX_TOKENS, output_tokens=MAX_TOKENS, deltas=DELTAS)
        warm_up(servers, callers[0])
        results = burst(servers, callers, 40)
        statuses = [s for s, _, _ in results]
        assert not [s for s in statuses if s >= 500], statuses
        assert statuses.count(200) == K, (statuses, limiter_events(servers))
        refused = [(s, h, b) for s, h, b in results if s != 200]
        assert len(refused) == 40 - K
        for status, headers, body in refused:
            assert_budget_refusal(status, headers, body)
            assert "deployment's token budget" in body["error"]["message"], body
        assert len(fake.requests("openai")) == K
        until_counted(redis, GLOBAL_HASH, K * COST, "the deployment's tokens counted in Redis", servers)
        # Every admitted reservation is in its own caller's budget too.
        assert sum(tok_fields(redis, caller_hash(c)) for c in callers) == K * COST
        # Any caller, on any instance, sees what the deployment has left: the tighter budget.
        for srv in servers:
            assert tokens_block(srv, callers[-1])["remaining"] == COST // 2
    finally:
        for srv in servers:
            stop_server(srv)
        redis.stop()


# -- settles -------------------------------------------------------------------------------------------


def test_what_an_answer_used_replaces_its_reservation_in_redis(
    pair: list[Server], fake: FakeUpstream, shared_redis: RedisServer
) -> None:
    """An answer that used less than it reserved gives the rest back, for every process: after a
    JSON answer on one instance and a stream on the other, both instances report the budget less
    exactly what the two used (11 + 7 tokens each)."""
    a, b = pair
    fake.behave("openai", input_tokens=11, output_tokens=7, deltas=DELTAS)
    deployment = tok_fields(shared_redis, GLOBAL_HASH)  # what the other tests here have used
    status, headers, body = post(a, "settle")
    assert status == 200, body
    assert used(body["usage"]) == 18
    assert int(headers["x-tokenbudget-remaining"]) == LIMIT - COST  # its worst case, while it ran

    reader = open_authorised_stream(b, "settle")
    with reader.sock:
        status, headers = reader.read_head()
        assert status == 200
        # The stream reserved its worst case on top of what the first answer has been charged (or,
        # if that settle has not reached Redis yet, of its reservation).
        assert int(headers["x-tokenbudget-remaining"]) in (LIMIT - 18 - COST, LIMIT - 2 * COST)
        done = events(reader.read_rest())[-1]
    assert done.name == "done", done
    assert used(json.loads(done.data)["usage"]) == 18

    until_counted(shared_redis, caller_hash("settle"), 2 * 18, "both settles in the caller's budget", pair)
    # The deployment's budget is charged the same: what was used, not what was reserved.
    until_counted(shared_redis, GLOBAL_HASH, deployment + 36, "both settles in the deployment's budget", pair)
    for srv in pair:
        poll(
            lambda srv=srv: tokens_block(srv, "settle")["remaining"] == LIMIT - 36,
            5,
            "the settled budget on every instance",
        )


def test_a_stream_stopped_from_another_instance_is_charged_what_it_used(
    pair: list[Server], fake: FakeUpstream, shared_redis: RedisServer
) -> None:
    """A stream started on one instance and stopped from the other ends `cancelled`, and the
    caller's budget (in Redis, so on every instance) is charged what its `done` event says it
    used, not its whole reservation."""
    a, b = pair
    fake.behave("openai", deltas=[f"s{i} " for i in range(60)], chunk_interval_s=0.2)
    header = "Authorization: Bearer stopped\r\n"
    deployment = tok_fields(shared_redis, GLOBAL_HASH)
    reader, chat_id = begin(a, header)
    with reader.sock:
        events(reader.read_events(2))
        status, _, body = b.request("POST", f"/api/chat/stream/{chat_id}/stop", headers=auth("stopped"))
        assert status == 200 and json.loads(body) == {"stopped": True}, body
        done = events(reader.read_rest())[-1]
    assert done.name == "done", done
    end = json.loads(done.data)
    assert end["finish_reason"] == "cancelled", end
    charged = used(end["usage"])
    assert 0 < charged < cost("tell me")  # begin()'s message
    until_counted(shared_redis, caller_hash("stopped"), charged, "the stopped stream's usage in Redis", pair)
    until_counted(
        shared_redis, GLOBAL_HASH, deployment + charged, "the stopped stream's usage, the deployment's", pair
    )
    for srv in pair:
        assert tokens_block(srv, "stopped")["remaining"] == LIMIT - charged


# -- Redis away ----------------------------------------------------------------------------------------


def test_redis_killed_mid_load_budgets_hold_per_process_and_the_outage_is_no_amnesty(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    """Redis dies under load: nobody gets a 5xx, each process keeps a budget of its own (a caller
    gets at most K answers per process, so at most 4K, and is then refused); once Redis is back,
    global budgets resume by themselves (a new caller's burst gets exactly K), and what callers
    used during the outage counts in Redis: they are refused there too."""
    redis = RedisServer(tmp_path).start()
    before = [f"pre-{i}" for i in range(3)]
    during = [f"out-{i}" for i in range(3)]
    after = [f"after-{i}" for i in range(30)]
    servers: list[Server] = []
    try:
        servers = serve(
            tmp_path, fake, redis, 2, API_TOKENS=",".join(before + during + after), TOKENS_PER_DAY=str(LIMIT)
        )
        # One token less than reserved: every settle gives one back (so what reaches Redis is the
        # usage, not the reservations), yet what is left after K answers never covers another.
        assert COST // 2 + K < COST
        fake.behave("openai", input_tokens=COST - MAX_TOKENS - 1, output_tokens=MAX_TOKENS, deltas=DELTAS)
        killed = threading.Event()
        stop = threading.Event()
        lock = threading.Lock()
        results: list[tuple[bool, str, int, dict[str, str], Any]] = []  # (after the kill, token, ...)

        def load(n: int) -> None:
            while not stop.is_set():
                for srv in servers:
                    outage = killed.is_set()
                    token = (during if outage else before)[n]
                    try:
                        status, headers, body = post(srv, token)
                    except OSError as err:  # reported below, as no answer at all
                        status, headers, body = -1, {}, repr(err)
                    with lock:
                        results.append((outage, token, status, headers, body))

        def count(outage: bool, token: str | None = None) -> int:
            with lock:
                return sum(r[0] == outage and token in (None, r[1]) for r in results)

        loaders = [threading.Thread(target=load, args=(n,)) for n in range(3)]
        for t in loaders:
            t.start()
        try:
            poll(lambda: count(False) >= 30, 10, "load before the kill")
            redis.kill()
            killed.set()
            # Enough for each outage caller to exhaust every process's own budget (4 K at most).
            poll(lambda: all(count(True, t) >= 4 * K + 12 for t in during), 15, "load during the outage")
        finally:
            stop.set()
            for t in loaders:
                t.join()

        assert not [r for r in results if r[2] >= 500 or r[2] < 0], "a 5xx (or no answer) around the outage"
        assert all(r[2] in (200, 429) for r in results), {r[2] for r in results}
        outage_answers: dict[str, list[int]] = {t: [] for t in during}
        for outage, token, status, headers, body in results:
            if status == 429:
                assert_budget_refusal(status, headers, body)
            elif outage:
                outage_answers[token].append(used(body["usage"]))
        for token in during:
            got = outage_answers[token]
            # Per process: K each at most (two instances of two workers), and at least one process's K.
            assert K <= len(got) <= 4 * K, (token, len(got))
            assert all(u == COST - 1 for u in got)
        assert sum(r[0] and r[2] == 429 for r in results) > 0, "nobody refused during the outage"

        redis.start()  # again on the same port, empty
        restarted = time.monotonic()
        # Global again: a new caller's burst over the four processes gets exactly K. Until every
        # process is back on Redis a burst gets more (each process's own budget admits K).
        for token in after:
            began = time.monotonic() - restarted
            statuses = [s for s, _, _ in burst(servers, [token], 3 * K)]
            assert not [s for s in statuses if s >= 500], statuses
            if statuses.count(200) == K:
                break
            assert began < 10, f"not back to global budgets within 10 s: {statuses}"
            time.sleep(0.2)  # polling with a deadline, paced so that the new callers last those 10 s
        else:
            pytest.fail("not back to global budgets")

        # What the outage callers used reached the restarted Redis (it lost everything else).
        for token in during:
            expected = sum(outage_answers[token])
            what = f"{token}'s {len(outage_answers[token])} outage answers' usage in Redis"
            until_counted(redis, caller_hash(token), expected, what, servers)
        # No amnesty: each outage caller used (at least) K answers' worth, which leaves less than
        # one request's worth, wherever it asks now.
        for token in during:
            for srv in servers:
                assert_budget_refusal(*post(srv, token))
                assert tokens_block(srv, token)["remaining"] == max(0, LIMIT - sum(outage_answers[token]))
    finally:
        for srv in servers:
            stop_server(srv)
        redis.stop()


# -- cost to Redis ---------------------------------------------------------------------------------------


def test_a_flood_from_a_spent_caller_costs_redis_about_one_call_a_second(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    """A caller whose budget is spent and who keeps sending gets `429 budget_exceeded` every time,
    while Redis sees about one call a second for it (REFUSAL_TRUST_S), not one per request;
    the refusals consume none of its request quota."""
    redis = RedisServer(tmp_path).start()
    servers: list[Server] = []
    try:
        servers = serve(
            tmp_path,
            fake,
            redis,
            1,
            WORKERS="1",
            API_TOKENS="spender",
            TOKENS_PER_DAY=str(COST + COST // 2),
        )
        (srv,) = servers
        fake.behave("openai", input_tokens=COST - MAX_TOKENS, output_tokens=MAX_TOKENS, deltas=DELTAS)
        assert post(srv, "spender")[0] == 200
        assert_budget_refusal(*post(srv, "spender"))  # Redis's refusal, now trusted for a second
        quota = request_quota(srv, "spender")
        calls = redis.evalsha_calls()
        started = time.monotonic()
        for _ in range(200):
            assert_budget_refusal(*post(srv, "spender"))
        elapsed = time.monotonic() - started
        spent = redis.evalsha_calls() - calls
        assert spent <= 1 + math.ceil(elapsed / 1.0), (spent, elapsed)
        assert spent < 20, (spent, elapsed)
        assert len(fake.requests("openai")) == 1
        assert request_quota(srv, "spender") == quota
    finally:
        for srv in servers:
            stop_server(srv)
        redis.stop()
