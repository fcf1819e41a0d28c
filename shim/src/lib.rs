//! `libudsproxy.so`: an `LD_PRELOAD` shim that makes Unix sockets bound on the peer machine
//! reachable by unmodified programs.
//!
//! Only `connect(2)` is interposed. It calls the real `connect` first; when that fails with
//! ENOENT or ECONNREFUSED for an absolute `AF_UNIX` path, it asks the local udsproxyd (request
//! socket `$UDSPROXY_REQUEST_SOCKET`, default `/var/run/qtfs/remote_uds.sock`) to connect to
//! the same path on the peer, flagged as a *fallback*: udsproxyd routes it only when the path
//! is on this machine's `udsconnect` allowlist, so every other failing connect keeps its
//! own errno. On success the proxied socket replaces the caller's descriptor with `dup2`,
//! keeping its number, `O_NONBLOCK` and `FD_CLOEXEC`, and `connect` returns 0 (also for
//! non-blocking sockets: the short exchange with the local udsproxyd is done blocking).
//! A refusal from the far side returns its errno (ECONNREFUSED when its allowlist denies).
//! Stream sockets get the request connection itself as their data path; dgram and seqpacket
//! sockets get a `SOCK_SEQPACKET` socket (passed with SCM_RIGHTS) that keeps message
//! boundaries. The request/reply bytes are those of `src/uds/proto.rs` in dpuctl.
//!
//! Concurrency: no state besides the cached address of the real `connect`, an atomic. Every
//! call is independent, so any thread may connect at any time. The code never panics and
//! never allocates on the fallback path (fixed buffers on the stack).

use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{c_int, c_void, sockaddr, sockaddr_un, socklen_t};

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;

/// Address of the next `connect` in the lookup order (libc's), 0 until looked up.
static REAL_CONNECT: AtomicUsize = AtomicUsize::new(0);

const DEFAULT_REQUEST_SOCKET: &[u8] = b"/var/run/qtfs/remote_uds.sock";
const REQUEST_MAGIC: &[u8; 4] = b"UDSP";
const REPLY_MAGIC: &[u8; 4] = b"UDSR";
const REQUEST_VERSION: u8 = 1;
const FLAG_FALLBACK: u8 = 1;
const REPLY_HEADER: usize = 12;
const STATUS_OK: u8 = 0;
const STATUS_NOT_ROUTED: u8 = 2;
/// `sun_path` capacity.
const SUN_PATH: usize = 108;

fn errno() -> c_int {
    // SAFETY: __errno_location always returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e }
}

fn real_connect() -> Option<ConnectFn> {
    let mut p = REAL_CONNECT.load(Ordering::Relaxed);
    if p == 0 {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT finds libc's connect.
        p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"connect".as_ptr()) } as usize;
        REAL_CONNECT.store(p, Ordering::Relaxed);
    }
    if p == 0 {
        None
    } else {
        // SAFETY: p is the address of libc's `connect`, which has exactly this signature.
        Some(unsafe { std::mem::transmute::<usize, ConnectFn>(p) })
    }
}

/// The interposed `connect(2)`.
///
/// # Safety
/// Same contract as `connect(2)`: `addr` points at `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(real) = real_connect() else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    let r = real(fd, addr, len);
    if r == 0 {
        return 0;
    }
    let err = errno();
    if err != libc::ENOENT && err != libc::ECONNREFUSED {
        return r;
    }
    match fallback(real, fd, addr, len) {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e.unwrap_or(err));
            -1
        }
    }
}

