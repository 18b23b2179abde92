//! The one clock every figure is on, and the millisecond tick the upstream paces by.
//!
//! Times are microseconds of `CLOCK_MONOTONIC`: the clock Python's `time.monotonic()` reads and
//! that every process of the host shares, so a token's scheduled send time, written into its text
//! by the upstream, can be compared with its arrival in any process (the load client here, or a
//! client of its own) with no side channel.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

fn monotonic() -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts
}

/// Microseconds of `CLOCK_MONOTONIC`.
pub fn now_us() -> u64 {
    let ts = monotonic();
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn timespec_of_us(us: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (us / 1_000_000) as libc::time_t,
        tv_nsec: ((us % 1_000_000) * 1_000) as libc::c_long,
    }
}

/// A `timerfd` on `CLOCK_MONOTONIC` firing on every millisecond boundary while armed: precise to
/// the microsecond (tokio's own timer rounds every deadline up to its next millisecond tick, and
/// epoll_wait's timeout is in milliseconds, which would make each tick up to ~2 ms late).
pub struct Tick {
    fd: AsyncFd<OwnedFd>,
    armed: std::cell::Cell<bool>,
}

impl Tick {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the AsyncFd owns the descriptor, so it stays open for as long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self {
            fd,
            armed: std::cell::Cell::new(false),
        })
    }

    fn set(&self, flags: libc::c_int, value_us: u64, interval_us: u64) {
        let spec = libc::itimerspec {
            it_interval: timespec_of_us(interval_us),
            it_value: timespec_of_us(value_us),
        };
        // SAFETY: a valid timerfd and a valid itimerspec; the old value is not asked for.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.get_ref().as_raw_fd(),
                flags,
                &raw const spec,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "timerfd_settime: {}", io::Error::last_os_error());
    }

    pub fn is_armed(&self) -> bool {
        self.armed.get()
    }

    /// Fire at the next millisecond boundary, then every millisecond.
    pub fn arm(&self) {
        let next = (now_us() / 1_000 + 1) * 1_000;
        self.set(libc::TFD_TIMER_ABSTIME, next, 1_000);
        self.armed.set(true);
    }

    pub fn disarm(&self) {
        self.set(0, 0, 0);
        self.armed.set(false);
    }

    /// Until the timer has fired (once or more since the last call).
    pub async fn wait(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = 0u64;
            // SAFETY: reading the 8-byte expiration count of a timerfd into a u64.
            let n = unsafe {
                libc::read(
                    self.fd.get_ref().as_raw_fd(),
                    (&raw mut expirations).cast(),
                    8,
                )
            };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            guard.clear_ready();
        }
    }
}

/// The soft limit on open files up to the hard one: 5,000 streams through one process are 10,000
/// sockets (the client's and the upstream's).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct; failure leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

/// This process's CPU time (user + system) and involuntary context switches, and the time its
/// threads waited on a run queue (ready but not running: another process had the core), in us.
pub struct Usage {
    pub cpu_us: u64,
    pub nivcsw: u64,
    pub wait_us: u64,
}

pub fn usage() -> Usage {
    // SAFETY: getrusage with a valid, zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    // /proc/self/schedstat: time on the cpu, time waiting on a runqueue (ns), timeslices.
    let wait_ns = std::fs::read_to_string("/proc/self/schedstat")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    Usage {
        cpu_us: us(ru.ru_utime) + us(ru.ru_stime),
        nivcsw: ru.ru_nivcsw as u64,
        wait_us: wait_ns / 1_000,
    }
}
