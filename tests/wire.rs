//! Integration tests of the wire layer over real sockets: `serve` + `dial` on 127.0.0.1 TCP
//! and on a temporary Unix socket, hostile clients written byte by byte from
//! docs/protocol.md, and the error a vsock user gets on a machine without vsock transport.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use dpuctl::wire::{
    self, handshake, Addr, Auth, CallError, HandshakeError, Hello, Link, LinkOptions, NoService,
    Psk, RemoteError, Role, Service,
};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const OP_ECHO: u16 = 1;
const OP_SLOW: u16 = 2;
const OP_DENIED: u16 = 3;
const OP_FAST: u16 = 4;

/// The test service: echo, a 2-second op, an EACCES op, an instant op.
struct TestService;

impl Service for TestService {
    fn call(&self, op: u16, payload: Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
        Box::pin(async move {
            match op {
                OP_ECHO => Ok(payload),
                OP_SLOW => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Ok(Bytes::from_static(b"slow"))
                }
                OP_DENIED => Err(RemoteError::new(libc::EACCES, "not in the allowlist")),
                OP_FAST => Ok(Bytes::from_static(b"fast")),
                _ => Err(RemoteError::new(libc::ENOSYS, "unknown op")),
            }
        })
    }
}

fn psk(b: u8) -> Auth {
    Auth::Psk(Arc::new(Psk::from_bytes([b; 32])))
}

fn hello(role: Role) -> Hello {
    Hello {
        role,
        instance: 42,
        name: format!("test-{}", role.as_str()),
    }
}

/// A failed handshake as seen by `on_reject`.
#[derive(Debug)]
struct Reject {
    peer: String,
    debug: String,
    auth: bool,
}

struct Server {
    addr: Addr,
    links: mpsc::UnboundedReceiver<Link>,
    rejects: mpsc::UnboundedReceiver<Reject>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(addr: Addr, auth: Auth, opts: LinkOptions) -> Server {
        let listener = addr.bind().await.expect("bind");
        let addr = listener.local_addr();
        let (ltx, links) = mpsc::unbounded_channel();
        let (rtx, rejects) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(wire::serve(
            listener,
            auth,
            hello(Role::Engine),
            Arc::new(TestService),
            opts,
            Arc::new(move |l| {
                let _ = ltx.send(l);
            }),
            Arc::new(move |peer, e: &HandshakeError| {
                let _ = rtx.send(Reject {
                    peer,
                    debug: format!("{e:?}"),
                    auth: e.is_auth_failure(),
                });
            }),
            shutdown.clone(),
        ));
        Server {
            addr,
            links,
            rejects,
            shutdown,
            task,
        }
    }

    async fn tcp(auth: Auth, opts: LinkOptions) -> Server {
        Server::start(Addr::Tcp("127.0.0.1:0".into()), auth, opts).await
    }

    async fn next_link(&mut self) -> Link {
        tokio::time::timeout(Duration::from_secs(5), self.links.recv())
            .await
            .expect("no link within 5 s")
            .expect("serve ended")
    }

    async fn next_reject(&mut self) -> Reject {
        tokio::time::timeout(Duration::from_secs(5), self.rejects.recv())
            .await
            .expect("no rejection within 5 s")
            .expect("serve ended")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .expect("serve did not return promptly after shutdown")
            .expect("serve panicked");
    }
}

async fn dial(addr: &Addr, auth: &Auth, opts: LinkOptions) -> Result<Link, wire::DialError> {
    wire::dial(addr, auth, &hello(Role::Mount), Arc::new(NoService), opts).await
}

fn tcp_port(addr: &Addr) -> String {
    match addr {
        Addr::Tcp(hp) => hp.clone(),
        other => panic!("not tcp: {other}"),
    }
}

