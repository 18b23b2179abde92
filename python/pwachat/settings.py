"""Configuration: one frozen object, read once from the environment (and `.env`), validated at start-up.

Every other module receives a `Settings`; none reads `os.environ`. A bad value raises `ConfigError`
whose message is one line naming the variable, which the CLI prints before exiting.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

import msgspec
from dotenv import dotenv_values

__all__ = ["PROVIDER_ALIASES", "ConfigError", "Settings"]

T = TypeVar("T")

DEFAULT_OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")
DEFAULT_ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port...][?options]` (the scheme
#: the `limits` library uses too), with `rediss+cluster://` for TLS; each scheme to the one of a node.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

#: Every spelling a client may use for a provider, to the one name responses and logs use.
PROVIDER_ALIASES = {"openai": "openai", "claude": "claude", "anthropic": "claude", "echo": "echo"}

_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    app_env: Literal["development", "production"] = "development"
    secret_key: str = ""
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 1

    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_models: tuple[str, ...] = DEFAULT_OPENAI_MODELS
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    anthropic_models: tuple[str, ...] = DEFAULT_ANTHROPIC_MODELS
    default_provider: str | None = None
    echo_provider: bool = True
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    redis_url: str = "memory://"
    ratelimit_per_minute: int = 10
    ratelimit_per_hour: int = 100
    ratelimit_per_day: int = 500
    api_tokens: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    max_tokens: int = 1000
    temperature: float = 0.7
    max_message_chars: int = 4000
    max_history_messages: int = 50
    max_body_bytes: int = 262_144
    upstream_timeout_s: float = 60.0
    sse_heartbeat_s: float = 15.0
    upstream_max_retries: int = 2
    request_body_timeout_s: float = 10.0
    #: On SIGTERM, how long running streams may go on before they are ended with `shutting_down`
    #: (Granian's worker kill timeout is a little longer; compose's stop_grace_period longer still).
    shutdown_grace_s: float = 25.0
    #: How many requests one worker serves at once, held streams included (Granian's backpressure);
    #: past it, connections wait in the listen backlog.
    max_concurrency: int = 4096
    #: `GET /metrics` needs `Authorization: Bearer <this>` when set; when empty it answers loopback
    #: peers only (404 to anyone else).
    metrics_token: str = ""

    log_level: str = "INFO"
    log_file: str | None = "logs/app.log"
    # Internal: the providers' SDK-derived base URLs and headers, handed from `pwachat serve` to its
    # workers (see pwachat/sdk_config.py); not something to set by hand.
    provider_sdk_config: str | None = None
    # Internal: the instance's metrics directory, made by `pwachat serve` and handed to its workers
    # (see pwachat/metrics.py); not something to set by hand.
    metrics_dir: str | None = None

    @property
    def production(self) -> bool:
        return self.app_env == "production"

    @property
    def rate_windows(self) -> list[tuple[int, int]]:
        """The rate limit's (limit, window seconds) pairs: a minute, an hour, a day."""
        return [
            (self.ratelimit_per_minute, 60),
            (self.ratelimit_per_hour, 3600),
            (self.ratelimit_per_day, 86400),
        ]

    @property
    def provider_models(self) -> dict[str, tuple[str, ...]]:
        return {"openai": self.openai_models, "claude": self.anthropic_models, "echo": ("echo",)}

    def provider_configured(self, name: str) -> bool:
        if name == "openai":
            return bool(self.openai_api_key)
        if name == "claude":
            return bool(self.anthropic_api_key)
        return name == "echo" and self.echo_provider

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """Read the process environment, falling back to `env_file`; the environment wins."""
        merged: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        merged.update(os.environ if environ is None else environ)
        return cls.from_mapping(merged)

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> Settings:
        r = _Reader(env)
        app_env = r.choice("APP_ENV", ("development", "production"), None, alias="FLASK_ENV")
        app_env = app_env or "development"
        production = app_env == "production"

        secret_key = r.str("SECRET_KEY")
        if not secret_key:
            if production:
                raise ConfigError("SECRET_KEY: must be set when APP_ENV=production")
            secret_key = secrets.token_urlsafe(32)

        s = cls(
            app_env=app_env,  # type: ignore[arg-type]
            secret_key=secret_key,
            host=r.str("HOST") or "127.0.0.1",
            port=r.int("PORT", 5000, lo=1, hi=65535),
            workers=r.int("WORKERS", 1, lo=1, hi=512),
            openai_api_key=r.str("OPENAI_API_KEY"),
            openai_base_url=r.url("OPENAI_BASE_URL"),
            openai_models=r.list("OPENAI_MODELS") or DEFAULT_OPENAI_MODELS,
            anthropic_api_key=r.str("ANTHROPIC_API_KEY"),
            anthropic_base_url=r.url("ANTHROPIC_BASE_URL"),
            anthropic_models=r.list("ANTHROPIC_MODELS") or DEFAULT_ANTHROPIC_MODELS,
            default_provider=r.choice("DEFAULT_PROVIDER", tuple(PROVIDER_ALIASES), None),
            echo_provider=r.bool("ECHO_PROVIDER", not production),
            system_prompt=r.str("SYSTEM_PROMPT") or DEFAULT_SYSTEM_PROMPT,
            redis_url=r.redis_url("REDIS_URL"),
            ratelimit_per_minute=r.int("RATELIMIT_PER_MINUTE", 10, lo=1),
            ratelimit_per_hour=r.int("RATELIMIT_PER_HOUR", 100, lo=1),
            ratelimit_per_day=r.int("RATELIMIT_PER_DAY", 500, lo=1),
            api_tokens=r.list("API_TOKENS"),
            trusted_proxies=r.networks("TRUSTED_PROXIES"),
            cors_origins=r.origins("CORS_ORIGINS"),
            max_tokens=r.int("MAX_TOKENS", 1000, lo=1),
            temperature=r.float("TEMPERATURE", 0.7, lo=0.0, hi=2.0),
            max_message_chars=r.int("MAX_MESSAGE_CHARS", 4000, lo=1),
            max_history_messages=r.int("MAX_HISTORY_MESSAGES", 50, lo=0),
            max_body_bytes=r.int("MAX_BODY_BYTES", 262_144, lo=1),
            upstream_timeout_s=r.float("UPSTREAM_TIMEOUT_S", 60.0, lo=0.001),
            sse_heartbeat_s=r.float("SSE_HEARTBEAT_S", 15.0, lo=0.001),
            upstream_max_retries=r.int("UPSTREAM_MAX_RETRIES", 2, lo=0, hi=10),
            request_body_timeout_s=r.float("REQUEST_BODY_TIMEOUT_S", 10.0, lo=0.001),
            shutdown_grace_s=r.float("SHUTDOWN_GRACE_S", 25.0, lo=0, hi=3600),
            max_concurrency=r.int("MAX_CONCURRENCY", 4096, lo=1, hi=1_000_000),
            metrics_token=r.raw("METRICS_TOKEN") or "",
            log_level=r.choice("LOG_LEVEL", LOG_LEVELS, "INFO", upper=True) or "INFO",
            log_file=r.raw("LOG_FILE", "logs/app.log") or None,
            provider_sdk_config=r.raw("PWACHAT_SDK_CONFIG") or None,
            metrics_dir=r.raw("PWACHAT_METRICS_DIR") or None,
        )
        if s.default_provider is not None:
            name = PROVIDER_ALIASES[s.default_provider]
            if not s.provider_configured(name):
                raise ConfigError(
                    f"DEFAULT_PROVIDER: {s.default_provider!r} cannot serve "
                    f"({'ECHO_PROVIDER is off' if name == 'echo' else 'its API key is not set'})"
                )
            s = msgspec.structs.replace(s, default_provider=name)
        else:
            first = next((p for p in ("openai", "claude", "echo") if s.provider_configured(p)), None)
            s = msgspec.structs.replace(s, default_provider=first)
        return s


