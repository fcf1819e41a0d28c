//! udsproxyd end to end: the engine (built-in peer) on the HOST side and udsproxyd on the DPU
//! side, each in its own mount+pid namespace with a private /run, over 127.0.0.1 with a real
//! key. Real Unix-socket servers are bound in the HOST's /run (the test process reaches it
//! through /proc/PID/root), clients connect through the DPU's request socket, so the only
//! way from client to server is the proxy.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{peer_state, s, text, Scratch, Side};
use dpuctl::uds::connect::{connect_remote, ConnectError};
use dpuctl::uds::proto::SockType;

const CONNECT: Duration = Duration::from_secs(15);

struct Pair {
    scratch: Scratch,
    host: Side,
    dpu: Side,
    uds_port: String,
    key: PathBuf,
    host_wl: PathBuf,
}

fn host_args(p: &Pair) -> Vec<String> {
    host_args_of(&p.uds_port, &p.key, &p.host_wl)
}

fn host_args_of(port: &str, key: &Path, wl: &Path) -> Vec<String> {
    [
        "engine",
        "--listen",
        &format!("tcp://127.0.0.1:{}", common::free_port()),
        "--uds-listen",
        &format!("tcp://127.0.0.1:{port}"),
        "--key",
        s(key),
        "--whitelist",
        s(wl),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

/// HOST allows `/run/allowed`; the DPU routes `/run/allowed`, `/run/redis.sock`, the
/// PostgreSQL socket directory `/run/postgresql` and rexec's `/var/run/rexec`.
fn start_pair() -> Pair {
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let uds_port = common::free_port().to_string();
    let host_wl = scratch.write(
        "host-whitelist",
        "[Mount]\nPath=/tmp\n[Udsconnect]\nPath=/run/allowed;/run/redis.sock;/run/postgresql;/var/run/rexec\n",
    );
    let dpu_wl = scratch.write(
        "dpu-whitelist",
        "[Udsconnect]\nPath=/run/allowed;/run/redis.sock;/run/postgresql;/var/run/rexec\n",
    );
    let args = host_args_of(&uds_port, &key, &host_wl);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let host = Side::start("host", &scratch, &args);
    let dpu = Side::start(
        "dpu",
        &scratch,
        &[
            "udsproxyd",
            "--listen",
            "",
            "--peer",
            &format!("tcp://127.0.0.1:{uds_port}"),
            "--key",
            s(&key),
            "--whitelist",
            s(&dpu_wl),
        ],
    );
    let p = Pair {
        scratch,
        host,
        dpu,
        uds_port,
        key,
        host_wl,
    };
    wait_connected(&p);
    p
}

fn wait_connected(p: &Pair) {
    p.dpu.wait_status("udsproxyd connected", CONNECT, |st| {
        peer_state(st, "udsproxyd").as_deref() == Some("connected")
    });
}

/// Sets SO_SNDBUF of `fd` (the kernel doubles it, up to net.core.wmem_max).
fn set_sndbuf(fd: std::os::fd::RawFd, bytes: libc::c_int) {
    // SAFETY: a c_int option value of its own size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_SNDBUF: {}", std::io::Error::last_os_error());
}

/// An echo server on `path`: each connection echoes until EOF, then half-closes.
fn echo_server(path: &Path) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("mkdir for the echo socket");
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).expect("bind echo server");
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

fn connect(p: &Pair, kind: SockType, path: &str) -> Result<OwnedFd, ConnectError> {
    connect_remote(&p.dpu.request_socket(CONNECT), kind, Path::new(path), 0)
}

fn daemon_fds(side: &Side) -> usize {
    let pid = side.daemon_pid().expect("daemon running");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn counter(side: &Side, name: &str, key: &str) -> u64 {
    side.status()
        .and_then(|st| {
            st["daemons"]
                .as_array()?
                .iter()
                .find(|d| d["name"] == name)?["counters"][key]
                .as_u64()
        })
        .unwrap_or(u64::MAX)
}

#[test]
fn stream_bytes_both_ways_half_close_and_status() {
    require_namespaces!();
    let p = start_pair();
    echo_server(&p.host.inside("/run/allowed/echo.sock"));

    let fd = connect(&p, SockType::Stream, "/run/allowed/echo.sock").expect("connect");
    let mut c = UnixStream::from(fd);
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let mut w = c.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        // Half-close: the server sees EOF, echoes the rest and closes its side.
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });

    // While the connection lives, both sides list it.
    let dpu = p
        .dpu
        .wait_status("a live outbound connection", CONNECT, |st| {
            st["daemons"][0]["connections"]
                .as_array()
                .is_some_and(|c| c.len() == 1)
        });
    let conn = &dpu["daemons"][0]["connections"][0];
    assert_eq!(conn["path"], "/run/allowed/echo.sock", "{dpu}");
    assert_eq!(conn["type"], "stream");
    assert_eq!(conn["direction"], "outbound");
    let host = p
        .host
        .wait_status("a live inbound connection", CONNECT, |st| {
            st["daemons"][0]["connections"]
                .as_array()
                .is_some_and(|c| c.len() == 1)
        });
    assert_eq!(host["daemons"][0]["connections"][0]["direction"], "inbound");

    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes lost or reordered");

    // Closed everywhere afterwards; counters kept.
    p.dpu.wait_status("the connection gone", CONNECT, |st| {
        st["daemons"][0]["connections"]
            .as_array()
            .map_or(true, |c| c.is_empty())
            && st["daemons"][0]["counters"]["bytes_in"].as_u64() == Some(data.len() as u64)
    });
    assert_eq!(counter(&p.dpu, "udsproxyd", "connections_total"), 1);
    assert_eq!(counter(&p.host, "engine", "connections_inbound"), 1);
}