/// `Err(None)`: not ours, keep the original errno; `Err(Some(e))`: fail with `e`.
unsafe fn fallback(
    real: ConnectFn,
    fd: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> Result<(), Option<c_int>> {
    if addr.is_null() || (len as usize) <= std::mem::size_of::<libc::sa_family_t>() {
        return Err(None);
    }
    if c_int::from((*addr).sa_family) != libc::AF_UNIX {
        return Err(None);
    }
    // The path: sun_path up to the first NUL or the given length.
    let un = addr.cast::<sockaddr_un>();
    let max = (len as usize - std::mem::size_of::<libc::sa_family_t>()).min(SUN_PATH);
    let raw = std::slice::from_raw_parts((*un).sun_path.as_ptr().cast::<u8>(), max);
    let path = match raw.iter().position(|&b| b == 0) {
        Some(n) => &raw[..n],
        None => raw,
    };
    // Relative and abstract (leading NUL, so empty here) names are not proxied.
    if path.first() != Some(&b'/') {
        return Err(None);
    }
    let kind: u8 = match sock_type(fd) {
        Some(libc::SOCK_STREAM) => 1,
        Some(libc::SOCK_DGRAM) => 2,
        Some(libc::SOCK_SEQPACKET) => 3,
        _ => return Err(None),
    };
    let mut req_path = [0u8; SUN_PATH];
    let req_len = request_socket(&mut req_path);
    if req_len == 0 || path == &req_path[..req_len] {
        return Err(None);
    }
    // The kernel looks a Unix path up before it checks the socket's state, so a connected
    // socket (proxied before, say) gets ENOENT for a missing path: locally that is EISCONN.
    if is_connected(fd) {
        return Err(Some(libc::EISCONN));
    }
    let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
    if s < 0 {
        return Err(None);
    }
    let result = exchange(real, s, &req_path[..req_len], kind, path);
    let newfd = match result {
        Ok(Some(passed)) => {
            libc::close(s);
            passed
        }
        Ok(None) => s,
        Err(e) => {
            libc::close(s);
            return Err(e);
        }
    };
    splice(newfd, fd)
}

/// True when `fd` has a peer already.
fn is_connected(fd: c_int) -> bool {
    // SAFETY: a zeroed sockaddr_storage is a valid out-buffer of the given length.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
    // SAFETY: valid out pointers of the stated size.
    unsafe {
        libc::getpeername(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) == 0
    }
}

fn sock_type(fd: c_int) -> Option<c_int> {
    let mut ty: c_int = 0;
    let mut l = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: ty and l are valid for writes of their sizes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut c_int).cast::<c_void>(),
            &mut l,
        )
    };
    (r == 0).then_some(ty)
}

/// Copies the request socket path into `out`; returns its length (0 if unusable).
fn request_socket(out: &mut [u8; SUN_PATH]) -> usize {
    // SAFETY: getenv returns NULL or a NUL-terminated string owned by the environment.
    let env = unsafe { libc::getenv(c"UDSPROXY_REQUEST_SOCKET".as_ptr()) };
    let src: &[u8] = if env.is_null() {
        DEFAULT_REQUEST_SOCKET
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { std::ffi::CStr::from_ptr(env) }.to_bytes()
    };
    if src.is_empty() || src.len() >= SUN_PATH {
        return 0;
    }
    out[..src.len()].copy_from_slice(src);
    src.len()
}