class _Reader:
    """Typed reads of one mapping; every failure names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        return default if value is None else value.strip()

    def str(self, name: str) -> str | None:
        return self.raw(name) or None

    def _number(self, name: str, default: T, parse: Callable[[str], T], kind: str, lo, hi) -> T:
        text = self.raw(name)
        if not text:
            return default
        try:
            value = parse(text)
        except ValueError:
            raise ConfigError(f"{name}: expected {kind}, got {text!r}") from None
        if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigError(f"{name}: must be {bounds}, got {text!r}")
        return value

    def int(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        return self._number(name, default, int, "an integer", lo, hi)

    def float(self, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        return self._number(name, default, float, "a number", lo, hi)

    def bool(self, name: str, default: bool) -> bool:
        text = (self.raw(name) or "").lower()
        if not text:
            return default
        if text in _ON:
            return True
        if text in _OFF:
            return False
        raise ConfigError(f"{name}: expected on/off (or true/false, 1/0, yes/no), got {text!r}")

    def choice(
        self, name: str, options: tuple[str, ...], default: str | None, alias: str | None = None, upper=False
    ) -> str | None:
        used = name
        text = self.raw(name)
        if not text and alias is not None:
            used, text = alias, self.raw(alias)
        if not text:
            return default
        text = text.upper() if upper else text.lower()
        if text not in options:
            raise ConfigError(f"{used}: must be one of {', '.join(options)}; got {text!r}")
        return text

    def list(self, name: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in (self.raw(name) or "").split(",") if item.strip())

    def url(self, name: str) -> str | None:
        text = self.str(name)
        if text is None:
            return None
        # Never echoed: a URL may carry credentials.
        parts = _split(name, text)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{name}: expected an http(s) URL like https://host/v1, got a malformed value")
        _port(name, parts)
        if not parts.hostname:
            raise ConfigError(f"{name}: the URL has no host name")
        return text.rstrip("/")

    def redis_url(self, name: str) -> str:
        text = self.str(name) or "memory://"
        if text == "memory://":
            return text
        scheme, sep, _ = text.partition("://")
        if not sep or (scheme not in REDIS_SCHEMES and scheme not in CLUSTER_SCHEMES):
            raise ConfigError(
                f"{name}: expected memory://, redis://, rediss://, unix://, redis+cluster:// or "
                "rediss+cluster:// URL, got a malformed value"
            )
        if scheme in CLUSTER_SCHEMES:
            _check_cluster_url(name, text)
        else:
            _check_redis_url(name, text)
        return text

    def networks(self, name: str) -> tuple[str, ...]:
        out = []
        for item in self.list(name):
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ConfigError(f"{name}: {item!r} is not an IP address or CIDR network") from None
        return tuple(out)

    def origins(self, name: str) -> tuple[str, ...]:
        out = []
        for n, item in enumerate(self.list(name), 1):
            if item == "*":
                out.append(item)
                continue
            # The item is not echoed (it might hold credentials by mistake); its place in the list is.
            bad = ConfigError(f"{name}: item {n} is not an origin like https://chat.example.com")
            try:
                parts = urlsplit(item)
                port = parts.port
            except ValueError:
                raise bad from None
            host = parts.hostname
            if (
                parts.scheme not in ("http", "https")
                or not host
                or "@" in parts.netloc
                or parts.path not in ("", "/")
                or "?" in item
                or "#" in item
                or port == 0
            ):
                raise bad
            # As a browser sends it in `Origin`: lower case, no default port.
            host = f"[{host}]" if ":" in host else host
            default = 443 if parts.scheme == "https" else 80
            out.append(f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}"))
        return tuple(out)


def _split(name: str, text: str) -> SplitResult:
    try:
        return urlsplit(text)
    except ValueError:  # an unbalanced [ in an IPv6 host
        raise ConfigError(f"{name}: the URL is malformed (an unbalanced [ or ] around the host)") from None


def _port(name: str, parts: SplitResult) -> int | None:
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"{name}: the port is not a number between 1 and 65535")
    return port


def _check_redis_url(name: str, text: str) -> None:
    """Parse `text` as redis-py will when the limiter starts (pwachat/redis_limiter.py), and build
    one of its connections, without connecting: a URL that would only fail in a worker, after
    start-up, fails here with one line instead. Nothing of the URL is quoted back."""
    parts = _split(name, text)
    _port(name, parts)
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{name}: a unix:// URL needs the socket path, like unix:///run/redis.sock")
    else:
        if not parts.hostname:
            raise ConfigError(f"{name}: the URL has no host name, like redis://localhost:6379/0")
        # redis-py reads the path as the database number and silently ignores one it cannot read.
        if not re.fullmatch(r"/?(\d+/?)?", unquote(parts.path)):
            raise ConfigError(f"{name}: the path must be the database number, like /0")

    from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, ConnectionPool

    query = parse_qs(parts.query)  # as redis-py reads it: the first value of each name
    for option, values in query.items():
        parse = URL_QUERY_ARGUMENT_PARSERS.get(option)
        try:
            if parse is not None:
                parse(values[0])
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: the {option} option has a value redis-py cannot read") from None
    try:
        pool = ConnectionPool.from_url(text)
    except Exception:  # whatever redis-py makes of the URL, it must not start
        raise ConfigError(f"{name}: redis-py cannot use this URL") from None
    known = _redis_options(pool.connection_class)
    for n, option in enumerate(query, 1):
        if option not in known:
            # Named by its place, not its name: the name is part of the value, which is not echoed.
            raise ConfigError(f"{name}: query option {n} is not one redis-py takes for {parts.scheme}://")
    try:
        pool.make_connection()  # builds the connection object (what the limiter does); no I/O
    except Exception:
        raise ConfigError(f"{name}: a query option has a value redis-py cannot use") from None


def split_cluster_url(text: str) -> tuple[str, tuple[tuple[str, int], ...]] | None:
    """A `redis+cluster://` URL as redis-py's URL for one node (the first seed, with the same
    credentials and options) and every seed node's (host, port); None for any other URL. The seeds
    are where the limiter first asks for the cluster's slot map: list more than one so that a seed
    down at start-up is not an outage."""
    scheme, sep, rest = text.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme)
    if not sep or plain is None:
        return None
    cut = re.search(r"[/?#]", rest)
    netloc, tail = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
    userinfo, at, hosts = netloc.rpartition("@")
    seeds = []
    for item in hosts.split(","):
        parts = urlsplit("//" + item)
        seeds.append((parts.hostname or "", parts.port or 6379))
    return f"{plain}://{userinfo}{at}{hosts.split(',')[0]}{tail}", tuple(seeds)


def _check_cluster_url(name: str, text: str) -> None:
    """A `redis+cluster://` URL: every seed a host (and port), database 0 (a cluster has no other),
    then the first seed's URL checked as any redis:// URL (credentials, TLS and query options are
    the same for every node). Nothing of the URL is quoted back."""
    _, _, rest = text.partition("://")
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    for n, item in enumerate(netloc.rpartition("@")[2].split(","), 1):
        parts = _split(name, "//" + item)
        if not parts.hostname:
            raise ConfigError(f"{name}: cluster seed {n} has no host name, like redis+cluster://host:7000")
        _port(name, parts)
    plain, _ = split_cluster_url(text)  # type: ignore[misc]
    path = unquote(_split(name, plain).path)
    if path not in ("", "/", "/0", "/0/"):
        raise ConfigError(f"{name}: Redis Cluster has only database 0; the path must be empty or /0")
    _check_redis_url(name, plain)


def _redis_options(connection_class: type) -> frozenset[str]:
    """The keyword arguments a redis-py connection of that class (and its pool) takes: the query
    options it knows."""
    from redis.asyncio.connection import ConnectionPool

    names = set(inspect.signature(ConnectionPool).parameters)
    for cls in connection_class.__mro__:
        if "__init__" in vars(cls):
            names.update(inspect.signature(cls.__init__).parameters)
    return frozenset(names - {"self", "kwargs", "connection_kwargs", "connection_class"})
