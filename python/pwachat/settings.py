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

__all__ = [
    "BREAKER_FAILURES",
    "BUILTIN_PROVIDERS",
    "PROVIDER_ALIASES",
    "ConfigError",
    "ProviderSpec",
    "Settings",
    "fallback_variables",
]

T = TypeVar("T")

DEFAULT_OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")
DEFAULT_ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Fallback-worthy failures in a row after which a provider with a fallback is skipped straight to
#: it for `PROVIDER_BREAKER_S` (contract, "Providers": 5).
BREAKER_FAILURES = 5
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port...][?options]` (the scheme
#: the `limits` library uses too), with `rediss+cluster://` for TLS; each scheme to the one of a node.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class ProviderSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One provider: who it is and, once the settings are read, how to reach it.

    The one place a provider's identity is written: settings, the provider objects
    (`providers/__init__.py:build_providers`), `/api/models`, `/api/health`, the SDK hand-off and
    the metrics label sets all read `Settings.providers`, a tuple of these: `BUILTIN_PROVIDERS`
    filled in from their variables, with the `PROVIDERS` entries before `echo`.
    """

    #: The canonical name: what requests may send, and what answers, logs, health and metrics say.
    name: str
    #: The human name: `/api/models` (the PWA's picker shows it) and error messages.
    label: str
    #: The wire format: the request body and stream parser, and which official SDK says the headers.
    format: Literal["openai", "anthropic", "echo"]
    #: `module:Class` of the provider object; imported only when the provider can serve.
    factory: str
    #: Other spellings a request may use for `name` (any case).
    aliases: tuple[str, ...] = ()
    #: The prefix of its variables: `{env}_API_KEY`, `{env}_BASE_URL`, `{env}_MODELS` (echo has none).
    env: str = ""
    models: tuple[str, ...] = ()  # the first is the default
    api_key: str | None = None
    base_url: str | None = None  # None: the SDK's default (the vendor's public API)
    #: Without a key it cannot serve, unless its base URL is on this host (the vendors' own APIs).
    key_required: bool = False
    builtin: bool = True
    #: `N_FALLBACK=other[:model]`, resolved: the canonical name and the model a request that this
    #: provider failed (before its stream was committed) is retried on, once. None: no fallback.
    fallback: tuple[str, str] | None = None


#: The provider objects of each wire format, for the `PROVIDERS` entries (`N_FORMAT`).
FORMAT_FACTORIES = {
    "openai": "pwachat.providers.openai:OpenAIProvider",
    "anthropic": "pwachat.providers.anthropic:AnthropicProvider",
}

#: The built-in providers, in the order `/api/models` lists them (custom ones go before `echo`).
BUILTIN_PROVIDERS = (
    ProviderSpec(
        name="openai",
        label="OpenAI",
        format="openai",
        factory=FORMAT_FACTORIES["openai"],
        env="OPENAI",
        models=DEFAULT_OPENAI_MODELS,
        key_required=True,
    ),
    ProviderSpec(
        name="claude",
        label="Anthropic",
        format="anthropic",
        factory=FORMAT_FACTORIES["anthropic"],
        aliases=("anthropic",),
        env="ANTHROPIC",
        models=DEFAULT_ANTHROPIC_MODELS,
        key_required=True,
    ),
    # Switched by ECHO_PROVIDER; no variables of its own.
    ProviderSpec(
        name="echo",
        label="Echo (offline)",
        format="echo",
        factory="pwachat.providers.echo:EchoProvider",
        models=("echo",),
    ),
)

#: Every spelling a client may use for a built-in provider, to the one name responses and logs use
#: (`Settings.provider_aliases` has the `PROVIDERS` entries too).
PROVIDER_ALIASES = {a: spec.name for spec in BUILTIN_PROVIDERS for a in (spec.name, *spec.aliases)}
#: A `PROVIDERS` entry: lower case, a letter first, at most 32 characters (also a variable prefix).
PROVIDER_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
PROVIDER_FORMATS = ("openai", "anthropic")

#: The largest token budget: Redis's script reads counts as doubles, exact below 2**53.
BUDGET_MAX = 10**15

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

    #: Every provider this deployment knows, serving or not (see `ProviderSpec`): the built-ins with
    #: OPENAI_* / ANTHROPIC_* filled in, and the PROVIDERS entries (their N_* variables) before echo.
    providers: tuple[ProviderSpec, ...] = BUILTIN_PROVIDERS
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
    #: Egress proxies (pwachat/providers/proxy.py): `HTTPS_PROXY` for https base URLs (a CONNECT
    #: tunnel), `HTTP_PROXY` for http ones (absolute-form requests), `NO_PROXY` the hosts reached
    #: directly. Each also read lower-case, which wins (as curl and Python's urllib do). Checked at
    #: start-up; errors name the variable, never the value (it may hold a password).
    https_proxy: str | None = None
    http_proxy: str | None = None
    no_proxy: str = ""
    #: How long a provider with a fallback is skipped straight to it once it has failed
    #: `BREAKER_FAILURES` times in a row (the circuit breaker; then one request tries it again).
    provider_breaker_s: float = 30.0
    request_body_timeout_s: float = 10.0
    #: On SIGTERM, how long running streams may go on before they are ended with `shutting_down`
    #: (Granian's worker kill timeout is a little longer; compose's stop_grace_period longer still).
    shutdown_grace_s: float = 25.0
    #: Resumable streams (pwachat/streams.py): how long a stream nobody reads any more goes on
    #: being generated, waiting for a resume (0: cancelled at once); how long its events stay
    #: readable after its end; and the most memory one worker keeps for ended streams' events
    #: (past it, the oldest ended streams are forgotten first).
    stream_grace_s: float = 20.0
    stream_retain_s: float = 120.0
    stream_memory_mb: int = 256
    #: Token budgets (pwachat/budgets.py) over a sliding day, input + output tokens: per caller,
    #: and for the whole deployment (every caller together); 0 turns one off.
    tokens_per_day: int = 200_000
    tokens_global_per_day: int = 0
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

    def provider(self, name: str) -> ProviderSpec:
        """The provider of that canonical name (KeyError if none)."""
        for spec in self.providers:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def provider_aliases(self) -> dict[str, str]:
        """Every spelling a request may use, to the canonical name."""
        return {a: spec.name for spec in self.providers for a in (spec.name, *spec.aliases)}

    @property
    def provider_models(self) -> dict[str, tuple[str, ...]]:
        """Each known provider's models, serving or not, in the table's order."""
        return {spec.name: spec.models for spec in self.providers}

    def provider_configured(self, name: str) -> bool:
        """Whether that provider can serve: echo when switched on; a built-in vendor with its key,
        or without one against a server on this host (Ollama, vLLM, llama.cpp); a PROVIDERS entry
        always (its key is optional)."""
        spec = next((s for s in self.providers if s.name == name), None)
        if spec is None:
            return False
        if spec.format == "echo":
            return self.echo_provider
        return bool(spec.api_key) or not spec.key_required or is_loopback_url(spec.base_url)

    @property
    def needs_sdk(self) -> bool:
        """Whether a serving provider talks HTTP, so that the SDKs' client configuration is needed."""
        return any(s.format != "echo" and self.provider_configured(s.name) for s in self.providers)

    # The built-ins' values by their old names (the table is what they read).
    @property
    def openai_api_key(self) -> str | None:
        return self.provider("openai").api_key

    @property
    def openai_base_url(self) -> str | None:
        return self.provider("openai").base_url

    @property
    def openai_models(self) -> tuple[str, ...]:
        return self.provider("openai").models

    @property
    def anthropic_api_key(self) -> str | None:
        return self.provider("claude").api_key

    @property
    def anthropic_base_url(self) -> str | None:
        return self.provider("claude").base_url

    @property
    def anthropic_models(self) -> tuple[str, ...]:
        return self.provider("claude").models

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

        providers = _read_providers(r)
        aliases = {a: spec.name for spec in providers for a in (spec.name, *spec.aliases)}
        s = cls(
            app_env=app_env,  # type: ignore[arg-type]
            secret_key=secret_key,
            host=r.str("HOST") or "127.0.0.1",
            port=r.int("PORT", 5000, lo=1, hi=65535),
            workers=r.int("WORKERS", 1, lo=1, hi=512),
            providers=providers,
            default_provider=r.choice("DEFAULT_PROVIDER", tuple(aliases), None),
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
            https_proxy=r.proxy("HTTPS_PROXY"),
            http_proxy=r.proxy("HTTP_PROXY"),
            no_proxy=r.raw("no_proxy") or r.raw("NO_PROXY") or "",
            provider_breaker_s=r.float("PROVIDER_BREAKER_S", 30.0, lo=0.001, hi=86400),
            request_body_timeout_s=r.float("REQUEST_BODY_TIMEOUT_S", 10.0, lo=0.001),
            shutdown_grace_s=r.float("SHUTDOWN_GRACE_S", 25.0, lo=0, hi=3600),
            stream_grace_s=r.float("STREAM_GRACE_S", 20.0, lo=0, hi=3600),
            stream_retain_s=r.float("STREAM_RETAIN_S", 120.0, lo=0, hi=86400),
            stream_memory_mb=r.int("STREAM_MEMORY_MB", 256, lo=1, hi=1_000_000),
            tokens_per_day=r.int("TOKENS_PER_DAY", 200_000, lo=0, hi=BUDGET_MAX),
            tokens_global_per_day=r.int("TOKENS_GLOBAL_PER_DAY", 0, lo=0, hi=BUDGET_MAX),
            max_concurrency=r.int("MAX_CONCURRENCY", 4096, lo=1, hi=1_000_000),
            metrics_token=r.raw("METRICS_TOKEN") or "",
            log_level=r.choice("LOG_LEVEL", LOG_LEVELS, "INFO", upper=True) or "INFO",
            log_file=r.raw("LOG_FILE", "logs/app.log") or None,
            provider_sdk_config=r.raw("PWACHAT_SDK_CONFIG") or None,
            metrics_dir=r.raw("PWACHAT_METRICS_DIR") or None,
        )
        if s.tokens_global_per_day and split_cluster_url(s.redis_url) is not None:
            # The deployment's budget and a caller's limits in one atomic script need one slot.
            raise ConfigError(
                "TOKENS_GLOBAL_PER_DAY: not available with a Redis Cluster (one atomic check cannot "
                "span two hash slots); use a single Redis (with replicas) or leave it 0"
            )
        if s.default_provider is not None:
            name = aliases[s.default_provider]
            if not s.provider_configured(name):
                raise ConfigError(
                    f"DEFAULT_PROVIDER: {s.default_provider!r} cannot serve "
                    f"({'ECHO_PROVIDER is off' if name == 'echo' else 'its API key is not set'})"
                )
            s = msgspec.structs.replace(s, default_provider=name)
        else:
            first = next((p.name for p in providers if s.provider_configured(p.name)), None)
            s = msgspec.structs.replace(s, default_provider=first)
        for spec in s.providers:
            # A fallback must be able to serve whenever the provider falling back to it can.
            if spec.fallback is not None and s.provider_configured(spec.name):
                target = spec.fallback[0]
                if not s.provider_configured(target):
                    why = "ECHO_PROVIDER is off" if target == "echo" else "its API key is not set"
                    name = next(v for v in fallback_variables(spec) if r.str(v))
                    raise ConfigError(f"{name}: {target!r} cannot serve ({why})")
        return s


