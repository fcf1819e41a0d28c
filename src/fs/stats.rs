//! Per-operation counters and latency percentiles of one qtfs mount (the qtinfo `-a`/`-t`
//! figures), reported on the mount's control socket and shown by `dpuctl status` and the TUI.
//!
//! Latencies go into log-linear histograms (4 buckets per power of two, so a percentile is
//! within 19% of the truth) that rotate every [`WINDOW`]: percentiles cover the current and
//! the previous window, so they follow what the mount does now, not since boot. Counts and
//! errors are totals since the mount started.
//!
//! Concurrency: one short `Mutex` per operation; recording happens once per answered
//! request on a tokio task, reading once per status request.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::proto::op;
use crate::daemon::status::OpStats;

/// How long one histogram window lasts.
pub const WINDOW: Duration = Duration::from_secs(30);
/// Sub-buckets per power of two.
const SUB: u32 = 4;
/// Buckets cover 1 µs .. 2^40 µs.
const BUCKETS: usize = 41 * SUB as usize;

/// The name of a qtfs operation, as shown in status and the TUI.
pub fn op_name(code: u16) -> &'static str {
    match code {
        op::MOUNT => "mount",
        op::LOOKUP => "lookup",
        op::FORGET => "forget",
        op::GETATTR => "getattr",
        op::SETATTR => "setattr",
        op::READLINK => "readlink",
        op::MKNOD => "mknod",
        op::MKDIR => "mkdir",
        op::UNLINK => "unlink",
        op::RMDIR => "rmdir",
        op::SYMLINK => "symlink",
        op::RENAME => "rename",
        op::LINK => "link",
        op::OPEN => "open",
        op::READ => "read",
        op::WRITE => "write",
        op::FLUSH => "flush",
        op::RELEASE => "release",
        op::FSYNC => "fsync",
        op::OPENDIR => "opendir",
        op::READDIR => "readdir",
        op::STATFS => "statfs",
        op::SETXATTR => "setxattr",
        op::GETXATTR => "getxattr",
        op::LISTXATTR => "listxattr",
        op::REMOVEXATTR => "removexattr",
        op::ACCESS => "access",
        op::CREATE => "create",
        op::GETLK => "getlk",
        op::SETLK => "setlk",
        op::FALLOCATE => "fallocate",
        op::LSEEK => "lseek",
        op::COPY_FILE_RANGE => "copy_file_range",
        _ => "other",
    }
}

/// Whether answering `op` with `errno` is a failure worth counting as an error, rather than
/// an ordinary answer: a lookup of a name that does not exist (every `stat` of a missing
/// file, every negative path-walk step), an extended attribute a file does not have (ls and
/// cp ask for security.selinux and ACLs on every file), a buffer too small for an attribute
/// (the caller asks again with a bigger one), a lock held by someone else (F_SETLK, and
/// every retry of F_SETLKW), or a create of a name that exists (O_EXCL).
pub fn is_failure(code: u16, errno: i32) -> bool {
    !matches!(
        (code, errno),
        (op::LOOKUP, libc::ENOENT)
            | (op::GETXATTR | op::LISTXATTR, libc::ENODATA | libc::ERANGE)
            | (op::SETLK | op::GETLK, libc::EAGAIN | libc::EACCES)
            | (
                op::CREATE | op::MKDIR | op::MKNOD | op::SYMLINK | op::LINK,
                libc::EEXIST
            )
    )
}

/// Index of the bucket holding `us` microseconds.
fn bucket(us: u64) -> usize {
    let us = us.max(1);
    let exp = 63 - us.leading_zeros();
    // The SUB bits below the leading one select the sub-bucket.
    let sub = if exp >= 2 {
        ((us >> (exp - 2)) & u64::from(SUB - 1)) as u32
    } else {
        ((us << (2 - exp)) & u64::from(SUB - 1)) as u32
    };
    ((exp * SUB + sub) as usize).min(BUCKETS - 1)
}

/// The upper bound (µs) of bucket `i`: what a percentile falling in it reports.
fn bucket_upper(i: usize) -> u64 {
    let exp = i as u32 / SUB;
    let sub = u64::from(i as u32 % SUB);
    let base = 1u64 << exp;
    base + (base * (sub + 1)) / u64::from(SUB)
}

#[derive(Clone)]
struct Hist {
    counts: [u64; BUCKETS],
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: [0; BUCKETS],
        }
    }
}

#[derive(Default)]
struct OpSlot {
    count: u64,
    errors: u64,
    current: Hist,
    previous: Hist,
}

struct Table {
    started: Instant,
    /// Which window `current` belongs to (windows since `started`).
    window: u64,
    ops: BTreeMap<u16, OpSlot>,
}

/// The statistics of one mount.
pub struct MountStats {
    table: Mutex<Table>,
}

