//! The symmetric peer link between the engine's built-in udsproxyd and a DPU's udsproxyd (or
//! between two udsproxyd).
//!
//! Either side may start first, so each side listens (when it has a listen address) and dials
//! (when it has a peer address) until one authenticated link is up. If both dial at once, two
//! links come up; both sides keep the one dialled by the side with the larger random instance
//! id, so they agree without talking about it. When the link drops, the dialler starts again
//! with exponential backoff (100 ms doubling to 5 s, with jitter so two restarted peers do not
//! dial in lock step).
//!
//! Concurrency: one `Slot` behind a mutex holds the current link and the state `status`
//! reports; it is held only for short non-async sections. A [`Notify`] wakes the dialler when
//! the link drops.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::daemon::status::{PeerState, PeerStatus};
use crate::wire::{self, Addr, Auth, Hello, Link, LinkOptions, Listener, Role, Service};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Manages the one link to the peer.
#[derive(Clone)]
pub struct PeerManager {
    inner: Arc<Inner>,
}

struct Inner {
    hello: Hello,
    auth: Auth,
    /// The peer to dial; `None` means only wait to be dialled.
    peer_addr: Option<Addr>,
    /// Shown as the address while no peer is known.
    listen_addr: Option<String>,
    service: Arc<dyn Service>,
    opts: LinkOptions,
    slot: Mutex<Slot>,
    /// Wakes the dialler when the link goes away.
    link_lost: Notify,
}

struct Slot {
    link: Option<Link>,
    /// Instance id of the side that dialled `link` (the tie-break key).
    dialer: u64,
    /// Bumped on every new link, so a stale watcher cannot clear a newer link.
    generation: u64,
    state: PeerState,
    since: Instant,
    address: String,
    last_error: Option<String>,
    /// Bytes moved by links that have ended, so counters never go backwards.
    carried_in: u64,
    carried_out: u64,
}

