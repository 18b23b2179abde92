"""Configuration: defaults, `.env` precedence, and the values that must stop start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from pwachat import cli
from pwachat.settings import ConfigError, Settings


def load(**env: str) -> Settings:
    return Settings.from_mapping(env)


def test_defaults_match_the_contract() -> None:
    s = load()
    assert (s.app_env, s.host, s.port, s.workers) == ("development", "127.0.0.1", 5000, 1)
    assert (s.ratelimit_per_minute, s.ratelimit_per_hour, s.ratelimit_per_day) == (10, 100, 500)
    assert (s.max_tokens, s.temperature) == (1000, 0.7)
    assert (s.max_message_chars, s.max_history_messages, s.max_body_bytes) == (4000, 50, 262_144)
    assert (s.upstream_timeout_s, s.sse_heartbeat_s) == (60, 15)
    assert (s.log_level, s.log_file) == ("INFO", "logs/app.log")
    assert s.redis_url == "memory://"
    assert s.api_tokens == () and s.trusted_proxies == () and s.cors_origins == ()
    assert s.echo_provider is True
    assert s.default_provider == "echo"
    assert s.openai_models and s.anthropic_models
    assert s.system_prompt.strip()


def test_secret_key_is_random_per_process_in_development() -> None:
    a, b = load().secret_key, load().secret_key
    assert a and b and a != b and len(a) >= 16
    assert load(SECRET_KEY="fixed").secret_key == "fixed"


def test_echo_is_off_in_production_unless_switched_on() -> None:
    assert load(APP_ENV="production", SECRET_KEY="s").echo_provider is False
    assert load(APP_ENV="production", SECRET_KEY="s", ECHO_PROVIDER="on").echo_provider is True
    assert load(ECHO_PROVIDER="off").echo_provider is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[("on", True), ("true", True), ("1", True), ("yes", True), ("ON", True)],
        *[("off", False), ("false", False), ("0", False), ("no", False), ("Off", False)],
    ],
)
def test_on_off_spellings(value: str, expected: bool) -> None:
    assert load(ECHO_PROVIDER=value).echo_provider is expected


def test_flask_env_is_an_alias_for_app_env() -> None:
    assert load(FLASK_ENV="production", SECRET_KEY="s").production
    assert load(FLASK_ENV="development").app_env == "development"
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load(FLASK_ENV="production")


def test_default_provider_is_the_first_configured() -> None:
    assert load(ANTHROPIC_API_KEY="a").default_provider == "claude"
    assert load(ANTHROPIC_API_KEY="a", OPENAI_API_KEY="o").default_provider == "openai"
    assert load(ECHO_PROVIDER="off").default_provider is None
    assert load(ANTHROPIC_API_KEY="a", DEFAULT_PROVIDER="echo").default_provider == "echo"
    assert load(ANTHROPIC_API_KEY="a", DEFAULT_PROVIDER="anthropic").default_provider == "claude"


def test_lists_are_comma_separated_and_trimmed() -> None:
    s = load(OPENAI_MODELS=" m1 , m2,,m3 ", API_TOKENS="alpha, beta", CORS_ORIGINS="https://a.example")
    assert s.openai_models == ("m1", "m2", "m3")
    assert s.api_tokens == ("alpha", "beta")
    assert s.cors_origins == ("https://a.example",)


# --------------------------------------------------------------------------------------------
# .env
# --------------------------------------------------------------------------------------------


def write_env(path: Path, **values: str) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
    return path


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = write_env(tmp_path / ".env", RATELIMIT_PER_MINUTE="7", MAX_TOKENS="33", APP_ENV="bogus")
    s = Settings.from_env(environ={"RATELIMIT_PER_MINUTE": "9", "APP_ENV": "development"}, env_file=env_file)
    assert s.ratelimit_per_minute == 9  # environment wins
    assert s.max_tokens == 33  # .env fills in
    assert s.app_env == "development"  # a bad .env value the environment overrides is harmless


def test_dotenv_in_the_working_directory_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_env(tmp_path / ".env", RATELIMIT_PER_HOUR="42")
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env(environ={}).ratelimit_per_hour == 42
    assert Settings.from_env(environ={"RATELIMIT_PER_HOUR": "43"}).ratelimit_per_hour == 43


def test_missing_dotenv_is_fine(tmp_path: Path) -> None:
    s = Settings.from_env(environ={"MAX_TOKENS": "12"}, env_file=tmp_path / "absent.env")
    assert s.max_tokens == 12


def test_bad_value_in_dotenv_stops_start_up(tmp_path: Path) -> None:
    env_file = write_env(tmp_path / ".env", RATELIMIT_PER_DAY="lots")
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ={}, env_file=env_file)
    assert "RATELIMIT_PER_DAY" in str(info.value)


# --------------------------------------------------------------------------------------------
# Values that stop start-up
# --------------------------------------------------------------------------------------------

BAD = [
    ("RATELIMIT_PER_MINUTE", "ten"),
    ("RATELIMIT_PER_MINUTE", "0"),
    ("RATELIMIT_PER_MINUTE", "-1"),
    ("RATELIMIT_PER_MINUTE", "1.5"),
    ("RATELIMIT_PER_HOUR", "0"),
    ("RATELIMIT_PER_DAY", "-5"),
    ("RATELIMIT_PER_DAY", "many"),
    ("MAX_TOKENS", "0"),
    ("MAX_TOKENS", "lots"),
    ("MAX_MESSAGE_CHARS", "0"),
    ("MAX_BODY_BYTES", "-1"),
    ("PORT", "http"),
    ("WORKERS", "0"),
    ("UPSTREAM_TIMEOUT_S", "0"),
    ("UPSTREAM_TIMEOUT_S", "soon"),
    ("SSE_HEARTBEAT_S", "-1"),
    ("TEMPERATURE", "-0.1"),
    ("TEMPERATURE", "2.1"),
    ("TEMPERATURE", "hot"),
    ("TEMPERATURE", "nan"),
    ("LOG_LEVEL", "LOUD"),
    ("LOG_LEVEL", "verbose"),
    ("APP_ENV", "staging"),
    ("APP_ENV", "prod"),
    ("FLASK_ENV", "testing"),
    ("DEFAULT_PROVIDER", "gemini"),
    ("ECHO_PROVIDER", "maybe"),
    ("ECHO_PROVIDER", "enabled"),
    ("REDIS_URL", "localhost:6379"),
    ("REDIS_URL", "http://localhost:6379"),
    ("REDIS_URL", "redis:/localhost"),
    ("REDIS_URL", "redis://"),
    ("REDIS_URL", "memory"),
    ("TRUSTED_PROXIES", "10.0.0.0/8, not-an-ip"),
    ("CORS_ORIGINS", "app.example"),
    ("OPENAI_BASE_URL", "localhost:8080"),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_value_stops_start_up_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{name: value})
    message = str(info.value)
    assert name in message
    assert "\n" not in message and message.strip() == message and len(message) < 300


@pytest.mark.parametrize(
    "value",
    ["memory://", "redis://localhost:6379/0", "rediss://:pw@cache.example:6380", "unix:///run/redis.sock"],
)
def test_accepted_redis_urls(value: str) -> None:
    assert load(REDIS_URL=value).redis_url == value


@pytest.mark.parametrize("value", ["0", "2", "1.3"])
def test_temperature_bounds_are_inclusive(value: str) -> None:
    assert load(TEMPERATURE=value).temperature == float(value)


def test_production_without_secret_key_stops_start_up() -> None:
    with pytest.raises(ConfigError) as info:
        load(APP_ENV="production")
    assert "SECRET_KEY" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load(APP_ENV="production", SECRET_KEY="   ")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "redis//:hunter2-secret@localhost:6379"),
        ("REDIS_URL", "http://:hunter2-secret@localhost:6379"),
        ("REDIS_URL", "hunter2-secret"),
        ("OPENAI_BASE_URL", "ftp://user:hunter2-secret@llm.example"),
        ("ANTHROPIC_BASE_URL", "user:hunter2-secret@llm.example"),
    ],
)
def test_config_error_does_not_echo_secrets(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{name: value})
    assert name in str(info.value)
    assert "hunter2-secret" not in str(info.value)


def test_cli_prints_one_line_and_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("RATELIMIT_PER_MINUTE", "ten")

    def must_not_serve(*args: object) -> int:
        raise AssertionError("started serving despite a bad configuration")

    monkeypatch.setattr(cli, "serve", must_not_serve)
    with pytest.raises(SystemExit) as info:
        raise SystemExit(cli.main(["serve"]))
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RATELIMIT_PER_MINUTE" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# URL-shaped settings are parsed in full at start-up, as their clients will parse them
# --------------------------------------------------------------------------------------------

BAD_URLS = [
    # REDIS_URL: what redis-py would only trip over in a worker, after start-up
    ("REDIS_URL", "redis://127.0.0.1:notaport/0"),
    ("REDIS_URL", "redis://127.0.0.1:99999/0"),
    ("REDIS_URL", "redis://127.0.0.1:0/0"),
    ("REDIS_URL", "redis://[::1/0"),
    ("REDIS_URL", "redis://:hunter2-secret@/0"),
    ("REDIS_URL", "redis://127.0.0.1:6379/abc"),
    ("REDIS_URL", "redis://127.0.0.1:6379/-1"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0/1"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?db=x"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?foo=1"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=soon"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?protocol=9"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?ssl_cert_reqs=none"),  # a TLS option on plain TCP
    ("REDIS_URL", "redis://127.0.0.1:6379/0?retry=3"),
    ("REDIS_URL", "rediss://cache.example:6380/0?ssl_cert_reqs=sometimes"),
    ("REDIS_URL", "rediss://:hunter2-secret@cache.example:port/0"),
    ("REDIS_URL", "unix://"),
    ("REDIS_URL", "unix:///run/redis.sock?db=zero"),
    # the providers' base URLs: the port must parse, a host must be there
    ("OPENAI_BASE_URL", "http://127.0.0.1:notaport/v1"),
    ("OPENAI_BASE_URL", "https://llm.example:70000/v1"),
    ("OPENAI_BASE_URL", "http://:8080/v1"),
    ("OPENAI_BASE_URL", "http://[::1/v1"),
    ("ANTHROPIC_BASE_URL", "https://user:hunter2-secret@llm.example:port"),
    ("ANTHROPIC_BASE_URL", "https://:443"),
    # origins: scheme://host[:port] and nothing else
    ("CORS_ORIGINS", "https://a.example:notaport"),
    ("CORS_ORIGINS", "https://a.example, https://b.example:99999"),
    ("CORS_ORIGINS", "https://user:hunter2-secret@a.example"),
    ("CORS_ORIGINS", "https://:8443"),
    ("CORS_ORIGINS", "https://a.example?x=1"),
    ("CORS_ORIGINS", "https://a.example/#top"),
    ("CORS_ORIGINS", "https://[::1"),
]


@pytest.mark.parametrize(("name", "value"), BAD_URLS, ids=[f"{n}={v}" for n, v in BAD_URLS])
def test_malformed_url_stops_start_up_naming_only_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message and len(message) < 300
    # Never the value, nor a piece of it: it may carry a password.
    for piece in ("hunter2", "notaport", "99999", "70000", "abc", "soon", "sometimes", "zero", "foo"):
        assert piece not in message, message


@pytest.mark.parametrize(
    "value",
    [
        "redis://localhost",
        "redis://localhost:6379",
        "redis://localhost:6379/",
        "redis://localhost:6379/15",
        "redis://user:p%40ss@localhost:6379/0",
        "redis://[::1]:6379/0",
        "redis://localhost/0?socket_timeout=1.5&protocol=3&client_name=pwachat",
        "redis://localhost?db=3",
        "rediss://cache.example:6380/0?ssl_cert_reqs=none",
        "unix:///run/redis.sock",
        "unix:///run/redis.sock?db=2&password=x",
    ],
)
def test_redis_urls_redis_py_accepts_are_accepted(value: str) -> None:
    assert load(REDIS_URL=value).redis_url == value


@pytest.mark.parametrize(
    "value",
    ["http://127.0.0.1:8080/v1", "https://llm.example/v1?api-version=2024-10-21", "http://[::1]:11434/v1"],
)
def test_good_base_urls_are_kept(value: str) -> None:
    assert load(OPENAI_BASE_URL=value, ANTHROPIC_BASE_URL=value + "/").openai_base_url == value


def test_origins_are_kept_as_browsers_send_them() -> None:
    s = load(CORS_ORIGINS="HTTPS://App.Example:443/, http://localhost:5173, https://[::1]:8443, *")
    assert s.cors_origins == ("https://app.example", "http://localhost:5173", "https://[::1]:8443", "*")


BAD_AT_SERVE = [
    ("REDIS_URL", "redis://127.0.0.1:notaport/0"),
    ("REDIS_URL", "redis://:hunter2@127.0.0.1:6379/0?foo=1"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?db=x"),
    ("OPENAI_BASE_URL", "http://127.0.0.1:notaport/v1"),
]


@pytest.mark.e2e
@pytest.mark.parametrize(("name", "value"), BAD_AT_SERVE, ids=[f"{n}={v}" for n, v in BAD_AT_SERVE])
def test_pwachat_serve_refuses_a_malformed_url_in_one_line(tmp_path: Path, name: str, value: str) -> None:
    import subprocess

    from server import PWACHAT, clean_env, free_port

    env = clean_env(**{name: value, "PORT": str(free_port()), "LOG_FILE": str(tmp_path / "app.log")})
    if name == "OPENAI_BASE_URL":
        env["OPENAI_API_KEY"] = "sk-test"
    done = subprocess.run(
        [*PWACHAT, "serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and name in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "hunter2" not in done.stderr + done.stdout
    assert "notaport" not in done.stderr


@pytest.mark.e2e
def test_pwachat_serve_refuses_a_log_file_it_cannot_open_in_one_line(tmp_path: Path) -> None:
    import subprocess

    from server import PWACHAT, clean_env, free_port

    (tmp_path / "not-a-dir").write_text("")
    env = clean_env(PORT=str(free_port()), LOG_FILE=str(tmp_path / "not-a-dir" / "app.log"))
    done = subprocess.run(
        [*PWACHAT, "serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "LOG_FILE" in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
