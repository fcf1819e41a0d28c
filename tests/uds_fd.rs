//! fd passing (SCM_RIGHTS) over proxied stream connections, end to end: the engine (built-in
//! peer) on the HOST side and udsproxyd on the DPU side, each in its own mount+pid namespace
//! with a private /run, over 127.0.0.1 with a real key. The test process is the DPU-side
//! client (it reaches the DPU's request socket through /proc/PID/root) and runs small Unix
//! servers bound in the HOST's /run, so the only way between them is the proxy. Files for
//! the reopen tests live in a scratch directory under /tmp, a path both sides share.

mod common;

use std::io::{IoSlice, IoSliceMut, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{peer_state, s, Scratch, Side};
use dpuctl::uds::connect::connect_remote;
use dpuctl::uds::proto::SockType;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

const CONNECT: Duration = Duration::from_secs(15);

struct Pair {
    /// Holds the key, logs and shared files until the sides are gone.
    _scratch: Scratch,
    host: Side,
    dpu: Side,
    /// A directory on the HOST's `open` allowlist (shared path).
    shared: PathBuf,
    /// A directory on no allowlist.
    private: PathBuf,
}

/// HOST allows udsconnect `/run/allowed` and open `<scratch>/shared`.
fn start_pair() -> Pair {
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let shared = scratch.path("shared");
    let private = scratch.path("private");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(&private).unwrap();
    let uds_port = common::free_port().to_string();
    let host_wl = scratch.write(
        "host-whitelist",
        &format!(
            "[Mount]\nPath=/tmp\n[Open]\nPath={}\n[Udsconnect]\nPath=/run/allowed\n",
            s(&shared)
        ),
    );
    let dpu_wl = scratch.write("dpu-whitelist", "[Udsconnect]\nPath=/run/allowed\n");
    let fs_listen = format!("tcp://127.0.0.1:{}", common::free_port());
    let uds_listen = format!("tcp://127.0.0.1:{uds_port}");
    let host = Side::start(
        "host",
        &scratch,
        &[
            "engine",
            "--listen",
            &fs_listen,
            "--uds-listen",
            &uds_listen,
            "--key",
            s(&key),
            "--whitelist",
            s(&host_wl),
            "--log-level",
            "info,dpuctl::uds=debug",
        ],
    );
    let dpu = Side::start(
        "dpu",
        &scratch,
        &[
            "udsproxyd",
            "--listen",
            "",
            "--peer",
            &uds_listen,
            "--key",
            s(&key),
            "--whitelist",
            s(&dpu_wl),
            "--log-level",
            "info,dpuctl::uds=debug",
        ],
    );
    dpu.wait_status("udsproxyd connected", CONNECT, |st| {
        peer_state(st, "udsproxyd").as_deref() == Some("connected")
    });
    Pair {
        _scratch: scratch,
        host,
        dpu,
        shared,
        private,
    }
}

/// Binds a HOST-side server at `/run/allowed/<name>` running `handler` per connection.
fn serve(p: &Pair, name: &str, handler: fn(UnixStream)) -> String {
    let remote = format!("/run/allowed/{name}");
    let path = p.host.inside(&remote);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).expect("bind test server");
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            std::thread::spawn(move || handler(c));
        }
    });
    remote
}

fn connect(p: &Pair, remote: &str) -> UnixStream {
    let fd = connect_remote(
        &p.dpu.request_socket(CONNECT),
        SockType::Stream,
        Path::new(remote),
        0,
    )
    .expect("proxied connect");
    let c = UnixStream::from(fd);
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c
}

/// `sendmsg` of `data` with `fds` attached.
fn send_fds(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::empty(),
        None,
    )
}