def _read_providers(r: _Reader) -> tuple[ProviderSpec, ...]:
    """The table: the built-ins with their variables, then each PROVIDERS entry (before echo)."""
    builtins = [
        spec
        if not spec.env
        else msgspec.structs.replace(
            spec,
            api_key=r.str(f"{spec.env}_API_KEY"),
            base_url=r.url(f"{spec.env}_BASE_URL"),
            models=r.list(f"{spec.env}_MODELS") or spec.models,
        )
        for spec in BUILTIN_PROVIDERS
    ]
    taken: set[str] = set()
    custom = []
    for n, name in enumerate(r.list("PROVIDERS"), 1):
        if not PROVIDER_NAME.fullmatch(name):
            raise ConfigError(
                f"PROVIDERS: item {n} ({name[:40]!r}) must be a lower-case name like local or groq "
                "(a letter, then up to 31 letters, digits or _)"
            )
        if name in PROVIDER_ALIASES:
            raise ConfigError(f"PROVIDERS: {name!r} is a built-in provider's name; choose another")
        if name in taken:
            raise ConfigError(f"PROVIDERS: {name!r} is listed twice")
        taken.add(name)
        env = name.upper()
        base_url = r.url(f"{env}_BASE_URL")
        if base_url is None:
            raise ConfigError(f"{env}_BASE_URL: must be set for the provider {name!r} named in PROVIDERS")
        models = r.list(f"{env}_MODELS")
        if not models:
            raise ConfigError(
                f"{env}_MODELS: must list the models of the provider {name!r} "
                "(comma-separated, the first its default)"
            )
        wire = r.choice(f"{env}_FORMAT", PROVIDER_FORMATS, "openai") or "openai"
        custom.append(
            ProviderSpec(
                name=name,
                label=r.str(f"{env}_LABEL") or name,
                format=wire,  # type: ignore[arg-type]
                factory=FORMAT_FACTORIES[wire],
                env=env,
                models=models,
                api_key=r.str(f"{env}_API_KEY"),
                base_url=base_url,
                builtin=False,
            )
        )
    # Before echo: the first that can serve is the default provider, and echo is the offline last resort.
    at = next((i for i, spec in enumerate(builtins) if spec.format == "echo"), len(builtins))
    table = (*builtins[:at], *custom, *builtins[at:])
    # Fallbacks last: a provider may fall back to one listed after it.
    return tuple(_with_fallback(r, spec, table) for spec in table)