impl PeerManager {
    /// A manager for the peer link. `hello.role` says who we are; the peer must present itself
    /// as an engine or udsproxyd.
    pub fn new(
        hello: Hello,
        auth: Auth,
        peer_addr: Option<Addr>,
        listen_addr: Option<String>,
        service: Arc<dyn Service>,
        opts: LinkOptions,
    ) -> PeerManager {
        let address = peer_addr
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| listen_addr.clone())
            .unwrap_or_default();
        let state = if peer_addr.is_some() {
            PeerState::Connecting
        } else {
            PeerState::Disconnected
        };
        PeerManager {
            inner: Arc::new(Inner {
                hello,
                auth,
                peer_addr,
                listen_addr,
                service,
                opts,
                slot: Mutex::new(Slot {
                    link: None,
                    dialer: 0,
                    generation: 0,
                    state,
                    since: Instant::now(),
                    address,
                    last_error: None,
                    carried_in: 0,
                    carried_out: 0,
                }),
                link_lost: Notify::new(),
            }),
        }
    }

    /// Runs the acceptor (if `listener`) and the dialler (if a peer address is set) until
    /// `shutdown`, then closes the link.
    pub async fn run(&self, listener: Option<Listener>, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = listener {
            let accepted = self.clone();
            let rejected = self.clone();
            let on_link: wire::OnLink = Arc::new(move |link: Link| accepted.offer_inbound(link));
            let on_reject: wire::OnReject =
                Arc::new(move |peer: String, e: &wire::HandshakeError| {
                    if e.is_auth_failure() {
                        rejected.record_auth_failure(&peer, &e.to_string());
                    }
                });
            tasks.spawn(wire::serve(
                listener,
                self.inner.auth.clone(),
                self.inner.hello.clone(),
                self.inner.service.clone(),
                self.inner.opts.clone(),
                on_link,
                on_reject,
                shutdown.clone(),
            ));
        }
        if self.inner.peer_addr.is_some() {
            let me = self.clone();
            let token = shutdown.clone();
            tasks.spawn(async move { me.dial_loop(token).await });
        }
        shutdown.cancelled().await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if let Some(link) = self.lock().link.take() {
            link.close();
        }
    }

    /// The current link, if one is up.
    pub fn link(&self) -> Option<Link> {
        self.lock().link.clone().filter(|l| !l.is_closed())
    }

    /// The peer's status line for `dpuctl status`.
    pub fn status(&self) -> PeerStatus {
        let slot = self.lock();
        let (mut bytes_in, mut bytes_out) = (slot.carried_in, slot.carried_out);
        let mut rtt_us = None;
        let mut role = None;
        if let Some(link) = &slot.link {
            let s = link.stats();
            bytes_in += s.bytes_in;
            bytes_out += s.bytes_out;
            rtt_us = s
                .rtt
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            role = Some(link.peer().role.as_str().to_string());
        }
        PeerStatus {
            address: slot.address.clone(),
            state: slot.state,
            bytes_in,
            bytes_out,
            role,
            rtt_us,
            since_secs: slot.since.elapsed().as_secs(),
            last_error: slot.last_error.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        // A poisoned slot only means a panic elsewhere mid-update; the data is still usable.
        self.inner.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn offer_inbound(&self, link: Link) {
        let peer = link.peer().clone();
        if !matches!(peer.role, Role::Engine | Role::Udsproxyd) {
            tracing::warn!(
                peer = %peer.address,
                role = peer.role.as_str(),
                "refusing a {} on the udsproxyd peer port: only an engine or udsproxyd may connect here",
                peer.role.as_str()
            );
            link.close();
            return;
        }
        self.offer(link, peer.instance, peer.address.clone());
    }

    /// Installs `link` unless a link dialled by a larger instance id is already up.
    fn offer(&self, link: Link, dialer: u64, address: String) {
        let generation = {
            let mut slot = self.lock();
            if let Some(current) = slot.link.as_ref().filter(|l| !l.is_closed()) {
                if dialer <= slot.dialer {
                    tracing::debug!(peer = %address, "duplicate peer link closed (the other dial won)");
                    link.close();
                    return;
                }
                tracing::debug!(peer = %address, "replacing the peer link with one dialled by the larger instance");
                current.close();
            }
            slot.generation += 1;
            slot.link = Some(link.clone());
            slot.dialer = dialer;
            slot.state = PeerState::Connected;
            slot.since = Instant::now();
            slot.address = self
                .inner
                .peer_addr
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or(address);
            slot.last_error = None;
            slot.generation
        };
        let peer = link.peer().clone();
        tracing::info!(
            peer = %peer.address,
            role = peer.role.as_str(),
            name = %peer.name,
            insecure = peer.insecure,
            "peer link up"
        );
        let me = self.clone();
        tokio::spawn(async move {
            let reason = link.closed().await;
            me.link_ended(generation, &link, reason);
        });
    }

    fn link_ended(&self, generation: u64, link: &Link, reason: String) {
        let mut slot = self.lock();
        if slot.generation != generation {
            return; // superseded by a newer link; its watcher owns the slot
        }
        let stats = link.stats();
        slot.carried_in += stats.bytes_in;
        slot.carried_out += stats.bytes_out;
        slot.link = None;
        slot.state = if self.inner.peer_addr.is_some() {
            PeerState::Connecting
        } else {
            PeerState::Disconnected
        };
        slot.since = Instant::now();
        if self.inner.peer_addr.is_none() {
            if let Some(listen) = &self.inner.listen_addr {
                slot.address = listen.clone();
            }
        }
        tracing::warn!(peer = %link.peer().address, reason = %reason, "peer link lost");
        slot.last_error = Some(reason);
        drop(slot);
        self.inner.link_lost.notify_one();
    }

    fn record_auth_failure(&self, peer: &str, why: &str) {
        let mut slot = self.lock();
        if slot.link.as_ref().is_some_and(|l| !l.is_closed()) {
            return; // a stranger failing to authenticate does not change a working link
        }
        if slot.state != PeerState::AuthFailed {
            slot.since = Instant::now();
        }
        slot.state = PeerState::AuthFailed;
        slot.address = peer.to_string();
        slot.last_error = Some(why.to_string());
    }

    async fn dial_loop(&self, shutdown: CancellationToken) {
        let Some(addr) = self.inner.peer_addr.clone() else {
            return;
        };
        let mut backoff = BACKOFF_MIN;
        let mut last_logged: Option<String> = None;
        loop {
            // Wait while a link is up.
            loop {
                let lost = self.inner.link_lost.notified();
                if self.link().is_none() {
                    break;
                }
                tokio::select! {
                    _ = lost => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            let dialled = tokio::select! {
                r = wire::dial(&addr, &self.inner.auth, &self.inner.hello, self.inner.service.clone(), self.inner.opts.clone()) => r,
                _ = shutdown.cancelled() => return,
            };
            match dialled {
                Ok(link) => {
                    backoff = BACKOFF_MIN;
                    last_logged = None;
                    self.offer(link, self.inner.hello.instance, addr.to_string());
                    continue;
                }
                Err(e) => {
                    let why = e.to_string();
                    let auth = e.is_auth_failure();
                    {
                        let mut slot = self.lock();
                        if slot.link.is_none() {
                            let state = if auth {
                                PeerState::AuthFailed
                            } else {
                                PeerState::Connecting
                            };
                            if slot.state != state {
                                slot.since = Instant::now();
                            }
                            slot.state = state;
                            slot.address = addr.to_string();
                            slot.last_error = Some(why.clone());
                        }
                    }
                    // Log the first failure of a streak and every change of reason, not every retry.
                    if last_logged.as_deref() != Some(why.as_str()) {
                        if auth {
                            tracing::error!(peer = %addr, error = %why, "peer refused our key, or we refused theirs: both sides need the same key file (dpuctl keygen, then copy it)");
                        } else {
                            tracing::warn!(peer = %addr, error = %why, "cannot reach the peer yet; retrying with backoff");
                        }
                        last_logged = Some(why);
                    }
                }
            }
            let wait = jitter(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.0).
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        u16::MAX / 2
    };
    d.mul_f64(0.5 + f64::from(r) / f64::from(u16::MAX) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_secs(4));
            assert!(
                j >= Duration::from_secs(2) && j <= Duration::from_secs(4),
                "{j:?}"
            );
        }
    }
}
