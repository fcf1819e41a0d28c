//! Daemon logging: one global `tracing` subscriber per process made of a reloadable
//! [`EnvFilter`], a human-readable `fmt` layer (stderr or a file) and a ring layer that turns
//! every event into a [`LogEvent`] for the control socket (`dpuctl logs`).
//!
//! Concurrency: [`init`] is serialised by a process-wide mutex and installs the subscriber at
//! most once; later calls return the first handle. A [`LogHandle`] is a cheap `Arc` clone that
//! any task may use; the ring it feeds never blocks a logging thread (see
//! [`super::logring`]). The level is changed through `tracing_subscriber::reload`, which
//! swaps the filter under its own lock and rebuilds the callsite interest cache.
//!
//! Tests install nothing global: [`LogHandle::detached`] builds a ring and [`ring_layer`]
//! attaches it to a scoped subscriber (`tracing::subscriber::with_default`).

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

use super::logring::{now_ms, LogEvent, LogRing, DEFAULT_CAPACITY};

/// Where the human-readable log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error (journald under systemd). Coloured when stderr is a terminal and
    /// `NO_COLOR` is unset.
    Stderr,
    /// Appended to this file (created with mode 0640), never coloured.
    File(PathBuf),
}

/// Errors of [`init`] and [`LogHandle::set_level`].
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error(
        "invalid log level {directive:?}: {reason}; use error, warn, info, debug or trace, \
         or a filter such as `info,dpuctl::wire=debug`"
    )]
    BadLevel { directive: String, reason: String },
    #[error(
        "cannot open the log file {path}: {source}; check that its directory exists and is \
         writable, or log to stderr"
    )]
    OpenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another tracing subscriber is already installed in this process ({reason}); dpuctl's \
         logging was not installed"
    )]
    AlreadyInstalled { reason: String },
    #[error("cannot change the log level: {reason}")]
    Reload { reason: String },
}

/// The handle of the subscriber installed by [`init`]; `None` until then.
static GLOBAL: Mutex<Option<LogHandle>> = Mutex::new(None);

/// Installs the process's global subscriber for `daemon` at `level` (an [`EnvFilter`]
/// directive) writing human lines to `target`, and returns its handle.
///
/// Installing happens once per process: a second call returns the first handle unchanged
/// (same daemon name, level and target), so in-process tests and tools that call it again do
/// not panic. If some other subscriber was installed first, returns
/// [`LoggingError::AlreadyInstalled`].
pub fn init(daemon: &str, level: &str, target: LogTarget) -> Result<LogHandle, LoggingError> {
    let mut global = GLOBAL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = global.as_ref() {
        return Ok(handle.clone());
    }
    let (level, filter) = parse_filter(level)?;
    let (filter_layer, reload_handle) = reload::Layer::new(filter);
    let handle = LogHandle::build(daemon, DEFAULT_CAPACITY, level, Some(reload_handle));

    type Base = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;
    let human: Box<dyn Layer<Base> + Send + Sync> = match target {
        LogTarget::Stderr => {
            let colour = std::io::stderr().is_terminal() && !no_color();
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour)
                .boxed()
        }
        LogTarget::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&path)
                .map_err(|source| LoggingError::OpenFile { path, source })?;
            fmt::layer()
                .with_writer(Mutex::new(file))
                .with_ansi(false)
                .boxed()
        }
    };
    Registry::default()
        .with(filter_layer)
        .with(human)
        .with(ring_layer(&handle))
        .try_init()
        .map_err(|e| LoggingError::AlreadyInstalled {
            reason: e.to_string(),
        })?;
    *global = Some(handle.clone());
    Ok(handle)
}