/// `recvmsg` into `buf`: the byte count and the descriptors that came with them.
fn recv_fds(sock: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(v) = c {
            // SAFETY: the kernel just installed these descriptors for us; nothing else owns them.
            fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    Ok((msg.bytes, fds))
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (std::fs::File::from(r), std::fs::File::from(w))
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

/// Server: takes a pipe write end with the byte `W`, writes into it and closes it; then
/// passes back the read end of its own pipe with the byte `B` and fills that pipe.
fn write_into_passed_pipe(c: UnixStream) {
    let mut buf = [0u8; 16];
    let Ok((n, mut fds)) = recv_fds(&c, &mut buf) else {
        return;
    };
    if n != 1 || buf[0] != b'W' || fds.len() != 1 {
        let _ = (&c).write_all(format!("bad: {n} bytes, {} fds", fds.len()).as_bytes());
        return;
    }
    let mut w = std::fs::File::from(fds.remove(0));
    w.write_all(b"hello from the host").unwrap();
    drop(w);
    // And back: the DPU-side client gets a read end of a HOST pipe.
    let (r, mut w) = pipe();
    send_fds(&c, b"B", &[r.as_raw_fd()]).unwrap();
    drop(r);
    w.write_all(b"host pipe data").unwrap();
    drop(w);
    let _ = (&c).read(&mut buf);
}

#[test]
fn passed_pipe_write_end_carries_bytes_and_eof_both_ways() {
    require_namespaces!();
    let p = start_pair();
    let remote = serve(&p, "w.sock", write_into_passed_pipe);
    let c = connect(&p, &remote);
    let (mut r, w) = pipe();
    send_fds(&c, b"W", &[w.as_raw_fd()]).unwrap();
    drop(w);
    let mut got = String::new();
    r.read_to_string(&mut got).expect("read the pipe to EOF");
    assert_eq!(got, "hello from the host", "{}", p.dpu.log());

    // The reverse: a HOST server passes a pipe read end back to the DPU client.
    let mut buf = [0u8; 16];
    let (n, mut fds) = recv_fds(&c, &mut buf).unwrap();
    assert_eq!((n, buf[0], fds.len()), (1, b'B', 1), "{}", p.host.log());
    let mut back = std::fs::File::from(fds.remove(0));
    let mut got = String::new();
    back.read_to_string(&mut got).unwrap();
    assert_eq!(got, "host pipe data");
    assert!(counter(&p.dpu, "udsproxyd", "fds_passed") >= 1);
    assert!(counter(&p.dpu, "udsproxyd", "fds_received") >= 1);
}

/// Server: takes a pipe read end with the byte `R`, reads it to EOF and answers with what
/// it read on the connection.
fn read_from_passed_pipe(c: UnixStream) {
    let mut buf = [0u8; 16];
    let Ok((n, mut fds)) = recv_fds(&c, &mut buf) else {
        return;
    };
    if n != 1 || fds.len() != 1 {
        return;
    }
    let mut r = std::fs::File::from(fds.remove(0));
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    (&c).write_all(&got).unwrap();
    let _ = c.shutdown(std::net::Shutdown::Write);
}

#[test]
fn passed_pipe_read_end_carries_bytes_then_eof() {
    require_namespaces!();
    let p = start_pair();
    let remote = serve(&p, "r.sock", read_from_passed_pipe);
    let mut c = connect(&p, &remote);
    let (r, mut w) = pipe();
    send_fds(&c, b"R", &[r.as_raw_fd()]).unwrap();
    drop(r);
    // More than a pipe and a window hold, so flow control is exercised on the pipe stream.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        // Closing the only write end: the HOST reader sees EOF.
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), data.len(), "{}", p.host.log());
    assert!(got == data, "pipe bytes lost or reordered");
}

/// Server: takes a file with one byte, reports its offset and reads the rest, or writes
/// `XY` at its offset when it is write-only.
fn use_passed_file(c: UnixStream) {
    let mut buf = [0u8; 16];
    let Ok((n, mut fds)) = recv_fds(&c, &mut buf) else {
        return;
    };
    if n != 1 || fds.len() != 1 {
        return;
    }
    let mut f = std::fs::File::from(fds.remove(0));
    let at = f.stream_position().unwrap();
    let mode = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETFL).unwrap() & libc::O_ACCMODE;
    let report = if mode == libc::O_WRONLY {
        f.write_all(b"XY").unwrap();
        format!("wrote at {at}")
    } else {
        let mut rest = String::new();
        f.read_to_string(&mut rest).unwrap();
        format!("at {at}: {rest}")
    };
    (&c).write_all(report.as_bytes()).unwrap();
    let _ = c.shutdown(std::net::Shutdown::Write);
}

#[test]
fn passed_regular_file_is_reopened_at_the_same_offset_and_mode() {
    require_namespaces!();
    let p = start_pair();
    let remote = serve(&p, "f.sock", use_passed_file);
    let path = p.shared.join("data.txt");
    std::fs::write(&path, "0123456789").unwrap();

    let mut f = std::fs::File::open(&path).unwrap();
    f.seek(SeekFrom::Start(4)).unwrap();
    let mut c = connect(&p, &remote);
    send_fds(&c, b"F", &[f.as_raw_fd()]).unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, "at 4: 456789", "{}\n{}", p.host.log(), p.dpu.log());

    // Write-only keeps its mode: the server writes at the passed offset.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(2)).unwrap();
    let mut c = connect(&p, &remote);
    send_fds(&c, b"F", &[f.as_raw_fd()]).unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, "wrote at 2");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "01XY456789");
}

/// Server: records what arrives (bytes, descriptors) until the connection ends.
fn record(c: UnixStream) {
    let mut buf = [0u8; 64];
    let mut total = 0;
    let mut fds = 0;
    loop {
        match recv_fds(&c, &mut buf) {
            Ok((0, _)) | Err(_) => break,
            Ok((n, f)) => {
                total += n;
                fds += f.len();
            }
        }
    }
    RECORDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((total, fds));
}

/// What each `record` connection received: (bytes, descriptors).
static RECORDS: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// Sends `fd` with one byte, then checks that the connection is ended (EOF or reset).
fn expect_refused(p: &Pair, remote: &str, fd: RawFd) {
    let c = connect(p, remote);
    send_fds(&c, b"X", &[fd]).unwrap();
    let mut buf = [0u8; 16];
    match (&c).read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
        other => panic!("expected the connection to end, got {other:?}"),
    }
}