/// A server that answers and closes while the client is still writing (rexec_server after a
/// program's exit does this): the answer and the end of file reach the client whole, however
/// much the client still sends, and neither daemon counts the connection as failed.
#[test]
fn server_that_answers_and_closes_early_loses_no_answer() {
    require_namespaces!();
    let p = start_pair();
    let path = p.host.inside("/run/allowed/early.sock");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let l = UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut first = [0u8; 6];
            if c.read_exact(&mut first).is_ok() {
                let _ = c.write_all(b"answer:");
                let _ = c.write_all(&first);
            }
            // Closed with the client's later bytes unread.
        }
    });
    for round in 0..20 {
        let fd = connect(&p, SockType::Stream, "/run/allowed/early.sock").expect("connect");
        let mut c = UnixStream::from(fd);
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(b"hello!");
            // Keeps writing after the server is gone: these bytes have nowhere to go.
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..32 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let mut got = Vec::new();
        c.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(got, b"answer:hello!", "round {round}");
        writer.join().unwrap();
    }
    p.dpu.wait_status("all connections gone", CONNECT, |st| {
        st["daemons"][0]["connections"]
            .as_array()
            .map_or(true, |c| c.is_empty())
    });
    for log in [p.dpu.log(), p.host.log()] {
        assert!(!log.contains("ended with an error"), "{log}");
    }
}

/// Out-of-band bytes (`send(MSG_OOB)`) in the middle of a stream: they arrive in line, and
/// what follows them arrives too, without waiting for more bytes to come (a read stops
/// short at the out-of-band mark, which must not be taken for an emptied socket).
#[test]
fn out_of_band_bytes_arrive_in_line_and_stall_nothing() {
    require_namespaces!();
    let p = start_pair();
    echo_server(&p.host.inside("/run/allowed/echo.sock"));
    for round in 0..20 {
        let fd = connect(&p, SockType::Stream, "/run/allowed/echo.sock").expect("connect");
        let mut c = UnixStream::from(fd);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let send = |data: &[u8], flags: i32| {
            // SAFETY: sends from a valid buffer of data.len() bytes on an open socket.
            let n = unsafe { libc::send(c.as_raw_fd(), data.as_ptr().cast(), data.len(), flags) };
            assert_eq!(
                n,
                data.len() as isize,
                "send: {}",
                std::io::Error::last_os_error()
            );
        };
        send(b"abc", 0);
        send(b"X", libc::MSG_OOB);
        send(b"def", 0);
        let mut got = [0u8; 7];
        c.read_exact(&mut got).unwrap_or_else(|e| {
            panic!("round {round}: the bytes after the out-of-band one did not arrive: {e}")
        });
        assert_eq!(&got, b"abcXdef", "round {round}");
    }
}