/// Whether the user asked for no colour (<https://no-color.org>: set and not empty).
pub(crate) fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Validates an [`EnvFilter`] directive; returns it trimmed with the filter it builds.
fn parse_filter(directive: &str) -> Result<(String, EnvFilter), LoggingError> {
    let trimmed = directive.trim();
    if trimmed.is_empty() {
        return Err(LoggingError::BadLevel {
            directive: directive.into(),
            reason: "it is empty".into(),
        });
    }
    let filter = EnvFilter::builder()
        .parse(trimmed)
        .map_err(|e| LoggingError::BadLevel {
            directive: directive.into(),
            reason: e.to_string(),
        })?;
    Ok((trimmed.to_owned(), filter))
}

struct Inner {
    daemon: String,
    ring: LogRing,
    /// The directive currently in force, as the operator wrote it.
    level: Mutex<String>,
    /// Swaps the global filter; `None` for a detached handle.
    reload: Option<reload::Handle<EnvFilter, Registry>>,
}

/// A daemon's logging: its level and its ring of recent events. Cheap to clone.
#[derive(Clone)]
pub struct LogHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle")
            .field("daemon", &self.inner.daemon)
            .field("level", &self.level())
            .field("global", &self.inner.reload.is_some())
            .finish()
    }
}

impl LogHandle {
    fn build(
        daemon: &str,
        capacity: usize,
        level: String,
        reload: Option<reload::Handle<EnvFilter, Registry>>,
    ) -> LogHandle {
        LogHandle {
            inner: Arc::new(Inner {
                daemon: daemon.to_owned(),
                ring: LogRing::new(capacity),
                level: Mutex::new(level),
                reload,
            }),
        }
    }

    /// A handle with its own ring (default capacity) that is not connected to the global
    /// subscriber: feed it with [`ring_layer`] on a scoped subscriber, or with
    /// [`LogHandle::push`]. Its level starts at `info`; [`LogHandle::set_level`] validates and
    /// records the directive but filters nothing.
    pub fn detached(daemon: &str) -> LogHandle {
        LogHandle::detached_with_capacity(daemon, DEFAULT_CAPACITY)
    }

    /// [`LogHandle::detached`] keeping `capacity` events.
    pub fn detached_with_capacity(daemon: &str, capacity: usize) -> LogHandle {
        LogHandle::build(daemon, capacity, "info".into(), None)
    }

    /// The daemon name stamped on every event.
    pub fn daemon(&self) -> &str {
        &self.inner.daemon
    }

    /// The filter directive in force (`info`, `debug`, `info,dpuctl::wire=trace`, ...).
    pub fn level(&self) -> String {
        self.inner
            .level
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the filter with `directive`; an invalid directive changes nothing.
    pub fn set_level(&self, directive: &str) -> Result<(), LoggingError> {
        let (level, filter) = parse_filter(directive)?;
        // Hold the level lock across the swap so that concurrent setters leave level() and
        // the filter in force agreeing with each other.
        let mut current = self
            .inner
            .level
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(reload) = &self.inner.reload {
            reload.reload(filter).map_err(|e| LoggingError::Reload {
                reason: e.to_string(),
            })?;
        }
        *current = level;
        Ok(())
    }

    /// The last `n` events, oldest first.
    pub fn recent(&self, n: usize) -> Vec<LogEvent> {
        self.inner.ring.recent(n)
    }

    /// Live events from now on. Use [`super::logring::next_live`] to receive, so that falling
    /// behind yields an "N events dropped" event instead of an error.
    pub fn subscribe(&self) -> broadcast::Receiver<LogEvent> {
        self.inner.ring.subscribe()
    }

    /// The last `n` events and the live events after them, without gap or duplicate.
    pub fn backlog_and_subscribe(
        &self,
        n: usize,
    ) -> (Vec<LogEvent>, broadcast::Receiver<LogEvent>) {
        self.inner.ring.backlog_and_subscribe(n)
    }

    /// How many events the ring keeps.
    pub fn capacity(&self) -> usize {
        self.inner.ring.capacity()
    }

    /// Stores an event built elsewhere (the ring layer calls this for every tracing event).
    pub fn push(&self, event: LogEvent) {
        self.inner.ring.push(event);
    }
}

/// A layer that records every event it sees into `handle`'s ring, with the fields of the
/// spans it happened in (outermost first, inner spans and the event overriding).
pub fn ring_layer(handle: &LogHandle) -> RingLayer {
    RingLayer {
        handle: handle.clone(),
    }
}

/// See [`ring_layer`].
pub struct RingLayer {
    handle: LogHandle,
}

/// The JSON fields of a span, kept in its registry extensions.
struct SpanFields(serde_json::Map<String, serde_json::Value>);

impl<S> Layer<S> for RingLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut visitor = JsonVisitor::default();
        attrs.record(&mut visitor);
        if let Some(span) = ctx.span(id) {
            let mut fields = visitor.fields;
            if let Some(message) = visitor.message {
                fields.insert("message".into(), message.into());
            }
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            let mut visitor = JsonVisitor {
                fields: std::mem::take(fields),
                message: None,
            };
            values.record(&mut visitor);
            *fields = visitor.fields;
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut visitor = JsonVisitor::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    visitor
                        .fields
                        .extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        event.record(&mut visitor);
        let metadata = event.metadata();
        self.handle.push(LogEvent {
            ts_ms: now_ms(),
            level: metadata.level().as_str().to_ascii_lowercase(),
            daemon: self.handle.daemon().to_owned(),
            target: metadata.target().to_owned(),
            message: visitor.message.unwrap_or_default(),
            fields: visitor.fields,
        });
    }
}