/// Asks udsproxyd on `s`. `Ok(None)`: `s` is the data path; `Ok(Some(fd))`: `fd` is.
unsafe fn exchange(
    real: ConnectFn,
    s: c_int,
    req_path: &[u8],
    kind: u8,
    path: &[u8],
) -> Result<Option<c_int>, Option<c_int>> {
    let mut sa: sockaddr_un = std::mem::zeroed();
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in sa.sun_path.iter_mut().zip(req_path) {
        *d = *b as libc::c_char;
    }
    let sa_len = (std::mem::size_of::<libc::sa_family_t>() + req_path.len() + 1) as socklen_t;
    if real(s, (&sa as *const sockaddr_un).cast::<sockaddr>(), sa_len) != 0 {
        return Err(None); // no udsproxyd here: the caller keeps its own error
    }
    // Request: magic, version, type, flags, reserved, u16 length, path.
    let mut req = [0u8; 10 + SUN_PATH];
    req[..4].copy_from_slice(REQUEST_MAGIC);
    req[4] = REQUEST_VERSION;
    req[5] = kind;
    req[6] = FLAG_FALLBACK;
    req[8..10].copy_from_slice(&(path.len() as u16).to_be_bytes());
    req[10..10 + path.len()].copy_from_slice(path);
    if !write_all(s, &req[..10 + path.len()]) {
        return Err(None);
    }
    // Reply: magic, status, reserved, u16 message length, i32 errno, message.
    let mut head = [0u8; REPLY_HEADER];
    let mut passed: c_int = -1;
    let mut got = 0;
    while got < REPLY_HEADER {
        match recv_with_fd(s, &mut head[got..], &mut passed) {
            Some(n) if n > 0 => got += n,
            _ => {
                close_fd(passed);
                return Err(None);
            }
        }
    }
    let mut msg_len = usize::from(u16::from_be_bytes([head[6], head[7]]));
    let mut sink = [0u8; 256];
    while msg_len > 0 {
        let want = msg_len.min(sink.len());
        let n = libc::read(s, sink.as_mut_ptr().cast::<c_void>(), want);
        if n <= 0 {
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            break;
        }
        msg_len -= n as usize;
    }
    if &head[..4] != REPLY_MAGIC {
        close_fd(passed);
        return Err(None);
    }
    match head[4] {
        STATUS_OK if kind == 1 => {
            close_fd(passed);
            Ok(None)
        }
        STATUS_OK if passed >= 0 => Ok(Some(passed)),
        STATUS_OK => Err(Some(libc::EPROTO)),
        STATUS_NOT_ROUTED => {
            close_fd(passed);
            Err(None)
        }
        _ => {
            close_fd(passed);
            let e = i32::from_be_bytes([head[8], head[9], head[10], head[11]]);
            Err(Some(if e > 0 { e } else { libc::ECONNREFUSED }))
        }
    }
}

fn close_fd(fd: c_int) {
    if fd >= 0 {
        // SAFETY: fd is a descriptor this shim received and owns.
        unsafe { libc::close(fd) };
    }
}

fn write_all(s: c_int, mut b: &[u8]) -> bool {
    while !b.is_empty() {
        // SAFETY: b is valid for reads of its length.
        let n = unsafe { libc::send(s, b.as_ptr().cast::<c_void>(), b.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        b = &b[n as usize..];
    }
    true
}

/// One `recvmsg`; a passed descriptor lands in `passed` (extra ones are closed).
fn recv_with_fd(s: c_int, buf: &mut [u8], passed: &mut c_int) -> Option<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    loop {
        // SAFETY: a zeroed msghdr is valid; iov and control point at live local buffers of
        // the given sizes; the CMSG macros stay within msg_controllen.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast::<c_void>();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(s, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                return None;
            }
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<c_int>();
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<c_int>();
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        if *passed < 0 {
                            *passed = fd;
                        } else {
                            libc::close(fd);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            return Some(n as usize);
        }
    }
}

/// Puts `newfd` in place of `fd`, keeping `fd`'s O_NONBLOCK and FD_CLOEXEC, and closes `newfd`.
unsafe fn splice(newfd: c_int, fd: c_int) -> Result<(), Option<c_int>> {
    let status = libc::fcntl(fd, libc::F_GETFL);
    let fdflags = libc::fcntl(fd, libc::F_GETFD);
    if libc::dup2(newfd, fd) < 0 {
        let e = errno();
        libc::close(newfd);
        return Err(Some(e));
    }
    libc::close(newfd);
    if status >= 0 {
        let now = libc::fcntl(fd, libc::F_GETFL);
        if now >= 0 {
            libc::fcntl(
                fd,
                libc::F_SETFL,
                (now & !libc::O_NONBLOCK) | (status & libc::O_NONBLOCK),
            );
        }
    }
    if fdflags >= 0 {
        libc::fcntl(fd, libc::F_SETFD, fdflags);
    }
    Ok(())
}
