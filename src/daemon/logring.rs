//! Structured log events: a bounded ring of recent events plus live subscribers.
//!
//! Concurrency: the ring is a `std::sync::Mutex<VecDeque>` held only for a push or a copy
//! (never across an `.await`), so any thread that logs can push. Live subscribers are a
//! `tokio::sync::broadcast` channel: sending never blocks and never waits for a reader; a
//! subscriber that falls more than [`LIVE_CAPACITY`] events behind loses the oldest ones and
//! learns how many through [`next_live`], which turns the lag into a synthetic
//! "N events dropped" event. A slow `dpuctl logs` therefore can never slow the daemon down.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One structured log event as streamed on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEvent {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// The daemon that logged it (`engine`, `udsproxyd`, ...).
    pub daemon: String,
    /// The tracing target (module path).
    pub target: String,
    pub message: String,
    /// Structured fields other than the message (`peer`, `path`, `type`, ...).
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Events kept for `logs` backlogs when nothing else is said.
pub const DEFAULT_CAPACITY: usize = 2_000;

/// How far a live subscriber may fall behind before it loses events. Big enough to absorb a
/// burst while the subscriber's socket drains, small enough to bound memory per daemon.
pub const LIVE_CAPACITY: usize = 1_024;

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The synthetic event a lagging subscriber receives in place of the `dropped` events it missed.
pub fn dropped_event(daemon: &str, dropped: u64) -> LogEvent {
    let mut fields = serde_json::Map::new();
    fields.insert("dropped".into(), dropped.into());
    LogEvent {
        ts_ms: now_ms(),
        level: "warn".into(),
        daemon: daemon.into(),
        target: module_path!().into(),
        message: format!("{dropped} events dropped: this log subscriber fell behind"),
        fields,
    }
}

/// A bounded ring of recent events and the broadcast channel of live ones.
#[derive(Debug)]
pub struct LogRing {
    /// Recent events, oldest first; never longer than `capacity`.
    events: Mutex<VecDeque<LogEvent>>,
    capacity: usize,
    /// Live fan-out. Sent to while `events` is locked so that [`LogRing::backlog_and_subscribe`]
    /// sees every event exactly once: either in the backlog or on the receiver.
    live: broadcast::Sender<LogEvent>,
}

impl LogRing {
    /// A ring keeping the last `capacity` events (at least one).
    pub fn new(capacity: usize) -> LogRing {
        let capacity = capacity.max(1);
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        LogRing {
            events: Mutex::new(VecDeque::with_capacity(capacity.min(4_096))),
            capacity,
            live,
        }
    }

    /// How many events the ring keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Stores `event`, evicting the oldest when full, and hands it to live subscribers.
    pub fn push(&self, event: LogEvent) {
        // A panic while the lock was held cannot leave the deque inconsistent (push/pop are
        // atomic from our point of view), so a poisoned lock is safe to keep using.
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if events.len() == self.capacity {
            events.pop_front();
        }
        // `send` fails only when nobody is subscribed, which is not an error.
        let _ = self.live.send(event.clone());
        events.push_back(event);
    }

    /// The last `n` events, oldest first.
    pub fn recent(&self, n: usize) -> Vec<LogEvent> {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = events.len().saturating_sub(n);
        events.iter().skip(skip).cloned().collect()
    }

    /// A receiver of events pushed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LogEvent> {
        self.live.subscribe()
    }

    /// The last `n` events and a receiver of every later one, with no gap and no duplicate
    /// between the two.
    pub fn backlog_and_subscribe(
        &self,
        n: usize,
    ) -> (Vec<LogEvent>, broadcast::Receiver<LogEvent>) {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let rx = self.live.subscribe();
        let skip = events.len().saturating_sub(n);
        (events.iter().skip(skip).cloned().collect(), rx)
    }
}

impl Default for LogRing {
    fn default() -> LogRing {
        LogRing::new(DEFAULT_CAPACITY)
    }
}

/// The next live event for a subscriber of `daemon`'s ring; a lag becomes one
/// [`dropped_event`]. `None` once the ring is gone.
pub async fn next_live(rx: &mut broadcast::Receiver<LogEvent>, daemon: &str) -> Option<LogEvent> {
    match rx.recv().await {
        Ok(event) => Some(event),
        Err(broadcast::error::RecvError::Lagged(n)) => Some(dropped_event(daemon, n)),
        Err(broadcast::error::RecvError::Closed) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> LogEvent {
        LogEvent {
            ts_ms: i,
            level: "info".into(),
            daemon: "test".into(),
            target: "t".into(),
            message: format!("event {i}"),
            fields: serde_json::Map::new(),
        }
    }

    #[test]
    fn ring_keeps_the_last_capacity_events_in_order() {
        let ring = LogRing::new(3);
        for i in 0..5 {
            ring.push(event(i));
        }
        let got: Vec<u64> = ring.recent(10).iter().map(|e| e.ts_ms).collect();
        assert_eq!(got, vec![2, 3, 4]);
        let got: Vec<u64> = ring.recent(2).iter().map(|e| e.ts_ms).collect();
        assert_eq!(got, vec![3, 4]);
        assert!(ring.recent(0).is_empty());
    }

    #[tokio::test]
    async fn backlog_and_subscribe_has_no_gap_and_no_duplicate() {
        let ring = LogRing::new(10);
        ring.push(event(1));
        ring.push(event(2));
        let (backlog, mut rx) = ring.backlog_and_subscribe(10);
        ring.push(event(3));
        assert_eq!(
            backlog.iter().map(|e| e.ts_ms).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(next_live(&mut rx, "test").await.map(|e| e.ts_ms), Some(3));
    }

    #[tokio::test]
    async fn a_lagging_subscriber_gets_a_dropped_event_and_never_blocks_push() {
        let ring = LogRing::new(10);
        let mut rx = ring.subscribe();
        let extra = 10u64;
        for i in 0..(LIVE_CAPACITY as u64 + extra) {
            ring.push(event(i));
        }
        let first = next_live(&mut rx, "test").await.expect("an event");
        assert_eq!(first.level, "warn");
        assert_eq!(
            first.fields.get("dropped"),
            Some(&serde_json::Value::from(extra))
        );
        assert_eq!(
            first.message,
            format!("{extra} events dropped: this log subscriber fell behind")
        );
        // Then the oldest event still buffered.
        assert_eq!(
            next_live(&mut rx, "test").await.map(|e| e.ts_ms),
            Some(extra)
        );
    }

    #[test]
    fn log_event_json_round_trip() {
        let mut e = event(7);
        e.fields.insert("peer".into(), "tcp://127.0.0.1:1".into());
        let line = serde_json::to_string(&e).expect("serialise");
        assert_eq!(
            line,
            r#"{"ts_ms":7,"level":"info","daemon":"test","target":"t","message":"event 7","fields":{"peer":"tcp://127.0.0.1:1"}}"#
        );
        assert_eq!(serde_json::from_str::<LogEvent>(&line).expect("parse"), e);
    }
}