#[test]
fn dgram_and_seqpacket_keep_message_boundaries() {
    require_namespaces!();
    let p = start_pair();
    // A datagram echo server answering each sender's datagram to its address.
    let dg_path = p.host.inside("/run/allowed/dg.sock");
    std::fs::create_dir_all(dg_path.parent().unwrap()).unwrap();
    let server = UnixDatagram::bind(&dg_path).expect("bind dgram server");
    set_sndbuf(server.as_raw_fd(), 1 << 20);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 300_000];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            if let Some(to) = from.as_pathname() {
                let _ = server.send_to(&buf[..n], to);
            } else {
                let _ = server.send_to_addr(&buf[..n], &from);
            }
        }
    });
    let c = UnixStream::from(
        connect(&p, SockType::Dgram, "/run/allowed/dg.sock").expect("dgram connect"),
    );
    // The largest message proxied (256 KiB) is more than a Unix socket's default send
    // buffer: the daemons grow theirs, as the sender did.
    set_sndbuf(c.as_raw_fd(), 1 << 20);
    let sizes = [1usize, 100, 60_000, 3, 4096, 256 * 1024];
    for n in sizes {
        let msg: Vec<u8> = (0..n).map(|i| (i % 256) as u8).collect();
        assert_eq!(
            nix::sys::socket::send(c.as_raw_fd(), &msg, nix::sys::socket::MsgFlags::empty())
                .unwrap(),
            n
        );
    }
    let mut buf = vec![0u8; 300_000];
    for n in sizes {
        let got =
            nix::sys::socket::recv(c.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty())
                .unwrap();
        assert_eq!(got, n, "one message per datagram, same size, same order");
        assert!(buf[..n]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 256) as u8));
    }

    // The operator tool waits for the answer to a datagram after the end of its stdin.
    let out = p
        .dpu
        .sh("printf ping | $DPUCTL uds-connect --type dgram /run/allowed/dg.sock");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ping",
        "{}",
        text(&out)
    );

    // Seqpacket: a real SOCK_SEQPACKET server that echoes each message.
    use nix::sys::socket::{self as ns, AddressFamily, SockFlag, UnixAddr};
    let sp_path = p.host.inside("/run/allowed/sp.sock");
    let l = ns::socket(
        AddressFamily::Unix,
        ns::SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    ns::bind(l.as_raw_fd(), &UnixAddr::new(&sp_path).unwrap()).unwrap();
    ns::listen(&l, ns::Backlog::new(16).unwrap()).unwrap();
    std::thread::spawn(move || {
        let Ok(c) = ns::accept(l.as_raw_fd()) else {
            return;
        };
        let mut buf = vec![0u8; 70_000];
        loop {
            match ns::recv(c, &mut buf, ns::MsgFlags::empty()) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = ns::send(c, &buf[..n], ns::MsgFlags::empty());
                }
            }
        }
        let _ = nix::unistd::close(c);
    });
    let c = UnixStream::from(
        connect(&p, SockType::Seqpacket, "/run/allowed/sp.sock").expect("seqpacket connect"),
    );
    for n in [5usize, 50_000, 7] {
        let msg = vec![n as u8; n];
        ns::send(c.as_raw_fd(), &msg, ns::MsgFlags::empty()).unwrap();
        let got = ns::recv(c.as_raw_fd(), &mut buf, ns::MsgFlags::empty()).unwrap();
        assert_eq!(got, n);
        assert!(buf[..n].iter().all(|b| *b == n as u8));
    }
    // Closing our end reaches the server (it sees EOF and closes), and we see EOF too.
    ns::shutdown(c.as_raw_fd(), ns::Shutdown::Write).unwrap();
    assert_eq!(
        ns::recv(c.as_raw_fd(), &mut buf, ns::MsgFlags::empty()).unwrap(),
        0
    );
}