/// Collects tracing fields as JSON values; `message` is kept apart.
#[derive(Default)]
struct JsonVisitor {
    fields: serde_json::Map<String, serde_json::Value>,
    message: Option<String>,
}

impl JsonVisitor {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        let name = field.name();
        // Metadata fields added by the `log` bridge duplicate the event's own metadata.
        if name.starts_with("log.") {
            return;
        }
        if name == "message" {
            self.message = Some(match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.fields.insert(name.to_owned(), value);
        }
    }
}

impl Visit for JsonVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let value = serde_json::Number::from_f64(value)
            .map(serde_json::Value::Number)
            .unwrap_or_else(|| value.to_string().into());
        self.put(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

/// Lets a repeated log event through at most once per period for each key (a path, or `()`
/// for one kind of event): a flood of bad requests must not flood the log too.
pub struct Throttle<K> {
    period: std::time::Duration,
    /// Created on first use, so a throttle can be a `static`.
    last: Mutex<Option<std::collections::HashMap<K, std::time::Instant>>>,
}

/// Keys remembered at most; beyond that, those quiet for a period are forgotten.
const THROTTLE_KEYS: usize = 1024;

impl<K: std::hash::Hash + Eq> Throttle<K> {
    /// A throttle letting each key through once per `period`.
    pub const fn new(period: std::time::Duration) -> Throttle<K> {
        Throttle {
            period,
            last: Mutex::new(None),
        }
    }

    /// True when `key` was not let through in the last period (and notes it now).
    pub fn due(&self, key: K) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let last = last.get_or_insert_with(std::collections::HashMap::new);
        let now = std::time::Instant::now();
        if last
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < self.period)
        {
            return false;
        }
        if last.len() >= THROTTLE_KEYS {
            last.retain(|_, t| now.duration_since(*t) < self.period);
            if last.len() >= THROTTLE_KEYS {
                last.clear();
            }
        }
        last.insert(key, now);
        true
    }
}