/// Reads until EOF or error; returns how long that took. Panics after `limit`.
async fn wait_for_eof(s: &mut TcpStream, limit: Duration) -> Duration {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return t0.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn handshake_fills_peer_info_on_both_sides() {
    let mut srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let client = dial(&srv.addr, &psk(1), LinkOptions::default())
        .await
        .unwrap();
    let server_side = srv.next_link().await;
    let p = client.peer();
    assert_eq!(p.address, srv.addr.to_string());
    assert_eq!(p.role, Role::Engine);
    assert_eq!(p.name, "test-engine");
    assert_eq!(p.instance, 42);
    assert_eq!(p.version, wire::PROTOCOL_VERSION);
    assert!(!p.insecure);
    let q = server_side.peer();
    assert_eq!(q.role, Role::Mount);
    assert!(q.address.starts_with("tcp://127.0.0.1:"), "{}", q.address);
    // The server can call the client too (the client serves NoService).
    let e = server_side.call(7, Bytes::new()).await.unwrap_err();
    assert_eq!(e.errno(), libc::ENOSYS);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls_get_their_own_answers() {
    let srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let link = dial(&srv.addr, &psk(1), LinkOptions::default())
        .await
        .unwrap();
    let calls = (0..500u32).map(|i| {
        let link = link.clone();
        tokio::spawn(async move {
            let payload = Bytes::from(format!("request {i} {}", "x".repeat(i as usize * 7)));
            let got = link.call(OP_ECHO, payload.clone()).await.unwrap();
            assert_eq!(got, payload);
        })
    });
    for c in futures::future::join_all(calls).await {
        c.unwrap();
    }
    // One 8 MiB payload round trip, too.
    let big = Bytes::from(vec![0xa5u8; 8 << 20]);
    assert_eq!(link.call(OP_ECHO, big.clone()).await.unwrap(), big);
    assert_eq!(link.stats().requests_out, 501);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_call_does_not_delay_a_later_fast_one() {
    let srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let link = dial(&srv.addr, &psk(1), LinkOptions::default())
        .await
        .unwrap();
    let t0 = Instant::now();
    let slow = tokio::spawn({
        let link = link.clone();
        async move {
            let r = link.call(OP_SLOW, Bytes::new()).await;
            (r, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast = link.call(OP_FAST, Bytes::new()).await.unwrap();
    let fast_done = Instant::now();
    assert_eq!(fast, "fast");
    assert!(
        fast_done - t0 < Duration::from_secs(1),
        "fast call took {:?}",
        fast_done - t0
    );
    assert!(
        !slow.is_finished(),
        "slow call finished before the fast one"
    );
    let (r, slow_done) = slow.await.unwrap();
    assert_eq!(r.unwrap(), "slow");
    assert!(slow_done > fast_done);
    srv.stop().await;
}

#[tokio::test]
async fn remote_errno_arrives_unchanged() {
    let srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let link = dial(&srv.addr, &psk(1), LinkOptions::default())
        .await
        .unwrap();
    let e = link.call(OP_DENIED, Bytes::new()).await.unwrap_err();
    match &e {
        CallError::Remote(r) => {
            assert_eq!(r.errno, libc::EACCES);
            assert_eq!(r.message, "not in the allowlist");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    let io: std::io::Error = e.into();
    assert_eq!(io.raw_os_error(), Some(libc::EACCES));
    assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
    srv.stop().await;
}

#[tokio::test]
async fn peer_dropping_mid_call_fails_the_call_quickly() {
    // A raw server: handshake, read the request, then vanish.
    let listener = Addr::Tcp("127.0.0.1:0".into()).bind().await.unwrap();
    let addr = listener.local_addr();
    let server = tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await.unwrap();
        handshake::server(
            &mut s,
            &peer,
            &psk(1),
            &hello(Role::Engine),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        let mut head = [0u8; 16];
        s.read_exact(&mut head).await.unwrap();
        drop(s);
    });
    let link = dial(&addr, &psk(1), LinkOptions::default()).await.unwrap();
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        link.call(OP_SLOW, Bytes::from_static(b"abc")),
    )
    .await
    .expect("call hung after the peer left");
    assert!(
        matches!(r, Err(CallError::Closed(ref why)) if why.contains("closed the connection")),
        "{r:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(link.is_closed());
    let why = link.closed().await;
    assert!(why.contains("closed the connection"), "{why}");
    server.await.unwrap();
}

#[tokio::test]
async fn dead_after_closes_a_silent_link() {
    let opts = LinkOptions {
        dead_after: Duration::from_millis(400),
        keepalive: Duration::from_secs(60),
        ..LinkOptions::default()
    };
    let mut srv = Server::tcp(psk(1), opts).await;
    // A client that completes the handshake and then says nothing (no keepalive).
    let mut raw = TcpStream::connect(tcp_port(&srv.addr)).await.unwrap();
    handshake::client(
        &mut raw,
        "srv",
        &psk(1),
        &hello(Role::Client),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    let link = srv.next_link().await;
    let t0 = Instant::now();
    let why = tokio::time::timeout(Duration::from_secs(3), link.closed())
        .await
        .expect("silent link not closed");
    assert!(why.contains("dead_after"), "{why}");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    wait_for_eof(&mut raw, Duration::from_secs(2)).await;

    // A normal client with keepalive shorter than dead_after stays up while idle.
    let client_opts = LinkOptions {
        keepalive: Duration::from_millis(100),
        ..LinkOptions::default()
    };
    let live = dial(&srv.addr, &psk(1), client_opts).await.unwrap();
    let server_side = srv.next_link().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!server_side.is_closed(), "{}", server_side.closed().await);
    assert!(live.stats().rtt.is_some(), "keepalive pings measure rtt");
    srv.stop().await;
}

#[tokio::test]
async fn stats_count_bytes_and_requests() {
    let opts = LinkOptions {
        keepalive: Duration::from_secs(60),
        ..LinkOptions::default()
    };
    let mut srv = Server::tcp(psk(1), opts.clone()).await;
    let link = dial(&srv.addr, &psk(1), opts).await.unwrap();
    let server_side = srv.next_link().await;
    for n in [0usize, 10, 1000] {
        link.call(OP_ECHO, Bytes::from(vec![1u8; n])).await.unwrap();
    }
    let c = link.stats();
    // Three requests of 16-byte headers + payloads; answers are the same size.
    let expected = 3 * 16 + 1010;
    assert_eq!(c.requests_out, 3);
    assert_eq!(c.bytes_out, expected);
    assert_eq!(c.bytes_in, expected);
    let s = server_side.stats();
    assert_eq!(s.requests_in, 3);
    assert_eq!(s.bytes_in, expected);
    assert_eq!(s.bytes_out, expected);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_slow_loris_clients_are_dropped_while_a_good_client_is_served() {
    let opts = LinkOptions {
        handshake_timeout: Duration::from_millis(700),
        ..LinkOptions::default()
    };
    let mut srv = Server::tcp(psk(1), opts).await;
    let hp = tcp_port(&srv.addr);

    let mut loris = TcpStream::connect(&hp).await.unwrap();
    loris.write_all(b"DPU").await.unwrap(); // 3 bytes of a header, then nothing
    let mut garbage = TcpStream::connect(&hp).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    // The good client is served while the slow-loris connection is still pending.
    let good = dial(&srv.addr, &psk(1), LinkOptions::default())
        .await
        .unwrap();
    assert_eq!(good.call(OP_FAST, Bytes::new()).await.unwrap(), "fast");

    let took = wait_for_eof(&mut garbage, Duration::from_secs(2)).await;
    assert!(
        took < Duration::from_millis(600),
        "garbage client kept for {took:?}"
    );
    let took = wait_for_eof(&mut loris, Duration::from_secs(3)).await;
    assert!(
        took < Duration::from_millis(2000),
        "slow loris kept for {took:?}"
    );

    let mut rejects = vec![srv.next_reject().await, srv.next_reject().await];
    rejects.sort_by(|a, b| a.debug.cmp(&b.debug));
    assert!(rejects[0].debug.starts_with("BadMagic"), "{rejects:?}");
    assert!(rejects[1].debug.starts_with("Timeout"), "{rejects:?}");
    for r in &rejects {
        assert!(r.peer.starts_with("tcp://127.0.0.1:"), "{r:?}");
        assert!(!r.auth);
    }
    // Still serving.
    assert_eq!(
        good.call(OP_ECHO, Bytes::from_static(b"ok")).await.unwrap(),
        "ok"
    );
    let again = dial(&srv.addr, &psk(1), LinkOptions::default())
        .await
        .unwrap();
    assert_eq!(again.call(OP_FAST, Bytes::new()).await.unwrap(), "fast");
    srv.stop().await;
}

/// Completes a client handshake on a raw TCP stream (to then misbehave at the frame level).
async fn raw_authenticated(addr: &Addr) -> TcpStream {
    let mut raw = TcpStream::connect(tcp_port(addr)).await.unwrap();
    handshake::client(
        &mut raw,
        "srv",
        &psk(1),
        &hello(Role::Client),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    raw
}

#[tokio::test]
async fn an_oversized_frame_closes_that_link_only() {
    let opts = LinkOptions {
        max_frame: 64 * 1024,
        ..LinkOptions::default()
    };
    let mut srv = Server::tcp(psk(1), opts.clone()).await;
    let good = dial(&srv.addr, &psk(1), opts.clone()).await.unwrap();
    let good_server_side = srv.next_link().await;

    let mut bad = raw_authenticated(&srv.addr).await;
    let bad_server_side = srv.next_link().await;
    let mut frame = BytesMut::new();
    frame.put_u32(64 * 1024 - 16 + 1); // one byte over the payload limit
    frame.put_u8(1); // Request
    frame.put_u8(0);
    frame.put_u16(OP_ECHO);
    frame.put_u64(1);
    bad.write_all(&frame).await.unwrap();

    let why = tokio::time::timeout(Duration::from_secs(2), bad_server_side.closed())
        .await
        .expect("oversized frame did not close the link");
    assert!(why.contains("exceeds the limit"), "{why}");
    wait_for_eof(&mut bad, Duration::from_secs(2)).await;

    assert!(!good_server_side.is_closed());
    assert_eq!(
        good.call(OP_ECHO, Bytes::from_static(b"fine"))
            .await
            .unwrap(),
        "fine"
    );
    // The sending side refuses too-large payloads itself, without closing anything.
    let e = good
        .call(OP_ECHO, Bytes::from(vec![0u8; 64 * 1024]))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::TooLarge { .. }), "{e:?}");
    assert!(!good.is_closed());
    srv.stop().await;
}

#[tokio::test]
async fn a_frame_stalled_midway_is_cut_off_by_frame_timeout() {
    let opts = LinkOptions {
        frame_timeout: Duration::from_millis(300),
        ..LinkOptions::default()
    };
    let mut srv = Server::tcp(psk(1), opts).await;
    let mut raw = raw_authenticated(&srv.addr).await;
    let link = srv.next_link().await;
    raw.write_all(&[0, 0, 0]).await.unwrap(); // 3 bytes of a frame header, then stall
    let why = tokio::time::timeout(Duration::from_secs(2), link.closed())
        .await
        .expect("stalled frame not cut off");
    assert!(why.contains("frame_timeout"), "{why}");
    srv.stop().await;
}

#[tokio::test]
async fn garbage_after_the_handshake_closes_the_link() {
    let mut srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let mut raw = raw_authenticated(&srv.addr).await;
    let link = srv.next_link().await;
    raw.write_all(&[0, 0, 0, 0, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
        .await
        .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(2), link.closed())
        .await
        .unwrap();
    assert!(why.contains("unknown frame kind 0x7f"), "{why}");
    srv.stop().await;
}

#[tokio::test]
async fn wrong_key_is_an_auth_failure_on_both_sides() {
    let mut srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let e = dial(&srv.addr, &psk(2), LinkOptions::default())
        .await
        .unwrap_err();
    assert!(e.is_auth_failure(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&srv.addr.to_string()), "{msg}");
    assert!(msg.contains("same key"), "{msg}");
    let r = srv.next_reject().await;
    assert!(r.auth, "{r:?}");
    assert!(r.debug.starts_with("AuthFailed"), "{r:?}");
    srv.stop().await;
}

#[tokio::test]
async fn insecure_and_keyed_sides_refuse_each_other() {
    let mut srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let e = dial(&srv.addr, &Auth::Insecure, LinkOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("insecure mode"), "{e}");
    assert!(srv
        .next_reject()
        .await
        .debug
        .starts_with("InsecureMismatch"));
    srv.stop().await;

    let mut srv = Server::tcp(Auth::Insecure, LinkOptions::default()).await;
    let e = dial(&srv.addr, &psk(1), LinkOptions::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("the peer runs in insecure mode"),
        "{e}"
    );
    assert!(srv
        .next_reject()
        .await
        .debug
        .starts_with("InsecureMismatch"));
    // Both insecure: works, and both sides know.
    let link = dial(&srv.addr, &Auth::Insecure, LinkOptions::default())
        .await
        .unwrap();
    assert!(link.peer().insecure);
    assert!(srv.next_link().await.peer().insecure);
    srv.stop().await;
}

#[tokio::test]
async fn version_mismatch_is_reported_by_the_server() {
    let mut srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let mut raw = TcpStream::connect(tcp_port(&srv.addr)).await.unwrap();
    // HELLO from a future release speaking only version 2 (docs/protocol.md §4.2).
    let mut msg = BytesMut::new();
    msg.put_slice(b"DPUW");
    msg.put_u8(1); // HELLO
    msg.put_u8(0);
    msg.put_u16(40);
    msg.put_u16(2); // min version
    msg.put_u16(2); // max version
    msg.put_u8(1); // auth mode psk
    msg.put_slice(&[0, 0, 0]);
    msg.put_slice(&[7u8; 32]); // nonce
    raw.write_all(&msg).await.unwrap();

    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), raw.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    // Server HELLO (8 + 40 bytes) announcing versions 1..=1, then FAIL code 1.
    assert_eq!(&reply[..8], b"DPUW\x01\x00\x00\x28");
    assert_eq!(&reply[8..12], &[0, 1, 0, 1]);
    assert_eq!(&reply[48..53], b"DPUW\x04");
    assert_eq!(reply[56], 1, "FAIL code 1 = version");
    let text = String::from_utf8_lossy(&reply[57..]);
    assert!(text.contains("version"), "{text}");

    let r = srv.next_reject().await;
    assert!(
        r.debug.contains("VersionMismatch { ours: 1, theirs: 2 }"),
        "{r:?}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn unix_socket_transport() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("engine.sock");
    let addr: Addr = format!("unix://{}", path.display()).parse().unwrap();
    let mut srv = Server::start(addr.clone(), psk(5), LinkOptions::default()).await;
    assert_eq!(srv.addr, addr);
    let link = dial(&addr, &psk(5), LinkOptions::default()).await.unwrap();
    assert_eq!(
        link.call(OP_ECHO, Bytes::from_static(b"over unix"))
            .await
            .unwrap(),
        "over unix"
    );
    let server_side = srv.next_link().await;
    let peer = &server_side.peer().address;
    assert!(
        peer.starts_with(&format!("unix://{}[pid=", path.display())),
        "{peer}"
    );
    // A second listener on the same live path is refused.
    let err = addr.bind().await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    srv.stop().await;
    assert!(
        !path.exists(),
        "socket file removed when the listener is dropped"
    );
    // Connecting to a path nobody listens on names the cause.
    let e = dial(&addr, &psk(5), LinkOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, wire::DialError::Connect { .. }), "{e}");
}

#[tokio::test]
async fn vsock_without_transport_fails_clearly_within_the_timeout() {
    let addr: Addr = "vsock://1:9".parse().unwrap();
    let timeout = Duration::from_millis(1500);
    let t0 = Instant::now();
    let r = addr.connect(timeout).await;
    let took = t0.elapsed();
    let err = match r {
        Ok(_) => {
            println!("skipped: a vsock loopback transport exists here and vsock://1:9 accepted");
            return;
        }
        Err(e) => e,
    };
    if err.raw_os_error() == Some(libc::EAFNOSUPPORT)
        || err.to_string().contains("no vsock transport")
    {
        println!("skipped: AF_VSOCK sockets cannot be created on this machine: {err}");
        return;
    }
    assert!(took < timeout + Duration::from_millis(500), "took {took:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("vsock://1:9"),
        "message does not name the address: {msg}"
    );
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
        ) || err.raw_os_error().is_some(),
        "{err:?}"
    );
    // Through dial, the same error carries the address and a hint.
    let opts = LinkOptions {
        handshake_timeout: Duration::from_millis(500),
        ..LinkOptions::default()
    };
    let e = dial(&addr, &psk(1), opts).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("cannot connect to vsock://1:9"), "{msg}");
    println!("vsock error as a user sees it: {msg}");
}

#[tokio::test]
async fn serve_returns_promptly_on_shutdown_and_links_outlive_it() {
    let mut srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let link = dial(&srv.addr, &psk(1), LinkOptions::default())
        .await
        .unwrap();
    let _server_side = srv.next_link().await;
    // A connection stuck in its handshake must not hold up shutdown.
    let _stuck = TcpStream::connect(tcp_port(&srv.addr)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let addr = srv.addr.clone();
    srv.stop().await;
    assert_eq!(link.call(OP_FAST, Bytes::new()).await.unwrap(), "fast");
    // No longer accepting.
    let opts = LinkOptions {
        handshake_timeout: Duration::from_millis(500),
        ..LinkOptions::default()
    };
    assert!(dial(&addr, &psk(1), opts).await.is_err());
}

/// Captures log output of everything running on the current thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// Current-thread runtime: every task runs on this thread, under the scoped subscriber.
#[tokio::test]
async fn rejected_connections_and_insecure_links_are_logged_with_the_peer() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut srv = Server::tcp(psk(1), LinkOptions::default()).await;
    let mut garbage = TcpStream::connect(tcp_port(&srv.addr)).await.unwrap();
    let local = garbage.local_addr().unwrap();
    garbage.write_all(b"hello?\n").await.unwrap();
    srv.next_reject().await;
    let text = logs.text();
    assert!(text.contains("WARN"), "{text}");
    assert!(text.contains(&format!("tcp://{local}")), "{text}");
    assert!(text.contains("not a dpuctl peer"), "{text}");
    srv.stop().await;

    let mut srv = Server::tcp(Auth::Insecure, LinkOptions::default()).await;
    let _link = dial(&srv.addr, &Auth::Insecure, LinkOptions::default())
        .await
        .unwrap();
    let _server_side = srv.next_link().await;
    let text = logs.text();
    assert!(
        text.matches("insecure link: the peer is NOT authenticated")
            .count()
            >= 2,
        "both sides warn: {text}"
    );
    srv.stop().await;
}
