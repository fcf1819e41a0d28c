//! Collectors: the tasks that feed the dashboard from the daemons' control sockets.
//!
//! - one discovery task per watched run directory lists its `*.ctl` sockets every interval;
//! - one status task per daemon asks for `status` every interval (or at once when poked),
//!   keeping its connection between polls and reconnecting after any failure;
//! - one log task per daemon follows `logs {follow:true}` and reconnects when the stream ends;
//! - one short task per control action (allowlist add/delete, session kill).
//!
//! Concurrency: every task owns its own connection and only sends [`Update`]s (status,
//! replies) or log events into bounded channels the UI loop drains; nothing here touches the
//! model. Every request has a timeout ([`REQUEST_TIMEOUT`]), so a stuck daemon only delays its
//! own task, never the UI or the other daemons. The log channel's bound is the backpressure of
//! a flood: a follower that cannot send stops reading, and the daemon, which never waits for
//! a subscriber, drops events for it and says so with a synthetic "events dropped" event.
//! When a daemon's log stream ends (it stopped), its status task is poked so the dashboard
//! shows it unreachable at once instead of at the next poll. Each daemon's tasks stop on
//! their own cancellation token (daemon dropped from the model) or the collectors' (exit).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::state::Update;
use crate::daemon::control::{try_discover, Client, ControlError, Request};
use crate::daemon::logring::LogEvent;
use crate::daemon::status::DaemonStatus;

/// How long a status request (connect included) may take before the daemon is shown
/// unreachable. Short: a healthy daemon answers in well under a millisecond.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an operator's action (allowlist add/delete, session kill) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Wait before reconnecting a log stream that ended.
const LOG_RETRY: Duration = Duration::from_millis(500);

/// Backlog asked for when a log stream (re)connects.
const LOG_BACKLOG: usize = 200;

/// One watched daemon's tasks.
struct Watched {
    /// Wakes the status task for an immediate poll.
    poke: Arc<Notify>,
    /// Stops this daemon's tasks.
    token: CancellationToken,
}

/// The collectors of one dashboard.
pub struct Collectors {
    /// Status updates, control replies and discovery results, to the UI loop.
    updates: mpsc::Sender<Update>,
    /// Log events with their side label, to the UI loop (bounded: the flood backpressure).
    logs: mpsc::Sender<(String, LogEvent)>,
    interval: Duration,
    /// Parent of every task's token; cancelled by [`Collectors::close`].
    token: CancellationToken,
    tracker: TaskTracker,
    watched: HashMap<PathBuf, Watched>,
}

impl Collectors {
    /// Collectors polling every `interval`, sending into `updates` and `logs`.
    pub fn new(
        updates: mpsc::Sender<Update>,
        logs: mpsc::Sender<(String, LogEvent)>,
        interval: Duration,
    ) -> Collectors {
        Collectors {
            updates,
            logs,
            interval,
            token: CancellationToken::new(),
            tracker: TaskTracker::new(),
            watched: HashMap::new(),
        }
    }