impl Default for MountStats {
    fn default() -> Self {
        MountStats::new()
    }
}

impl MountStats {
    pub fn new() -> MountStats {
        MountStats {
            table: Mutex::new(Table {
                started: Instant::now(),
                window: 0,
                ops: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves every histogram on to the window `now` falls in.
    fn rotate(t: &mut Table, now: Instant) {
        let window = now.duration_since(t.started).as_secs() / WINDOW.as_secs();
        if window == t.window {
            return;
        }
        let skipped = window - t.window > 1;
        for slot in t.ops.values_mut() {
            slot.previous = if skipped {
                Hist::default()
            } else {
                std::mem::take(&mut slot.current)
            };
            slot.current = Hist::default();
        }
        t.window = window;
    }

    /// Records one answered request of `code` that took `took` and failed or not.
    pub fn record(&self, code: u16, took: Duration, failed: bool) {
        let now = Instant::now();
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let mut t = self.lock();
        Self::rotate(&mut t, now);
        let slot = t.ops.entry(code).or_default();
        slot.count += 1;
        if failed {
            slot.errors += 1;
        }
        slot.current.counts[bucket(us)] += 1;
    }

    /// The figures per operation name.
    pub fn snapshot(&self) -> BTreeMap<String, OpStats> {
        let mut t = self.lock();
        Self::rotate(&mut t, Instant::now());
        let mut out: BTreeMap<String, OpStats> = BTreeMap::new();
        for (code, slot) in &t.ops {
            let mut merged = slot.current.clone();
            for (m, p) in merged.counts.iter_mut().zip(slot.previous.counts.iter()) {
                *m += p;
            }
            let entry = out.entry(op_name(*code).to_string()).or_default();
            entry.count += slot.count;
            entry.errors += slot.errors;
            entry.p50_us = entry.p50_us.max(percentile(&merged, 50));
            entry.p99_us = entry.p99_us.max(percentile(&merged, 99));
        }
        out
    }
}

/// The `pct` percentile of `h` (upper bucket bound, µs); 0 when empty.
fn percentile(h: &Hist, pct: u64) -> u64 {
    let total: u64 = h.counts.iter().sum();
    if total == 0 {
        return 0;
    }
    // The smallest value with at least pct% of the samples at or below it.
    let rank = (total * pct).div_ceil(100).max(1);
    let mut seen = 0;
    for (i, c) in h.counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return bucket_upper(i);
        }
    }
    bucket_upper(BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_answers_are_not_failures() {
        assert!(!is_failure(op::LOOKUP, libc::ENOENT));
        assert!(!is_failure(op::GETXATTR, libc::ENODATA));
        assert!(!is_failure(op::SETLK, libc::EAGAIN));
        assert!(!is_failure(op::CREATE, libc::EEXIST));
        assert!(is_failure(op::LOOKUP, libc::EACCES));
        assert!(is_failure(op::READ, libc::EIO));
        assert!(is_failure(op::OPEN, libc::ENOENT));
    }

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for us in 1..100_000u64 {
            let b = bucket(us);
            assert!(b >= last, "bucket order at {us}");
            last = b;
            let upper = bucket_upper(b);
            assert!(upper >= us, "{us} µs above its bucket's bound {upper}");
            assert!(
                upper as f64 <= us as f64 * 1.26 + 1.0,
                "{us} µs: bound {upper} too loose"
            );
        }
    }

    #[test]
    fn percentiles_follow_the_samples() {
        let s = MountStats::new();
        for _ in 0..98 {
            s.record(op::LOOKUP, Duration::from_micros(100), false);
        }
        s.record(op::LOOKUP, Duration::from_millis(10), true);
        s.record(op::LOOKUP, Duration::from_millis(10), true);
        s.record(op::READ, Duration::from_micros(40), false);
        let snap = s.snapshot();
        let lookup = &snap["lookup"];
        assert_eq!(lookup.count, 100);
        assert_eq!(lookup.errors, 2);
        assert!((100..=125).contains(&lookup.p50_us), "{lookup:?}");
        assert!((10_000..=12_500).contains(&lookup.p99_us), "{lookup:?}");
        assert_eq!(snap["read"].count, 1);
        assert!(!snap.contains_key("write"), "ops never used are not listed");
    }

    #[test]
    fn old_windows_leave_the_percentiles_but_not_the_counts() {
        let s = MountStats::new();
        s.record(op::GETATTR, Duration::from_millis(50), false);
        {
            let mut t = s.lock();
            // Pretend two windows went by.
            t.started -= WINDOW * 2;
        }
        s.record(op::GETATTR, Duration::from_micros(10), false);
        let snap = s.snapshot();
        assert_eq!(snap["getattr"].count, 2);
        assert!(snap["getattr"].p99_us <= 13, "{:?}", snap["getattr"]);
    }
}