#[test]
fn allowlist_refuses_and_live_qtcfg_change_applies() {
    require_namespaces!();
    let p = start_pair();
    echo_server(&p.host.inside("/run/other/echo.sock"));
    match connect(&p, SockType::Stream, "/run/other/echo.sock") {
        Err(ConnectError::Refused { errno, message }) => {
            assert_eq!(errno, libc::ECONNREFUSED);
            assert!(message.contains("udsconnect"), "{message}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    assert!(
        p.host.log().contains("not on the udsconnect allowlist"),
        "HOST logs the refusal\n{}",
        p.host.log()
    );
    assert!(
        p.dpu.log().contains("remote connect refused"),
        "DPU logs the refusal\n{}",
        p.dpu.log()
    );
    assert_eq!(counter(&p.dpu, "udsproxyd", "connections_refused"), 1);

    // The operator tool says why, with exit status 1.
    let out = p
        .dpu
        .sh("echo hi | $DPUCTL uds-connect /run/other/echo.sock");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Connection refused"),
        "{}",
        text(&out)
    );

    // Allowed live on the HOST: the next connection goes through.
    let out = p
        .host
        .run(&["qtcfg", "-w", "udsconnect", "-x", "/run/other"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = p
        .dpu
        .sh("printf 'hello through the proxy' | $DPUCTL uds-connect /run/other/echo.sock");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through the proxy"
    );

    // A missing socket on the far side keeps its errno.
    match connect(&p, SockType::Stream, "/run/allowed/none.sock") {
        Err(e) => assert_eq!(e.errno(), libc::ENOENT, "{e}"),
        Ok(_) => panic!("connected to a socket that does not exist"),
    }

    // Socket names are bytes, not text: one that is not UTF-8 is checked and reached as
    // any other, and a refusal names a directory the operator can allow.
    use std::os::unix::ffi::OsStrExt;
    let odd = |dir: &str| -> PathBuf {
        std::ffi::OsStr::from_bytes(&[dir.as_bytes(), b"/n\xffu.sock"].concat()).into()
    };
    let host_root = p.host.inside("/");
    echo_server(&host_root.join(odd("/run/allowed").strip_prefix("/").unwrap()));
    let req = p.dpu.request_socket(CONNECT);
    let c = connect_remote(&req, SockType::Stream, &odd("/run/allowed"), 0)
        .expect("a non-UTF-8 socket name under an allowed directory");
    let mut c = UnixStream::from(c);
    c.write_all(b"bytes").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"bytes");
    match connect_remote(&req, SockType::Stream, &odd("/run/denied"), 0) {
        Err(ConnectError::Refused { errno, message }) => {
            assert_eq!(errno, libc::ECONNREFUSED);
            assert!(
                message.contains("qtcfg -w udsconnect -x /run/denied"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }

    // Through the shim, connecting a socket that is connected already fails as locally.
    let Some(so) = shim() else {
        panic!("libudsproxy.so was not built: run `cargo build` at the workspace root");
    };
    echo_server(&p.host.inside("/run/allowed/echo.sock"));
    let script = p.scratch.write(
        "eisconn.py",
        "import socket\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.connect('/run/allowed/echo.sock')\n\
         try:\n    s.connect('/run/allowed/echo.sock')\n    print('connected twice')\n\
         except OSError as e:\n    print('errno', e.errno)\n",
    );
    let out = p
        .dpu
        .sh(&format!("LD_PRELOAD={} python3 {}", s(&so), s(&script)));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("errno {}", libc::EISCONN),
        "{}",
        text(&out)
    );
}

/// xorshift: deterministic sizes without a rand dependency.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

#[test]
fn thousand_concurrent_connections_no_loss_no_leak() {
    require_namespaces!();
    let p = start_pair();
    echo_server(&p.host.inside("/run/allowed/echo.sock"));
    let req = p.dpu.request_socket(CONNECT);
    // Warm up once so both daemons have every lazily created descriptor.
    drop(connect(&p, SockType::Stream, "/run/allowed/echo.sock").unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let (dpu_fds, host_fds) = (daemon_fds(&p.dpu), daemon_fds(&p.host));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let results: Vec<Result<(), String>> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..1000u64 {
            let req = req.clone();
            tasks.push(tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut next = rng(i + 1);
                let size = (next() % 200_000) as usize;
                let early_close = next() % 5 == 0;
                let fd = tokio::task::spawn_blocking(move || {
                    connect_remote(
                        &req,
                        SockType::Stream,
                        Path::new("/run/allowed/echo.sock"),
                        0,
                    )
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("connect {i}: {e}"))?;
                let std = std::os::unix::net::UnixStream::from(fd);
                std.set_nonblocking(true).map_err(|e| e.to_string())?;
                let c = tokio::net::UnixStream::from_std(std).map_err(|e| e.to_string())?;
                let data: Vec<u8> = (0..size).map(|_| next() as u8).collect();
                let (mut r, mut w) = c.into_split();
                if early_close {
                    // Write some, then go away without reading: the proxy must clean up.
                    let _ = w.write_all(&data[..size / 2]).await;
                    return Ok(());
                }
                let sent = data.clone();
                let writer = tokio::spawn(async move {
                    w.write_all(&sent).await?;
                    w.shutdown().await
                });
                let mut got = Vec::with_capacity(size);
                r.read_to_end(&mut got)
                    .await
                    .map_err(|e| format!("read {i}: {e}"))?;
                writer
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("write {i}: {e}"))?;
                if got != data {
                    return Err(format!(
                        "connection {i}: {} bytes back of {size}, or reordered",
                        got.len()
                    ));
                }
                Ok(())
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or_else(|e| Err(e.to_string())));
        }
        out
    });
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}\n{}",
        failures.len(),
        failures.first(),
        p.dpu.log()
    );

    // Everything closes; the daemons hold exactly the descriptors they held before.
    for (side, name) in [(&p.dpu, "udsproxyd"), (&p.host, "engine")] {
        side.wait_status("no live connections", Duration::from_secs(30), |st| {
            st["daemons"]
                .as_array()
                .and_then(|d| d.iter().find(|d| d["name"] == name))
                .is_some_and(|d| d["counters"]["connections_active"] == 0)
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = (daemon_fds(&p.dpu), daemon_fds(&p.host));
        if now == (dpu_fds, host_fds) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fd leak: before (dpu, host) = {:?}, after = {now:?}",
            (dpu_fds, host_fds)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(counter(&p.dpu, "udsproxyd", "connections_outbound"), 1001);
}

#[test]
fn peer_kill_ends_connections_and_new_ones_work_after_restart() {
    require_namespaces!();
    let mut p = start_pair();
    echo_server(&p.host.inside("/run/allowed/echo.sock"));
    let mut conns: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::from(connect(&p, SockType::Stream, "/run/allowed/echo.sock").unwrap()))
        .collect();
    for c in &mut conns {
        c.write_all(b"before").unwrap();
        let mut b = [0u8; 6];
        c.read_exact(&mut b).unwrap();
    }
    // Traffic in flight while the HOST dies.
    let mut pumper = conns.pop().unwrap();
    let traffic = std::thread::spawn(move || {
        let chunk = vec![1u8; 64 * 1024];
        let mut r = pumper.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        });
        while pumper.write_all(&chunk).is_ok() {}
        reader.join().unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = p.host.daemon_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    p.host.stop();

    // Existing connections end (EOF or error), the pumping one included.
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = [0u8; 16];
        match c.read(&mut b) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("{n} bytes from a dead peer"),
        }
    }
    traffic.join().unwrap();
    // While the peer is down a new connect is refused, not hung.
    let e = connect(&p, SockType::Stream, "/run/allowed/echo.sock").unwrap_err();
    assert_eq!(e.errno(), libc::ECONNREFUSED, "{e}");

    let args = host_args(&p);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    p.host = Side::start("host2", &p.scratch, &args);
    wait_connected(&p);
    echo_server(&p.host.inside("/run/allowed/echo.sock"));
    let mut c = UnixStream::from(
        connect(&p, SockType::Stream, "/run/allowed/echo.sock").expect("connect after restart"),
    );
    c.write_all(b"after").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"after");
}