    /// Starts listing run directory `dir` (number `index` of the model's directories).
    pub fn discover(&self, index: usize, dir: PathBuf) {
        let tx = self.updates.clone();
        let token = self.token.clone();
        let interval = self.interval;
        self.tracker.spawn(async move {
            loop {
                let d = dir.clone();
                // read_dir is a blocking call; a hung filesystem must not stall the runtime.
                let result = match tokio::task::spawn_blocking(move || try_discover(&d)).await {
                    Ok(Ok(found)) => Ok(found),
                    Ok(Err(e)) => Err(format!(
                        "cannot read it: {e}; run as root or pass another --run-dir"
                    )),
                    Err(e) => Err(format!("cannot list it: {e}")),
                };
                if tx.send(Update::Dir { index, result }).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
    }

    /// Starts polling the status and following the logs of the daemon at `socket`.
    pub fn watch(&mut self, side: String, socket: PathBuf) {
        if self.watched.contains_key(&socket) {
            return;
        }
        let poke = Arc::new(Notify::new());
        let token = self.token.child_token();
        self.tracker.spawn(poll_status(
            socket.clone(),
            self.updates.clone(),
            self.interval,
            poke.clone(),
            token.clone(),
        ));
        self.tracker.spawn(follow_logs(
            side,
            socket.clone(),
            self.logs.clone(),
            poke.clone(),
            token.clone(),
        ));
        self.watched.insert(socket, Watched { poke, token });
    }

    /// Stops the tasks of the daemon at `socket`.
    pub fn unwatch(&mut self, socket: &Path) {
        if let Some(w) = self.watched.remove(socket) {
            w.token.cancel();
        }
    }

    /// Sends `request` to the daemon at `socket` on its own task; the outcome comes back as
    /// [`Update::Reply`] described by `what`, followed by a fresh status.
    pub fn control(&self, socket: PathBuf, request: Request, what: String) {
        let tx = self.updates.clone();
        let poke = self.watched.get(&socket).map(|w| w.poke.clone());
        let token = self.token.clone();
        self.tracker.spawn(async move {
            let exchange = async {
                let mut client = Client::connect(&socket)
                    .await?
                    .with_timeout(COMMAND_TIMEOUT);
                client.request(&request).await
            };
            let result = tokio::select! {
                _ = token.cancelled() => return,
                r = tokio::time::timeout(COMMAND_TIMEOUT, exchange) => match r {
                    Ok(Ok(fields)) => Ok(describe_reply(&request, &fields)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {}s", COMMAND_TIMEOUT.as_secs())),
                },
            };
            let _ = tx.send(Update::Reply { what, result }).await;
            if let Some(p) = poke {
                p.notify_one();
            }
        });
    }

    /// Stops every task and waits (briefly) for them to finish.
    pub async fn close(self) {
        self.token.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
    }
}

/// What a successful control answer means, for the notice line.
pub fn describe_reply(
    request: &Request,
    fields: &serde_json::Map<String, serde_json::Value>,
) -> String {
    match request {
        Request::AllowlistAdd { .. } => match fields.get("index").and_then(|v| v.as_u64()) {
            Some(i) => format!("done, entry #{i}"),
            None => "done".into(),
        },
        Request::AllowlistDelete { .. } => match fields.get("removed").and_then(|v| v.as_str()) {
            Some(p) => format!("removed {p}"),
            None => "done".into(),
        },
        Request::SessionKill { signal, .. } => format!("signal {signal} sent"),
        _ => "done".into(),
    }
}

/// One status request, reusing `client` when it is still connected.
async fn status_once(
    socket: &Path,
    client: &mut Option<Client>,
) -> Result<Box<DaemonStatus>, String> {
    let mut c = match client.take() {
        Some(c) => c,
        None => tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(socket))
            .await
            .map_err(|_| {
                ControlError::Timeout {
                    path: socket.to_owned(),
                    after: REQUEST_TIMEOUT,
                }
                .to_string()
            })?
            .map_err(|e| e.to_string())?
            .with_timeout(REQUEST_TIMEOUT),
    };
    let status = c.status().await.map_err(|e| e.to_string())?;
    *client = Some(c);
    Ok(Box::new(status))
}

async fn poll_status(
    socket: PathBuf,
    tx: mpsc::Sender<Update>,
    interval: Duration,
    poke: Arc<Notify>,
    token: CancellationToken,
) {
    let mut client = None;
    loop {
        let result = tokio::select! {
            _ = token.cancelled() => return,
            r = status_once(&socket, &mut client) => r,
        };
        let update = Update::Status {
            socket: socket.clone(),
            result,
        };
        if tx.send(update).await.is_err() {
            return;
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = poke.notified() => {}
        }
    }
}

async fn follow_logs(
    side: String,
    socket: PathBuf,
    tx: mpsc::Sender<(String, LogEvent)>,
    poke: Arc<Notify>,
    token: CancellationToken,
) {
    // After a reconnect the backlog repeats events already shown: skip those not newer than
    // the last one seen.
    let mut last_ts = 0u64;
    loop {
        let open = async {
            let mut c = Client::connect(&socket)
                .await?
                .with_timeout(REQUEST_TIMEOUT);
            c.request(&Request::Logs {
                backlog: LOG_BACKLOG,
                follow: true,
            })
            .await?;
            Ok::<_, ControlError>(c)
        };
        let opened = tokio::select! {
            _ = token.cancelled() => return,
            r = tokio::time::timeout(REQUEST_TIMEOUT, open) => r,
        };
        if let Ok(Ok(mut client)) = opened {
            let resume_after = last_ts;
            loop {
                let next = tokio::select! {
                    _ = token.cancelled() => return,
                    ev = client.next_event() => ev,
                };
                match next {
                    Ok(Some(ev)) => {
                        if ev.ts_ms <= resume_after {
                            continue;
                        }
                        last_ts = last_ts.max(ev.ts_ms);
                        if tx.send((side.clone(), ev)).await.is_err() {
                            return;
                        }
                    }
                    // The daemon went away (or spoke nonsense): let the status task find out now.
                    Ok(None) | Err(_) => {
                        poke.notify_one();
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(LOG_RETRY) => {}
        }
    }
}
