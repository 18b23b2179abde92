//! pacer: the load bench's paced OpenAI-compatible upstream and its streaming load client, on one
//! current_thread tokio runtime (benches/load.py runs it pinned to the load core).
//!
//!     pacer serve [--listen 127.0.0.1:0] [--period-ms 33] [--tokens 120]
//!         The paced upstream (upstream.rs). Prints `LISTENING http://ADDR`, then reads commands on
//!         stdin, one a line, and answers each with one JSON line on stdout:
//!           load OPTIONS   a load run as `pacer load`, in this process and runtime, its figures
//!                          plus the upstream's counters during it (`upstream_*`)
//!           stats          the upstream's counters since the last `stats` or `load`
//!         Ends at the end of stdin.
//!
//!     pacer load --target 127.0.0.1:PORT --api pwachat|openai --streams N --period-ms MS
//!                --tokens N [--timeout-s S] [--key KEY]
//!         The load client (client.rs): N streams at once, one JSON line of figures.
//!
//!     pacer direct --streams N --period-ms MS --tokens N [--timeout-s S]
//!         Both in one process: the client against the upstream itself (the bench's reference).
//!
//! Every address must be a loopback one.

mod client;
mod clock;
mod text;
mod upstream;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::AsyncBufReadExt as _;

use crate::client::{Api, Load};
use crate::text::Json;
use crate::upstream::{MAX_PERIOD_US, MIN_PERIOD_US, Pace, Stats, Upstream};

struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String], known: &[&str]) -> Result<Self, String> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let key = arg
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {arg:?}"))?;
            if !known.contains(&key) {
                return Err(format!(
                    "unknown option --{key} (known: --{})",
                    known.join(", --")
                ));
            }
            let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            map.insert(key.to_owned(), value.clone());
        }
        Ok(Self(map))
    }

    fn get<T: std::str::FromStr>(&self, key: &str, default: Option<T>) -> Result<T, String> {
        match self.0.get(key) {
            Some(v) => v.parse().map_err(|_| format!("--{key}: cannot read {v:?}")),
            None => default.ok_or_else(|| format!("--{key} is required")),
        }
    }

    fn pace(&self, period_ms: Option<f64>, tokens: Option<u32>) -> Result<Pace, String> {
        let period_us = (self.get("period-ms", period_ms)? * 1000.0).round() as u64;
        if !(MIN_PERIOD_US..=MAX_PERIOD_US).contains(&period_us) {
            return Err(format!(
                "--period-ms must be within {}..{}",
                MIN_PERIOD_US / 1000,
                MAX_PERIOD_US / 1000
            ));
        }
        Ok(Pace {
            period_us,
            tokens: self.get("tokens", tokens)?,
        })
    }
}

fn loopback(addr: &str) -> Result<SocketAddr, String> {
    let bare = addr.strip_prefix("http://").unwrap_or(addr);
    let bare = bare.split('/').next().unwrap_or(bare);
    let sa: SocketAddr = bare
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP:port"))?;
    if !sa.ip().is_loopback() {
        return Err(format!("{addr:?} is not a loopback address"));
    }
    Ok(sa)
}

const LOAD_OPTS: &[&str] = &[
    "target",
    "api",
    "streams",
    "period-ms",
    "tokens",
    "timeout-s",
    "key",
];

fn load_of(args: &[String], target: Option<SocketAddr>) -> Result<Load, String> {
    let known: &[&str] = if target.is_some() {
        &["streams", "period-ms", "tokens", "timeout-s"]
    } else {
        LOAD_OPTS
    };
    let o = Opts::parse(args, known)?;
    let target = match target {
        Some(t) => t,
        None => loopback(&o.get::<String>("target", None)?)?,
    };
    let api = match o.0.get("api") {
        None => Api::OpenAi,
        Some(a) => Api::parse(a).ok_or("--api must be pwachat or openai")?,
    };
    let timeout: f64 = o.get("timeout-s", Some(60.0))?;
    Ok(Load {
        target,
        api,
        streams: o.get("streams", None)?,
        pace: o.pace(None, None)?,
        timeout: Duration::from_secs_f64(timeout.max(0.1)),
        key: o.get("key", Some("sk-test-openai".to_owned()))?,
    })
}

fn stats_fields(j: &mut Json, s: &Stats) {
    j.int("upstream_requests", s.requests)
        .int("upstream_streams", s.streams)
        .int("upstream_completed", s.completed)
        .int("upstream_dropped", s.dropped)
        .int("upstream_tokens", s.tokens)
        .int("upstream_queued_writes", s.queued_writes)
        .int("upstream_busy_ticks", s.busy_ticks)
        .ms(
            "upstream_tick_late_mean_ms",
            s.tick_late_sum_us
                .checked_div(s.busy_ticks)
                .map(|v| v as i64),
        )
        .ms("upstream_tick_late_max_ms", Some(s.tick_late_max_us as i64));
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

async fn serve(args: &[String]) -> Result<(), String> {
    let o = Opts::parse(args, &["listen", "period-ms", "tokens"])?;
    let listen = loopback(&o.get("listen", Some("127.0.0.1:0".to_owned()))?)?;
    let defaults = o.pace(Some(33.0), Some(120))?;
    let (up, addr) = Upstream::start(listen, defaults).map_err(|e| format!("listen: {e}"))?;
    say(&format!("LISTENING http://{addr}"));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        match words.first().map(String::as_str) {
            None => {}
            Some("stats") => {
                let mut j = Json::default();
                stats_fields(&mut j, &up.take_stats());
                say(&j.done());
            }
            Some("load") => match load_of(&words[1..], None) {
                Ok(load) => {
                    up.take_stats();
                    let mut j = client::run(&load).await;
                    stats_fields(&mut j, &up.take_stats());
                    say(&j.done());
                }
                Err(e) => say(&Json::default().str("error", &e).done()),
            },
            Some(other) => say(&Json::default()
                .str("error", &format!("unknown command {other:?} (load, stats)"))
                .done()),
        }
    }
    Ok(())
}

async fn direct(args: &[String]) -> Result<(), String> {
    let probe = Opts::parse(args, &["streams", "period-ms", "tokens", "timeout-s"])?;
    let defaults = probe.pace(None, None)?;
    let (up, addr) =
        Upstream::start(loopback("127.0.0.1:0")?, defaults).map_err(|e| format!("listen: {e}"))?;
    let load = load_of(args, Some(addr))?;
    let mut j = client::run(&load).await;
    stats_fields(&mut j, &Rc::clone(&up).take_stats());
    say(&j.done());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    clock::raise_fd_limit();
    let Some(cmd) = args.first() else {
        eprintln!("usage: pacer serve|load|direct [OPTIONS] (see src/main.rs)");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let local = tokio::task::LocalSet::new();
    let result = match cmd.as_str() {
        "serve" => local.block_on(&runtime(), serve(rest)),
        "direct" => local.block_on(&runtime(), direct(rest)),
        "load" => local.block_on(&runtime(), async {
            let load = load_of(rest, None)?;
            say(&client::run(&load).await.done());
            Ok(())
        }),
        other => Err(format!("unknown command {other:?} (serve, load, direct)")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pacer: {e}");
            ExitCode::from(2)
        }
    }
}