/// The shim built beside the binary (plain `cargo build` builds it: it is a default member).
fn shim() -> Option<PathBuf> {
    let dir = common::bin().parent()?.to_path_buf();
    let so = dir.join("libudsproxy.so");
    if !so.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "udsproxy"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let _ = cmd.status();
    }
    so.exists().then_some(so)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn shim_lets_redis_cli_reach_a_host_redis() {
    require_namespaces!();
    if !have("redis-server") || !have("redis-cli") {
        eprintln!("SKIPPED shim_lets_redis_cli_reach_a_host_redis: redis-server/redis-cli are not installed (apt-get install -y redis-server redis-tools)");
        return;
    }
    let Some(so) = shim() else {
        panic!("libudsproxy.so was not built: run `cargo build` at the workspace root");
    };
    let p = start_pair();
    // redis-server inside the HOST's mount and pid namespaces: it dies with the side.
    let host_pid = p.host.daemon_pid().unwrap().to_string();
    let status = Command::new("nsenter")
        .args([
            "--target",
            &host_pid,
            "--mount",
            "--pid",
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            "/run/redis.sock",
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    common::wait_for_path(
        &p.host.inside("/run/redis.sock"),
        Duration::from_secs(10),
        || "redis-server did not start".into(),
    );
    let preload = format!("LD_PRELOAD={} ", s(&so));
    let out = p
        .dpu
        .sh(&format!("{preload}redis-cli -s /run/redis.sock ping"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "PONG",
        "{}",
        text(&out)
    );
    let out = p.dpu.sh(&format!("{preload}redis-cli -s /run/redis.sock set k v && {preload}redis-cli -s /run/redis.sock get k"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains('v'),
        "{}",
        text(&out)
    );
    // Paths the DPU does not route keep their local error; local sockets stay local.
    let out = p
        .dpu
        .sh(&format!("{preload}redis-cli -s /run/elsewhere.sock ping"));
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("No such file"),
        "{}",
        text(&out)
    );
    // Many clients at once through the shim (redis-benchmark uses non-blocking connects).
    if have("redis-benchmark") {
        let out = p.dpu.sh(&format!(
            "{preload}redis-benchmark -s /run/redis.sock -n 2000 -c 20 -t ping,get -q"
        ));
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("requests per second"),
            "{}",
            text(&out)
        );
    }
}

/// PostgreSQL's server programs (initdb, pg_ctl, postgres), from the Debian layout.
fn postgres_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|d| d.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

#[test]
fn shim_lets_psql_and_pgbench_reach_a_host_postgresql() {
    require_namespaces!();
    let Some(pg) = postgres_bin() else {
        eprintln!("SKIPPED shim_lets_psql_and_pgbench_reach_a_host_postgresql: PostgreSQL is not installed (apt-get install -y postgresql)");
        return;
    };
    if !have("runuser") {
        eprintln!("SKIPPED shim_lets_psql_and_pgbench_reach_a_host_postgresql: runuser (util-linux) is missing");
        return;
    }
    let Some(so) = shim() else {
        panic!("libudsproxy.so was not built: run `cargo build` at the workspace root");
    };
    let p = start_pair();
    // A throw-away cluster on the HOST side's private /run, reachable only through its socket
    // directory; it lives in the side's pid namespace and dies with it.
    let pg = s(&pg);
    let setup = format!(
        "set -e
        mkdir -p /run/pgdata /run/postgresql
        chown postgres /run/pgdata /run/postgresql
        runuser -u postgres -- {pg}/initdb -D /run/pgdata -A trust -U postgres >/dev/null
        runuser -u postgres -- {pg}/pg_ctl -D /run/pgdata -l /run/pgdata/server.log -w \\
            -o \"-c listen_addresses='' -c unix_socket_directories=/run/postgresql -c fsync=off\" start >/dev/null
        runuser -u postgres -- {pg}/createdb -h /run/postgresql bench
        runuser -u postgres -- {pg}/pgbench -h /run/postgresql -i -q -s 1 bench 2>/dev/null"
    );
    let host_pid = p.host.daemon_pid().unwrap().to_string();
    let out = Command::new("nsenter")
        .args([
            "--target", &host_pid, "--mount", "--pid", "sh", "-c", &setup,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PostgreSQL setup failed: {}",
        text(&out)
    );

    let preload = format!("LD_PRELOAD={} ", s(&so));
    let psql = "psql -h /run/postgresql -U postgres -d bench -At -c";
    let digest = "\"select count(*), sum(abalance), md5(string_agg(aid::text || ':' || abalance, ',' order by aid)) from pgbench_accounts\"";
    let direct = |what: &str| {
        let out = p.host.sh(&format!("{psql} {what}"));
        assert!(out.status.success(), "direct psql: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let proxied = |what: &str| {
        let out = p.dpu.sh(&format!("{preload}{psql} {what}"));
        assert!(
            out.status.success(),
            "psql through the shim: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The DPU has no PostgreSQL socket of its own: without the shim psql cannot connect.
    let out = p.dpu.sh(&format!("{psql} 'select 1'"));
    assert!(
        !out.status.success(),
        "psql reached a server without the shim: {}",
        text(&out)
    );

    assert_eq!(proxied("'select 1'"), "1");
    let before = direct(digest);
    assert!(before.starts_with("100000|0|"), "{before}");
    assert_eq!(proxied(digest), before);

    // Writes and reads from many clients through the shim; the HOST sees exactly the result.
    let out = p.dpu.sh(&format!(
        "{preload}pgbench -h /run/postgresql -U postgres -n -c 4 -j 2 -t 200 -N bench"
    ));
    let report = text(&out);
    assert!(
        out.status.success(),
        "pgbench -N through the shim: {report}"
    );
    assert!(
        report.contains("number of transactions actually processed: 800/800"),
        "{report}"
    );
    let after = direct(digest);
    assert_ne!(after, before, "pgbench's updates did not reach the HOST");
    assert_eq!(proxied(digest), after);
    let out = p.dpu.sh(&format!(
        "{preload}pgbench -h /run/postgresql -U postgres -n -S -c 8 -j 2 -T 2 bench"
    ));
    let report = text(&out);
    assert!(
        out.status.success(),
        "pgbench -S through the shim: {report}"
    );
    assert!(
        report.contains("number of failed transactions: 0"),
        "{report}"
    );
}

#[test]
fn rexec_reaches_the_host_rexec_server_through_udsproxyd() {
    require_namespaces!();
    let p = start_pair();
    // rexec_server on its default Unix socket, inside the HOST's namespaces.
    let host_pid = p.host.daemon_pid().unwrap().to_string();
    let mut server = Command::new("nsenter")
        .args(["--target", &host_pid, "--mount", "--pid"])
        .arg(common::bin())
        .args(["rexec_server", "--no-whitelist"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_path(
        &p.host.inside("/run/rexec/rexec_uds.sock"),
        Duration::from_secs(10),
        || "rexec_server did not start".into(),
    );
    // The DPU has no rexec_server: the client's connect fails locally and goes to udsproxyd.
    // The program runs on the HOST (its /run holds the server's socket).
    let o = p.dpu.sh(
        "echo through | $DPUCTL rexec /bin/sh -c 'cat; test -S /var/run/rexec/rexec_uds.sock && echo on-host; exit 7'; echo rc=$?",
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "through\non-host\nrc=7\n",
        "{}",
        text(&o)
    );
    // A megabyte each way keeps its bytes.
    let o = p.dpu.sh(
        "head -c 1048576 /dev/urandom > /tmp/rx.in; $DPUCTL rexec cat < /tmp/rx.in | cmp - /tmp/rx.in && echo same",
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("same"),
        "{}",
        text(&o)
    );
    // SIGTERM to the DPU-side client ends the HOST-side program.
    let o = p
        .dpu
        .sh("$DPUCTL rexec sleep 4343 & sleep 0.5; kill -TERM $!; wait $!; echo rc=$?");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("rc=143"),
        "{}",
        text(&o)
    );
    let left = p.host.wait_no_process("sleep 4343");
    assert!(left.trim().is_empty(), "sleep left on the HOST: {left}");
    // A directory this side does not route stays a local error, with what to do.
    let o = p
        .dpu
        .sh("REXEC_RUN_DIR=/run/elsewhere $DPUCTL rexec true; echo rc=$?");
    let out = text(&o);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("rc=255"),
        "{out}"
    );
    assert!(
        out.contains("qtcfg -w udsconnect -x /run/elsewhere"),
        "{out}"
    );
    let _ = server.kill();
    let _ = server.wait();
}