#[test]
fn sockets_eventfds_and_unlisted_files_are_refused_with_a_clear_error() {
    require_namespaces!();
    let p = start_pair();
    let remote = serve(&p, "x.sock", record);

    let (a, _b) = UnixStream::pair().unwrap();
    expect_refused(&p, &remote, a.as_raw_fd());
    // SAFETY: eventfd(2) with valid flags; the new descriptor is owned by `ev` alone.
    let ev = unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
    assert!(ev.as_raw_fd() >= 0);
    expect_refused(&p, &remote, ev.as_raw_fd());
    let outside = p.private.join("secret.txt");
    std::fs::write(&outside, "secret").unwrap();
    let f = std::fs::File::open(&outside).unwrap();
    expect_refused(&p, &remote, f.as_raw_fd());
    // A deleted file has no path to reopen.
    let gone = p.shared.join("gone.txt");
    std::fs::write(&gone, "x").unwrap();
    let g = std::fs::File::open(&gone).unwrap();
    std::fs::remove_file(&gone).unwrap();
    expect_refused(&p, &remote, g.as_raw_fd());

    let deadline = Instant::now() + CONNECT;
    let log = loop {
        let log = p.dpu.log();
        if log.matches("descriptor passing refused").count() >= 4 || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for needle in [
        "a socket (socket:[",
        "an anonymous inode (anon_inode:[eventfd])",
        "is not on the open allowlist of the receiving side",
        "(deleted)",
        "(EOPNOTSUPP)",
    ] {
        assert!(log.contains(needle), "DPU log lacks {needle:?}:\n{log}");
    }
    assert!(
        p.host
            .log()
            .contains("passed descriptor refused on this side"),
        "HOST logs its refusal\n{}",
        p.host.log()
    );
    assert_eq!(counter(&p.dpu, "udsproxyd", "fds_refused"), 4);
    assert_eq!(counter(&p.dpu, "udsproxyd", "fds_passed"), 0);
    // No byte that carried a refused descriptor reached the server.
    let deadline = Instant::now() + CONNECT;
    loop {
        let records = RECORDS.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if records.len() == 4 {
            assert!(records.iter().all(|r| *r == (0, 0)), "{records:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server saw {records:?}, not 4 ended connections"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Server: passes the read end of a pipe the moment it accepts, before reading anything.
fn pass_at_once(c: UnixStream) {
    let (r, mut w) = pipe();
    if send_fds(&c, b"P", &[r.as_raw_fd()]).is_err() {
        return;
    }
    drop(r);
    let _ = w.write_all(b"at once");
}

#[test]
fn server_passing_right_after_accept_reaches_the_client() {
    require_namespaces!();
    let p = start_pair();
    let remote = serve(&p, "now.sock", pass_at_once);
    // The attach races the opening side's registration of the connection: repeat.
    for i in 0..20 {
        let c = connect(&p, &remote);
        let mut buf = [0u8; 4];
        let (n, fds) = recv_fds(&c, &mut buf).unwrap_or_else(|e| panic!("round {i}: {e}"));
        assert_eq!((n, fds.len()), (1, 1), "round {i}\n{}", p.host.log());
        let mut got = String::new();
        std::fs::File::from(fds.into_iter().next().unwrap())
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "at once");
    }
}

#[test]
fn hundred_pipe_passes_leak_no_descriptor() {
    require_namespaces!();
    let p = start_pair();
    let remote = serve(&p, "w.sock", write_into_passed_pipe);
    let once = || {
        let c = connect(&p, &remote);
        let (mut r, w) = pipe();
        send_fds(&c, b"W", &[w.as_raw_fd()]).unwrap();
        drop(w);
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello from the host");
        let mut buf = [0u8; 4];
        let (_, fds) = recv_fds(&c, &mut buf).unwrap();
        let mut back = std::fs::File::from(fds.into_iter().next().expect("a passed fd"));
        let mut got = String::new();
        back.read_to_string(&mut got).unwrap();
        assert_eq!(got, "host pipe data");
    };
    // Warm up so both daemons hold every lazily created descriptor.
    once();
    std::thread::sleep(Duration::from_millis(300));
    let before = (daemon_fds(&p.dpu), daemon_fds(&p.host));
    for _ in 0..100 {
        once();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = (daemon_fds(&p.dpu), daemon_fds(&p.host));
        let pipes = (
            counter(&p.dpu, "udsproxyd", "pipes_active"),
            counter(&p.host, "engine", "pipes_active"),
        );
        if now == before && pipes == (0, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fd leak: before (dpu, host) = {before:?}, after = {now:?}, pipes active {pipes:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(counter(&p.dpu, "udsproxyd", "fds_passed"), 101);
    assert_eq!(counter(&p.host, "engine", "fds_passed"), 101);
}