/// Once per 10 s.
impl<K: std::hash::Hash + Eq> Default for Throttle<K> {
    fn default() -> Throttle<K> {
        Throttle::new(std::time::Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_each_key_through_once_per_period() {
        let t: Throttle<&str> = Throttle::new(std::time::Duration::from_secs(60));
        assert!(t.due("/a"));
        assert!(!t.due("/a"));
        assert!(t.due("/b"));
        let quick: Throttle<()> = Throttle::new(std::time::Duration::ZERO);
        assert!(quick.due(()) && quick.due(()));
    }

    fn scoped(handle: &LogHandle) -> impl Subscriber + Send + Sync {
        tracing_subscriber::registry().with(ring_layer(handle))
    }

    #[test]
    fn events_become_log_events_with_span_and_event_fields() {
        let handle = LogHandle::detached("engine");
        tracing::subscriber::with_default(scoped(&handle), || {
            let span = tracing::info_span!("conn", peer = "tcp://127.0.0.1:9", id = 3u64);
            let _g = span.enter();
            tracing::warn!(
                path = "/var/lib/docker",
                id = 4u64,
                ok = false,
                "open refused"
            );
            span.record("id", 5u64);
            tracing::debug!(ratio = 0.5, "second {}", 2);
        });
        let events = handle.recent(10);
        assert_eq!(events.len(), 2);
        let first = &events[0];
        assert_eq!(first.level, "warn");
        assert_eq!(first.daemon, "engine");
        assert_eq!(first.target, module_path!());
        assert_eq!(first.message, "open refused");
        assert_eq!(first.fields["peer"], "tcp://127.0.0.1:9");
        assert_eq!(first.fields["path"], "/var/lib/docker");
        assert_eq!(
            first.fields["id"], 4,
            "the event's field overrides the span's"
        );
        assert_eq!(first.fields["ok"], false);
        assert!(first.ts_ms > 1_600_000_000_000);
        let second = &events[1];
        assert_eq!(second.level, "debug");
        assert_eq!(second.message, "second 2");
        assert_eq!(
            second.fields["id"], 5,
            "span.record updates the span's fields"
        );
        assert_eq!(second.fields["ratio"], 0.5);
    }

    #[test]
    fn set_level_validates_the_directive() {
        let handle = LogHandle::detached("udsproxyd");
        assert_eq!(handle.level(), "info");
        handle.set_level(" debug ").expect("valid level");
        assert_eq!(handle.level(), "debug");
        handle
            .set_level("info,dpuctl::wire=trace")
            .expect("valid directive");
        assert_eq!(handle.level(), "info,dpuctl::wire=trace");
        for bad in ["", "   ", "verbose=="] {
            let err = handle.set_level(bad).expect_err("invalid directive");
            assert!(
                err.to_string().starts_with("invalid log level"),
                "unexpected message: {err}"
            );
        }
        assert_eq!(
            handle.level(),
            "info,dpuctl::wire=trace",
            "a bad directive changes nothing"
        );
    }

    #[test]
    fn init_twice_returns_the_first_handle_and_set_level_filters() {
        // This is the only test of the library that installs the global subscriber.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("engine.log");
        let first = init("engine", "info", LogTarget::File(file.clone())).expect("first init");
        let second = init("udsproxyd", "debug", LogTarget::Stderr).expect("second init");
        assert_eq!(second.daemon(), "engine");
        assert!(Arc::ptr_eq(&first.inner, &second.inner));
        assert!(matches!(
            first.set_level("no such==level"),
            Err(LoggingError::BadLevel { .. })
        ));
        // Level changes take effect globally; events are only recorded when enabled.
        first.set_level("warn").expect("set warn");
        tracing::info!(marker = "init-test-hidden", "not recorded at warn");
        first.set_level("info").expect("set info");
        tracing::info!(marker = "init-test-shown", "recorded at info");
        let markers: Vec<_> = first
            .recent(first.capacity())
            .into_iter()
            .filter_map(|e| e.fields.get("marker").cloned())
            .collect();
        assert!(markers.contains(&"init-test-shown".into()));
        assert!(!markers.contains(&"init-test-hidden".into()));
        let written = std::fs::read_to_string(&file).expect("log file");
        assert!(written.contains("recorded at info"), "log file: {written}");
        assert!(
            !written.contains("not recorded at warn"),
            "log file: {written}"
        );
        assert!(!written.contains("\x1b["), "no colour in files");
    }
}