def fallback_variables(spec: ProviderSpec) -> tuple[str, ...]:
    """The variables of a provider's fallback: `N_FALLBACK`, N its name upper-cased, and for a
    built-in whose other variables have another prefix that one's too (claude: `CLAUDE_FALLBACK`,
    then `ANTHROPIC_FALLBACK`). None for echo: it never fails."""
    if spec.format == "echo":
        return ()
    own = f"{spec.name.upper()}_FALLBACK"
    prefixed = f"{spec.env}_FALLBACK" if spec.env else own
    return (own,) if prefixed == own else (own, prefixed)


def _with_fallback(r: _Reader, spec: ProviderSpec, table: tuple[ProviderSpec, ...]) -> ProviderSpec:
    """`spec` with its fallback resolved against the whole table: `other[:model]`, `other` any
    spelling of another provider's name, `model` one of its models (default its first)."""
    found = [(name, text) for name in fallback_variables(spec) if (text := r.str(name))]
    if not found:
        return spec
    name, text = found[0]
    if len(found) > 1 and found[1][1] != text:
        raise ConfigError(f"{name}: {found[1][0]} is set too, to another value; set one of them")
    # Split at the first colon only: model ids may hold colons (Ollama's `qwen2.5:0.5b`).
    target, colon, model = text.partition(":")
    aliases = {a: s.name for s in table for a in (s.name, *s.aliases)}
    to = aliases.get(target.strip().lower())
    if to is None:
        raise ConfigError(
            f"{name}: {target[:40]!r} is not a provider; expected one of "
            f"{', '.join(s.name for s in table)}, optionally followed by :model"
        )
    if to == spec.name:
        raise ConfigError(f"{name}: a provider cannot fall back to itself")
    models = next(s.models for s in table if s.name == to)
    model = model.strip()
    if colon and not model:
        raise ConfigError(f"{name}: nothing follows the ':'; name one of {to}'s models, or leave the ':' out")
    if colon and model not in models:
        raise ConfigError(f"{name}: {model[:80]!r} is not one of {to}'s models ({', '.join(models)})")
    return msgspec.structs.replace(spec, fallback=(to, model or models[0]))


def is_loopback_url(url: str | None) -> bool:
    """Whether the URL's host is this machine: `localhost` (or a name under it) or a loopback IP."""
    host = urlsplit(url).hostname if url else None
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Reader:
    """Typed reads of one mapping; every failure names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        return default if value is None else value.strip()

    def str(self, name: str) -> str | None:
        return self.raw(name) or None

    def proxy(self, name: str) -> str | None:
        """A `*_PROXY` URL, the lower-case spelling first; the error names the variable only."""
        from pwachat.providers.proxy import parse_proxy_url  # not at import: providers import us

        for spelling in (name.lower(), name):
            value = self.raw(spelling)
            if value:
                try:
                    parse_proxy_url(value)
                except ValueError as err:
                    raise ConfigError(f"{spelling}: {err}") from None
                return value
        return None

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
