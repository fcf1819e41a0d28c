//! POSIX behaviour through a real qtfs FUSE mount (engine executor + client in-process),
//! compared against the same operations on a plain local directory.

#[path = "fs_common/mod.rs"]
mod common;

use common::{code, setup, setup_opts, setup_with};
use dpuctl::allowlist::ListType;
use dpuctl::fs::client::ClientOptions;
use dpuctl::fs::server::StaticPolicy;
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// Default options, `writeback` and `direct_io`: the three ways the DPU kernel caches data.
fn cache_modes() -> [ClientOptions; 3] {
    [
        ClientOptions::default(),
        ClientOptions {
            writeback: true,
            ..ClientOptions::default()
        },
        ClientOptions {
            direct_io: true,
            ..ClientOptions::default()
        },
    ]
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno_of(r: libc::c_int) -> i32 {
    if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    }
}

fn renameat2(a: &Path, b: &Path, flags: u32) -> i32 {
    let (a, b) = (c(a), c(b));
    // SAFETY: valid C strings.
    errno_of(unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    } as i32)
}

/// Runs the same sequence of operations in `d` and records every result.
fn transcript(d: &Path) -> Vec<String> {
    let mut t = Vec::new();
    let mut log = |k: &str, v: String| t.push(format!("{k}: {v}"));
    // create / write / read / append / truncate
    let f = d.join("a");
    fs::write(&f, b"hello world").unwrap();
    log("read", String::from_utf8(fs::read(&f).unwrap()).unwrap());
    let mut ap = OpenOptions::new().append(true).open(&f).unwrap();
    ap.write_all(b"!!").unwrap();
    drop(ap);
    log("append", String::from_utf8(fs::read(&f).unwrap()).unwrap());
    OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(5)
        .unwrap();
    log(
        "truncate",
        String::from_utf8(fs::read(&f).unwrap()).unwrap(),
    );
    let tr = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&f)
        .unwrap();
    log("o_trunc", tr.metadata().unwrap().len().to_string());
    drop(tr);
    fs::write(&f, b"0123456789").unwrap();
    let mut rw = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    rw.seek(SeekFrom::Start(3)).unwrap();
    rw.write_all(b"XY").unwrap();
    let mut s = String::new();
    rw.seek(SeekFrom::Start(0)).unwrap();
    rw.read_to_string(&mut s).unwrap();
    log("pwrite", s);
    // O_EXCL
    log(
        "excl",
        code(OpenOptions::new().write(true).create_new(true).open(&f)).to_string(),
    );
    log(
        "excl_new",
        code(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(d.join("b")),
        )
        .to_string(),
    );
    log(
        "mode_b",
        format!("{:o}", fs::metadata(d.join("b")).unwrap().mode() & 0o7777),
    );
    // errnos
    log("enoent", code(fs::read(d.join("missing"))).to_string());
    fs::create_dir(d.join("dir")).unwrap();
    fs::write(d.join("dir/x"), b"x").unwrap();
    log(
        "eexist_dir",
        code(fs::create_dir(d.join("dir"))).to_string(),
    );
    log("enotempty", code(fs::remove_dir(d.join("dir"))).to_string());
    log("enotdir", code(fs::read_dir(d.join("a"))).to_string());
    log("eisdir", code(fs::remove_file(d.join("dir"))).to_string());
    // rename flags
    log(
        "noreplace",
        renameat2(&d.join("a"), &d.join("b"), libc::RENAME_NOREPLACE).to_string(),
    );
    log(
        "exchange",
        renameat2(&d.join("a"), &d.join("b"), libc::RENAME_EXCHANGE).to_string(),
    );
    log(
        "after_exchange",
        format!("{}", fs::metadata(d.join("b")).unwrap().len()),
    );
    log(
        "rename",
        code(fs::rename(d.join("b"), d.join("c"))).to_string(),
    );
    log("rename_gone", code(fs::metadata(d.join("b"))).to_string());
    // symlink / readlink / link
    std::os::unix::fs::symlink("c", d.join("sl")).unwrap();
    log(
        "readlink",
        fs::read_link(d.join("sl")).unwrap().display().to_string(),
    );
    log(
        "via_link",
        fs::read(d.join("sl")).unwrap().len().to_string(),
    );
    log(
        "lstat_link",
        fs::symlink_metadata(d.join("sl"))
            .unwrap()
            .file_type()
            .is_symlink()
            .to_string(),
    );
    fs::hard_link(d.join("c"), d.join("hl")).unwrap();
    log(
        "nlink",
        fs::metadata(d.join("c")).unwrap().nlink().to_string(),
    );
    log(
        "same_ino",
        (fs::metadata(d.join("c")).unwrap().ino() == fs::metadata(d.join("hl")).unwrap().ino())
            .to_string(),
    );
    // mknod fifo
    nix::unistd::mkfifo(
        &d.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    log(
        "fifo",
        fs::symlink_metadata(d.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo_like()
            .to_string(),
    );
    // chmod / chown / utimens
    fs::set_permissions(d.join("c"), fs::Permissions::from_mode(0o4751)).unwrap();
    log(
        "chmod",
        format!("{:o}", fs::metadata(d.join("c")).unwrap().mode() & 0o7777),
    );
    std::os::unix::fs::chown(d.join("c"), Some(1234), Some(5678)).unwrap();
    let m = fs::metadata(d.join("c")).unwrap();
    log("chown", format!("{}:{}", m.uid(), m.gid()));
    let p = c(&d.join("c"));
    let times = [
        libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 5,
        },
        libc::timespec {
            tv_sec: 2_000_000,
            tv_nsec: 7,
        },
    ];
    // SAFETY: valid C string and timespec array.
    log(
        "utimens",
        errno_of(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })
            .to_string(),
    );
    let m = fs::metadata(d.join("c")).unwrap();
    log(
        "times",
        format!(
            "{}.{} {}.{}",
            m.atime(),
            m.atime_nsec(),
            m.mtime(),
            m.mtime_nsec()
        ),
    );
    let omit_now = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: as above.
    unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), omit_now.as_ptr(), 0) };
    let m = fs::metadata(d.join("c")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    log(
        "omit_keeps_atime",
        format!("{}.{}", m.atime(), m.atime_nsec()),
    );
    log("now_sets_mtime", ((m.mtime() - now).abs() < 5).to_string());
    // xattrs
    let x = c(&d.join("c"));
    // SAFETY: valid C strings and buffers.
    unsafe {
        log(
            "setxattr",
            errno_of(libc::setxattr(
                x.as_ptr(),
                c"user.k".as_ptr(),
                b"v1".as_ptr().cast(),
                2,
                0,
            ))
            .to_string(),
        );
        log(
            "setxattr_create_dup",
            errno_of(libc::setxattr(
                x.as_ptr(),
                c"user.k".as_ptr(),
                b"v".as_ptr().cast(),
                1,
                libc::XATTR_CREATE,
            ))
            .to_string(),
        );
        let mut buf = [0u8; 16];
        let n = libc::getxattr(
            x.as_ptr(),
            c"user.k".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        );
        log(
            "getxattr",
            String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned(),
        );
        log(
            "getxattr_size",
            libc::getxattr(x.as_ptr(), c"user.k".as_ptr(), std::ptr::null_mut(), 0).to_string(),
        );
        let r = libc::getxattr(x.as_ptr(), c"user.k".as_ptr(), buf.as_mut_ptr().cast(), 1);
        log("getxattr_erange", errno_of(r as i32).to_string());
        let n = libc::listxattr(x.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        log(
            "listxattr",
            String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned(),
        );
        log(
            "removexattr",
            errno_of(libc::removexattr(x.as_ptr(), c"user.k".as_ptr())).to_string(),
        );
        let r = libc::getxattr(
            x.as_ptr(),
            c"user.k".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        );
        log("getxattr_gone", errno_of(r as i32).to_string());
    }
    // fallocate + SEEK_DATA/SEEK_HOLE
    let sp = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(d.join("sparse"))
        .unwrap();
    sp.set_len(4 << 20).unwrap();
    // SAFETY: plain syscalls on an owned fd.
    unsafe {
        log(
            "fallocate",
            errno_of(libc::fallocate(sp.as_raw_fd(), 0, 1 << 20, 1 << 20)).to_string(),
        );
        log(
            "seek_data",
            libc::lseek(sp.as_raw_fd(), 0, libc::SEEK_DATA).to_string(),
        );
        log(
            "seek_hole",
            libc::lseek(sp.as_raw_fd(), 1 << 20, libc::SEEK_HOLE).to_string(),
        );
    }
    log(
        "alloc_blocks",
        (fs::metadata(d.join("sparse")).unwrap().blocks() >= 2048).to_string(),
    );
    // statfs works
    let st = nix::sys::statvfs::statvfs(d).unwrap();
    log(
        "statfs",
        (st.blocks() > 0 && st.name_max() == 255).to_string(),
    );
    // readdir
    let mut names: Vec<String> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    log("readdir", names.join(","));
    // unlink / rmdir
    log("unlink", code(fs::remove_file(d.join("dir/x"))).to_string());
    log("rmdir", code(fs::remove_dir(d.join("dir"))).to_string());
    log("rmdir_gone", code(fs::metadata(d.join("dir"))).to_string());
    t
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn posix_ops_match_a_local_directory() {
    let Some(fx) = setup() else { return };
    let local = tempfile::tempdir().unwrap();
    let want = transcript(local.path());
    let got = transcript(&fx.mnt());
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w, g);
    }
    assert_eq!(want.len(), got.len());
    // The files really are on the HOST side.
    assert_eq!(
        fs::read_link(fx.export().join("sl")).unwrap(),
        Path::new("c")
    );
}

#[test]
fn large_file_round_trips_bit_exact() {
    let Some(fx) = setup() else { return };
    let mut data = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let want = Sha256::digest(&data);
    let start = Instant::now();
    fs::write(fx.mnt().join("big"), &data).unwrap();
    let wrote = start.elapsed();
    assert_eq!(
        Sha256::digest(fs::read(fx.export().join("big")).unwrap()),
        want
    );
    let start = Instant::now();
    assert_eq!(
        Sha256::digest(fs::read(fx.mnt().join("big")).unwrap()),
        want
    );
    eprintln!("64 MiB: write {wrote:?}, read {:?}", start.elapsed());
}

#[test]
fn readdir_of_ten_thousand_entries() {
    let Some(fx) = setup() else { return };
    let dir = fx.export().join("many");
    fs::create_dir(&dir).unwrap();
    for i in 0..10_000 {
        File::create(dir.join(format!("f{i:05}"))).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(fx.mnt().join("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 10_000);
    assert_eq!(names[0], "f00000");
    assert_eq!(names[9_999], "f09999");
}

/// Drops the kernel's dentry cache (which sends FORGETs) and waits until the engine holds at
/// most a handful of nodes.
/// Every entry of a listing (with attributes) is a lookup the kernel later forgets, whether
/// the engine already had the node (made through the mount, listed before) or opens it for
/// the listing; hard links share one node. Once the kernel lets go, no node is held.
#[test]
fn listings_count_lookups_on_known_and_new_nodes_alike() {
    let Some(fx) = setup() else { return };
    for i in 0..50 {
        fs::write(fx.mnt().join(format!("made_here{i}")), b"x").unwrap();
        fs::write(fx.export().join(format!("made_on_host{i}")), b"x").unwrap();
    }
    fs::hard_link(
        fx.export().join("made_on_host0"),
        fx.export().join("made_on_host0_link"),
    )
    .unwrap();
    for round in 0..3 {
        let listed: Vec<(String, u64)> = fs::read_dir(fx.mnt())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), e.ino())
            })
            .collect();
        assert_eq!(listed.len(), 101, "round {round}");
        let ino = |n: &str| listed.iter().find(|(name, _)| name == n).unwrap().1;
        assert_eq!(
            ino("made_on_host0"),
            ino("made_on_host0_link"),
            "round {round}"
        );
        assert_eq!(
            fs::metadata(fx.mnt().join("made_on_host0_link"))
                .unwrap()
                .nlink(),
            2
        );
    }
    assert_nodes_released(&fx.server, "after three listings");
}

fn assert_nodes_released(server: &dpuctl::fs::server::FsServer, when: &str) {
    fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.node_count() > 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        server.node_count() <= 10,
        "nodes still held {when}: {}",
        server.node_count()
    );
}

/// Reads up to `n` names from an open DIR stream (`n` = usize::MAX: to the end).
fn read_names(d: *mut libc::DIR, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        // SAFETY: `d` is a live DIR stream; readdir's entry is valid until the next call.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        out.push(name.to_string_lossy().into_owned());
    }
    out
}

#[test]
fn seekdir_rewinddir_and_partial_listings_stay_consistent() {
    let Some(fx) = setup() else { return };
    let dir = fx.export().join("big");
    fs::create_dir(&dir).unwrap();
    for i in 0..3_000 {
        File::create(dir.join(format!("entry-with-a-longer-name-{i:05}"))).unwrap();
    }
    let path = c(&fx.mnt().join("big"));
    // SAFETY: plain libc directory-stream calls on a path we own; closed below.
    let d = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!d.is_null());
    let first = read_names(d, 1_000);
    // SAFETY: `d` is open.
    let pos = unsafe { libc::telldir(d) };
    let middle = read_names(d, 500);
    // SAFETY: `pos` came from telldir on this stream.
    unsafe { libc::seekdir(d, pos) };
    let again = read_names(d, 500);
    assert_eq!(
        middle, again,
        "seekdir back to a telldir position re-reads the same entries"
    );
    let rest = read_names(d, usize::MAX);
    // SAFETY: `d` is open.
    unsafe { libc::rewinddir(d) };
    let all = read_names(d, usize::MAX);
    // SAFETY: closes the stream once.
    unsafe { libc::closedir(d) };
    let mut seen: Vec<String> = first.into_iter().chain(middle).chain(rest).collect();
    seen.retain(|n| n != "." && n != "..");
    seen.sort();
    let mut all: Vec<String> = all.into_iter().filter(|n| n != "." && n != "..").collect();
    all.sort();
    assert_eq!(seen.len(), 3_000, "one pass saw every entry exactly once");
    assert_eq!(seen, all, "rewinddir lists the same entries");
    seen.dedup();
    assert_eq!(seen.len(), 3_000, "no entry was listed twice in one pass");

    // A listing abandoned half way returns the lookups the engine made for it.
    // SAFETY: as above.
    let d = unsafe { libc::opendir(path.as_ptr()) };
    assert_eq!(read_names(d, 10).len(), 10);
    // SAFETY: closes the stream once.
    unsafe { libc::closedir(d) };
    assert_nodes_released(&fx.server, "after an abandoned listing");
}

#[test]
fn a_slow_read_does_not_stall_other_requests() {
    use dpuctl::fs::proto::op;
    use dpuctl::fs::{FsCallError, FsTransport};
    use std::sync::Arc;
    /// Delays reads at offsets >= 1 MiB by two seconds: a slow HOST disk for one file.
    struct Slow(Arc<dyn FsTransport>);
    impl FsTransport for Slow {
        fn call(
            &self,
            o: u16,
            p: bytes::Bytes,
        ) -> futures::future::BoxFuture<'static, Result<bytes::Bytes, FsCallError>> {
            let inner = self.0.call(o, p.clone());
            Box::pin(async move {
                if o == op::READ {
                    if let Ok((_, dpuctl::fs::proto::Request::Read { offset, .. })) =
                        dpuctl::fs::proto::Request::decode(o, &p)
                    {
                        if offset >= 1 << 20 {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                }
                inner.await
            })
        }
    }
    let Some(fx) = setup_with(
        |p| StaticPolicy::new().with(ListType::Mount, p),
        ClientOptions::default(),
        |t| Arc::new(Slow(t)),
    ) else {
        return;
    };
    fs::write(fx.export().join("slow"), vec![7u8; 2 << 20]).unwrap();
    fs::write(fx.export().join("plain"), b"data").unwrap();
    let mnt = fx.mnt();
    let reader = std::thread::spawn(move || {
        let f = File::open(mnt.join("slow")).unwrap();
        let mut buf = [0u8; 4096];
        std::os::unix::fs::FileExt::read_at(&f, &mut buf, 1 << 20).unwrap();
        buf[0]
    });
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    for i in 0..50 {
        assert_eq!(fs::read(fx.mnt().join("plain")).unwrap(), b"data");
        fs::metadata(fx.mnt().join("plain")).unwrap();
        fs::write(fx.mnt().join(format!("w{i}")), b"w").unwrap();
    }
    let took = start.elapsed();
    assert!(
        !reader.is_finished(),
        "the slow read should still be in flight"
    );
    assert!(
        took < Duration::from_secs(1),
        "other ops stalled behind the slow read: {took:?}"
    );
    assert_eq!(reader.join().unwrap(), 7);
}

/// Runs `f` on a fresh thread whose fsuid/fsgid is `uid` (the FUSE request carries them).
fn as_user<T: Send + 'static>(uid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: per-thread credential change on a thread we own and end right after.
        unsafe {
            libc::setfsgid(uid);
            libc::setfsuid(uid);
        }
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn permission_checks_are_the_hosts() {
    let Some(fx) = setup() else { return };
    let secret = fx.export().join("secret");
    fs::write(&secret, b"s").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(fx.export().join("ro")).unwrap();
    fs::set_permissions(fx.export().join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    let local = tempfile::tempdir().unwrap();
    fs::set_permissions(local.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(local.path().join("secret"), b"s").unwrap();
    fs::set_permissions(
        local.path().join("secret"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::create_dir(local.path().join("ro")).unwrap();
    for base in [fx.mnt(), local.path().to_path_buf()] {
        let b = base.clone();
        let (read, create, chmod) = as_user(1000, move || {
            (
                code(fs::read(b.join("secret"))),
                code(File::create(b.join("ro/new"))),
                code(fs::set_permissions(
                    b.join("secret"),
                    fs::Permissions::from_mode(0o644),
                )),
            )
        });
        assert_eq!(
            (read, create, chmod),
            (libc::EACCES, libc::EACCES, libc::EPERM),
            "{}",
            base.display()
        );
    }
    // Files created by a user are owned by that user on the HOST.
    fs::set_permissions(fx.export().join("ro"), fs::Permissions::from_mode(0o777)).unwrap();
    let m = fx.mnt();
    as_user(1000, move || File::create(m.join("ro/mine")).unwrap());
    assert_eq!(
        fs::metadata(fx.export().join("ro/mine")).unwrap().uid(),
        1000
    );
}

#[test]
fn root_squash_maps_root_to_nobody() {
    let opts = ClientOptions {
        root_squash: true,
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    fs::set_permissions(fx.export(), fs::Permissions::from_mode(0o777)).unwrap();
    File::create(fx.mnt().join("squashed")).unwrap();
    let m = fs::metadata(fx.export().join("squashed")).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
}

#[test]
fn read_only_mount_refuses_writes() {
    let opts = ClientOptions {
        read_only: true,
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    fs::write(fx.export().join("f"), b"x").unwrap();
    assert_eq!(fs::read(fx.mnt().join("f")).unwrap(), b"x");
    assert_eq!(code(fs::write(fx.mnt().join("f"), b"y")), libc::EROFS);
    assert_eq!(code(fs::create_dir(fx.mnt().join("d"))), libc::EROFS);
}

#[test]
fn allowlist_denials_are_eacces() {
    let Some(fx) = setup_with(
        |p| {
            StaticPolicy::new()
                .with(ListType::Mount, p)
                .with(ListType::Write, p.join("allowed"))
                .with(ListType::Mkdir, p.join("allowed"))
                .with(ListType::Unlink, p.join("allowed"))
                .with(ListType::Setattr, p.join("attrs"))
        },
        ClientOptions::default(),
        |t| t,
    ) else {
        return;
    };
    fs::create_dir(fx.export().join("allowed")).unwrap();
    fs::create_dir(fx.export().join("other")).unwrap();
    fs::write(fx.export().join("other/f"), b"x").unwrap();
    fs::write(fx.mnt().join("allowed/f"), b"ok").unwrap();
    assert_eq!(fs::read(fx.export().join("allowed/f")).unwrap(), b"ok");
    assert_eq!(
        code(fs::write(fx.mnt().join("other/f"), b"no")),
        libc::EACCES
    );
    assert_eq!(code(fs::create_dir(fx.mnt().join("other/d"))), libc::EACCES);
    assert_eq!(
        code(fs::remove_file(fx.mnt().join("other/f"))),
        libc::EACCES
    );
    // Component-wise: "allowedx" is not under "allowed".
    fs::create_dir(fx.export().join("allowedx")).unwrap();
    assert_eq!(
        code(fs::create_dir(fx.mnt().join("allowedx/d"))),
        libc::EACCES
    );
    // Types without entries do not restrict (as the original): reading is fine.
    assert_eq!(fs::read(fx.mnt().join("other/f")).unwrap(), b"x");
    fs::create_dir(fx.mnt().join("allowed/d")).unwrap();
    // Cutting a file is a change of its size, setattr (allowed only under "attrs"), also
    // when an open with O_TRUNC asks for it: that open fails and the file keeps its bytes.
    assert_eq!(
        code(fs::write(fx.mnt().join("allowed/f"), b"2")),
        libc::EACCES
    );
    assert_eq!(fs::read(fx.export().join("allowed/f")).unwrap(), b"ok");
    let f = OpenOptions::new()
        .append(true)
        .open(fx.mnt().join("allowed/f"))
        .unwrap();
    assert_eq!(code(f.set_len(0)), libc::EACCES);
    drop(f);
    fs::create_dir(fx.export().join("attrs")).unwrap();
    fs::write(fx.export().join("attrs/g"), b"long").unwrap();
    assert_eq!(
        code(fs::set_permissions(
            fx.mnt().join("attrs/g"),
            fs::Permissions::from_mode(0o600)
        )),
        0
    );
    assert_eq!(
        code(fs::set_permissions(
            fx.mnt().join("allowed/f"),
            fs::Permissions::from_mode(0o600)
        )),
        libc::EACCES
    );
    // A hard link may not carry a file into a place where it could be written: "other/f"
    // may not be written, so it gets no name under "allowed" (the HOST file is untouched).
    assert_eq!(
        code(fs::hard_link(
            fx.mnt().join("other/f"),
            fx.mnt().join("allowed/hl")
        )),
        libc::EACCES
    );
    assert!(!fx.export().join("allowed/hl").exists());
    assert_eq!(fs::read(fx.export().join("other/f")).unwrap(), b"x");
}

/// open(O_TRUNC) of a program that is running from the mount fails with ETXTBSY, as on a
/// local file system, and cuts nothing: the HOST file keeps every byte and the program keeps
/// running. (With FUSE's atomic O_TRUNC the engine emptied the file before the kernel
/// refused the open, and the program crashed on its next page fault.)
#[test]
fn truncating_a_running_program_is_refused_and_cuts_nothing() {
    let Some(fx) = setup() else { return };
    let program = fx.mnt().join("sleeper");
    fs::copy("/bin/sleep", &program).unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
    let size = fs::metadata("/bin/sleep").unwrap().len();
    let mut child = std::process::Command::new(&program)
        .arg("30")
        .spawn()
        .unwrap();
    for (what, flags) in [
        ("O_RDONLY|O_TRUNC", libc::O_RDONLY | libc::O_TRUNC),
        ("O_WRONLY|O_TRUNC", libc::O_WRONLY | libc::O_TRUNC),
        ("O_RDWR", libc::O_RDWR),
    ] {
        let r = OpenOptions::new()
            .read(flags & libc::O_ACCMODE != libc::O_WRONLY)
            .write(flags & libc::O_ACCMODE != libc::O_RDONLY)
            .custom_flags(flags & libc::O_TRUNC)
            .open(&program);
        assert_eq!(code(r), libc::ETXTBSY, "{what}");
        assert_eq!(
            fs::metadata(fx.export().join("sleeper")).unwrap().len(),
            size,
            "{what} cut the HOST file"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the program died: {:?}",
        child.try_wait()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // Once it is gone, truncation works again.
    File::create(&program).unwrap();
    assert_eq!(fs::metadata(fx.export().join("sleeper")).unwrap().len(), 0);
}

/// Writes and truncations in `d` by root and by another user on set-user-ID and set-group-ID
/// files, and the mode each leaves, read back at once through `d`.
fn privilege_transcript(d: &Path) -> Vec<String> {
    let mut t = Vec::new();
    for (name, mode, gid, uid, truncate) in PRIVILEGE_CASES {
        let f = d.join(name);
        fs::write(&f, b"0123456789").unwrap();
        std::os::unix::fs::chown(&f, None, Some(gid)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
        let g = f.clone();
        let r = as_user(uid, move || {
            let mut h = OpenOptions::new().append(true).open(&g)?;
            if truncate {
                h.set_len(4)?;
            } else {
                h.write_all(b"more")?;
            }
            // close(2) reports what the kernel still had to send (writeback: the times).
            use std::os::fd::IntoRawFd;
            // SAFETY: the descriptor was just taken out of its owner.
            match unsafe { libc::close(h.into_raw_fd()) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
        t.push(format!("{name}: {}", code(r)));
    }
    t.extend(privilege_modes(d));
    t
}

/// (file, mode, its group, writer uid and gid, truncate or write). A user's write or truncate
/// clears set-user-ID and set-group-ID; set-group-ID without group execute stays for a
/// member of the file's group (and, before Linux 6.2, for anyone); root (CAP_FSETID)
/// clears nothing.
const PRIVILEGE_CASES: [(&str, u32, u32, u32, bool); 6] = [
    ("user_write_plain", 0o666, 0, 1000, false),
    ("user_write", 0o6777, 0, 1000, false),
    ("user_write_sgid_no_gx", 0o2766, 0, 1000, false),
    ("member_write_sgid_no_gx", 0o2766, 1000, 1000, false),
    ("user_truncate", 0o6777, 0, 1000, true),
    ("root_write", 0o6777, 0, 0, false),
];

fn privilege_modes(d: &Path) -> Vec<String> {
    PRIVILEGE_CASES
        .iter()
        .map(|(name, ..)| {
            let m = fs::metadata(d.join(name)).unwrap();
            format!("{name}: mode {:o} size {}", m.mode() & 0o7777, m.len())
        })
        .collect()
}

/// A user who may write a file but does not own it writes and truncates it as on a local
/// file system, with default options, writeback and direct I/O: no EPERM (with writeback
/// the kernel sends its own times with a truncation and at close, which only an owner may
/// set), set-user-ID and set-group-ID bits cleared on the HOST as a local write clears them
/// (a non-owner may not chmod), and the mount shows the new mode at once.
#[test]
fn writes_by_others_clear_setuid_and_setgid_as_locally() {
    let local = tempfile::tempdir().unwrap();
    fs::set_permissions(local.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let want = privilege_transcript(local.path());
    let modes = &want[PRIVILEGE_CASES.len()..];
    assert!(
        want[..PRIVILEGE_CASES.len()]
            .iter()
            .all(|r| r.ends_with(": 0")),
        "{want:?}"
    );
    for (i, expected) in [
        (0, "user_write_plain: mode 666 size 14"),
        (1, "user_write: mode 777 size 14"),
        (3, "member_write_sgid_no_gx: mode 2766 size 14"),
        (4, "user_truncate: mode 777 size 4"),
        (5, "root_write: mode 6777 size 14"),
    ] {
        assert_eq!(modes[i], expected, "the local file system: {want:?}");
    }
    for opts in cache_modes() {
        let Some(fx) = setup_opts(opts.clone()) else {
            return;
        };
        fs::set_permissions(fx.export(), fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(privilege_transcript(&fx.mnt()), want, "{opts:?}");
        // Closing flushed writeback pages: the HOST files are the same.
        assert_eq!(privilege_modes(&fx.export()), modes, "{opts:?} on the HOST");
    }
}

/// A POSIX lock record covering the whole file.
fn whole_file(typ: i32) -> libc::flock {
    libc::flock {
        l_type: typ as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// `name`, written on the HOST, opened read-write through the mount and write-locked.
fn write_locked(fx: &common::Fixture, name: &str) -> File {
    fs::write(fx.export().join(name), b"lock me").unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.mnt().join(name))
        .unwrap();
    let mut fl = whole_file(libc::F_WRLCK);
    // SAFETY: valid flock pointer.
    assert_eq!(
        errno_of(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut fl) }),
        0
    );
    f
}

#[test]
fn posix_locks_reach_the_host_and_flock_works_locally() {
    let Some(fx) = setup() else { return };
    let f = write_locked(&fx, "l");
    // A HOST process sees the lock.
    let h = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.export().join("l"))
        .unwrap();
    let mut q = whole_file(libc::F_WRLCK);
    // SAFETY: valid flock pointer.
    assert_eq!(
        errno_of(unsafe { libc::fcntl(h.as_raw_fd(), libc::F_OFD_GETLK, &mut q) }),
        0
    );
    assert_eq!(q.l_type, libc::F_WRLCK as i16);
    drop(f);
    let mut q = whole_file(libc::F_WRLCK);
    // SAFETY: valid flock pointer.
    unsafe { libc::fcntl(h.as_raw_fd(), libc::F_OFD_GETLK, &mut q) };
    assert_eq!(q.l_type, libc::F_UNLCK as i16, "close released the lock");
    // flock between two opens on the DPU side.
    let a = File::open(fx.mnt().join("l")).unwrap();
    let b = File::open(fx.mnt().join("l")).unwrap();
    // SAFETY: plain syscalls on owned fds.
    unsafe {
        assert_eq!(
            errno_of(libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)),
            0
        );
        assert_eq!(
            errno_of(libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)),
            libc::EWOULDBLOCK
        );
    }
}

#[test]
fn proc_mode_links_local_processes_to_local_proc() {
    let opts = ClientOptions {
        proc_mode: true,
        local_proc: "/proc".into(),
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    fs::create_dir(fx.export().join("999999999")).unwrap();
    assert_eq!(
        fs::read_link(fx.mnt().join("self")).unwrap(),
        Path::new("/proc/self")
    );
    assert_eq!(
        fs::read_link(fx.mnt().join("thread-self")).unwrap(),
        Path::new("/proc/thread-self")
    );
    let me = std::process::id().to_string();
    assert_eq!(
        fs::read_link(fx.mnt().join(&me)).unwrap(),
        Path::new("/proc").join(&me)
    );
    // Following the link reaches our own status.
    assert!(fs::read_to_string(fx.mnt().join("self/status"))
        .unwrap()
        .contains(&format!("Pid:\t{me}")));
    // A PID that is not local is the HOST's entry.
    assert!(fs::metadata(fx.mnt().join("999999999")).unwrap().is_dir());
    // The HOST's own `self` and an entry with a local process's number, listed: a listing
    // must not link those names to the HOST's entries.
    std::os::unix::fs::symlink("12345", fx.export().join("self")).unwrap();
    fs::create_dir(fx.export().join(&me)).unwrap();
    for _ in 0..2 {
        let names: Vec<String> = fs::read_dir(fx.mnt())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.contains(&"self".to_string()) && names.contains(&me),
            "{names:?}"
        );
        assert_eq!(
            fs::read_link(fx.mnt().join("self")).unwrap(),
            Path::new("/proc/self"),
            "after a listing"
        );
        assert_eq!(
            fs::read_link(fx.mnt().join(&me)).unwrap(),
            Path::new("/proc").join(&me),
            "after a listing"
        );
    }
}

/// `ls -la` asks for `security.selinux` of every entry: proc mode's links answer as the
/// local procfs's symlinks do (no attribute, an empty list), not ESTALE.
#[test]
fn proc_mode_links_have_no_xattrs() {
    let opts = ClientOptions {
        proc_mode: true,
        local_proc: "/proc".into(),
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    let me = std::process::id().to_string();
    for name in ["self", "thread-self", me.as_str()] {
        let p = c(&fx.mnt().join(name));
        // (ACLs on symlinks the kernel refuses itself, EOPNOTSUPP, as locally.)
        for attr in ["security.selinux", "user.x"] {
            let a = CString::new(attr).unwrap();
            let mut buf = [0u8; 64];
            // SAFETY: valid C strings and a buffer of the given length.
            let r = unsafe {
                libc::lgetxattr(p.as_ptr(), a.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            assert_eq!(errno_of(r as libc::c_int), libc::ENODATA, "{name} {attr}");
        }
        let mut list = [0u8; 64];
        // SAFETY: as above.
        let n = unsafe { libc::llistxattr(p.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
        assert_eq!(n, 0, "{name}: no attributes listed");
        let a = CString::new("security.x").unwrap();
        // SAFETY: as above.
        let r = unsafe { libc::lsetxattr(p.as_ptr(), a.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
        assert_eq!(errno_of(r), libc::EOPNOTSUPP, "{name}: set");
    }
}

#[test]
fn pseudo_files_read_in_full_with_direct_io() {
    if let Err(why) = common::can_mount() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    use dpuctl::fs::server::{FsPool, FsServer, FsServerOptions};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pool = FsPool::new(2).unwrap();
    let server = std::sync::Arc::new(FsServer::with_policy(
        std::sync::Arc::new(StaticPolicy::new().with(ListType::Mount, "/proc")),
        FsServerOptions { pool },
    ));
    let mnt = tempfile::tempdir().unwrap();
    let t = std::sync::Arc::new(dpuctl::fs::InProcessTransport::new(server));
    let m = rt
        .block_on(dpuctl::fs::mount::mount_with_transport(
            t,
            Path::new("/proc"),
            mnt.path(),
            ClientOptions::default(),
        ))
        .unwrap();
    assert_eq!(fs::metadata(mnt.path().join("meminfo")).unwrap().len(), 0);
    let text = fs::read_to_string(mnt.path().join("meminfo")).unwrap();
    assert!(text.contains("MemTotal:"), "{text}");
    assert!(text.lines().count() > 10);
    m.unmount().unwrap();
}

/// A file opened with O_DIRECT (databases, `dd oflag=direct`, qemu's cache=none) reads and
/// writes like any other: the HOST side cannot keep O_DIRECT's alignment rules for data
/// arriving from the network, so it is opened without it there.
#[test]
fn o_direct_files_read_and_write() {
    const LEN: usize = 1 << 20;
    for opts in [
        ClientOptions::default(),
        ClientOptions {
            writeback: true,
            ..ClientOptions::default()
        },
    ] {
        let Some(fx) = setup_opts(opts.clone()) else {
            return;
        };
        // O_DIRECT wants an aligned buffer: a 4 KiB-aligned slice of a larger one.
        let mut raw = vec![0u8; LEN + 4096];
        let at = raw.as_ptr().align_offset(4096);
        let buf = &mut raw[at..at + LEN];
        getrandom::fill(buf).unwrap();
        let want = buf.to_vec();
        let path = fx.mnt().join("direct");
        for create in [true, false] {
            let mut f = OpenOptions::new()
                .write(true)
                .create(create)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .unwrap_or_else(|e| panic!("{opts:?} create={create}: open: {e}"));
            f.write_all(buf)
                .unwrap_or_else(|e| panic!("{opts:?} create={create}: write: {e}"));
        }
        buf.fill(0);
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        f.read_exact(buf).unwrap();
        assert!(buf == want.as_slice(), "{opts:?}: O_DIRECT read differs");
        assert!(
            fs::read(fx.export().join("direct")).unwrap() == want,
            "{opts:?}: HOST"
        );
    }
}

/// SEEK_DATA and SEEK_HOLE on a file whose last writes are still in the DPU's page cache
/// (`writeback`) find that data, as locally: a sparse-aware copy of a file being written
/// must not skip it. Without `writeback` the HOST answers, holes included.
#[test]
fn seek_data_finds_data_not_yet_written_back() {
    let seek = |fd: i32, at: i64, whence: i32| -> Result<i64, i32> {
        // SAFETY: lseek on a descriptor this test owns.
        let r = unsafe { libc::lseek(fd, at, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
        } else {
            Ok(r)
        }
    };
    for opts in cache_modes() {
        let Some(fx) = setup_opts(opts.clone()) else {
            return;
        };
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(fx.mnt().join("growing"))
            .unwrap();
        f.write_all(b"hello").unwrap();
        let fd = f.as_raw_fd();
        for i in 0..5 {
            assert_eq!(seek(fd, i, libc::SEEK_DATA), Ok(i), "{opts:?}");
            assert_eq!(seek(fd, i, libc::SEEK_HOLE), Ok(5), "{opts:?}");
        }
        assert_eq!(seek(fd, 5, libc::SEEK_DATA), Err(libc::ENXIO), "{opts:?}");
        drop(f);
        if !opts.writeback {
            // The HOST's holes: data, a 1 MiB hole, data.
            let p = fx.mnt().join("sparse");
            let f = File::create(&p).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(b"a", 0).unwrap();
            f.write_all_at(b"b", 2 << 20).unwrap();
            let hole = seek(f.as_raw_fd(), 0, libc::SEEK_HOLE).unwrap();
            assert!(hole < 2 << 20, "{opts:?}: no hole reported ({hole})");
        }
    }
}

/// The kernel's readahead window of the mount at `mnt`, in KiB.
fn read_ahead_kib(mnt: &Path) -> u32 {
    let dev = fs::metadata(mnt).unwrap().dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    fs::read_to_string(&path).unwrap().trim().parse().unwrap()
}

/// Every mount reads ahead one full request (1 MiB) instead of the kernel's FUSE default of
/// 128 KiB; `read_ahead=0` keeps the default.
#[test]
fn mounts_read_ahead_a_full_request() {
    let Some(fx) = setup() else { return };
    assert_eq!(read_ahead_kib(&fx.mnt()), 1024);
    drop(fx);
    let Some(fx) = setup_opts(ClientOptions {
        read_ahead_kib: 0,
        ..ClientOptions::default()
    }) else {
        return;
    };
    assert_eq!(read_ahead_kib(&fx.mnt()), 128);
}

/// Unmounts a file system mounted by a test when dropped (also when the test fails).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A full HOST file system: a write fails with ENOSPC and what was written before is on the
/// HOST intact; with `writeback` the kernel has taken the writes into its cache, and the
/// error reaches fsync (as on NFS). Nothing hangs, and once space is freed the same mount
/// writes again.
#[test]
fn a_full_host_disk_is_enospc_and_loses_nothing() {
    const CHUNK: usize = 64 * 1024;
    for opts in cache_modes() {
        let Some(fx) = setup_opts(opts.clone()) else {
            return;
        };
        // A 256 KiB file system inside the export (the engine crosses mount points).
        let small = fx.export().join("small");
        fs::create_dir(&small).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &small,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=256k,mode=0755"),
        )
        .expect("mount a small tmpfs");
        let _unmount = Unmount(small.clone());

        let path = fx.mnt().join("small/fill");
        let mut f = File::create(&path).unwrap();
        let mut written = 0;
        let mut error = None;
        for i in 0..16u8 {
            match f.write(&[i; CHUNK]) {
                Ok(n) => written += n,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let synced = f.sync_all();
        drop(f);
        if opts.writeback {
            assert_eq!(
                written,
                16 * CHUNK,
                "{opts:?}: the page cache takes every write"
            );
            assert_eq!(
                code(synced),
                libc::ENOSPC,
                "{opts:?}: fsync reports the full disk"
            );
        } else {
            let e = error.unwrap_or_else(|| panic!("{opts:?}: wrote {written} bytes into 256 KiB"));
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{opts:?}: {e}");
            assert!(
                written >= CHUNK,
                "{opts:?}: only {written} bytes before ENOSPC"
            );
            // Every byte a write reported is on the HOST, in order.
            let host = fs::read(small.join("fill")).unwrap();
            assert!(
                host.len() >= written,
                "{opts:?}: {} < {written}",
                host.len()
            );
            for (i, block) in host[..written].chunks(CHUNK).enumerate() {
                assert!(block.iter().all(|b| *b == i as u8), "{opts:?}: block {i}");
            }
        }
        // Space freed through the mount: the same mount writes and reads again.
        fs::remove_file(&path).unwrap();
        let again = fx.mnt().join("small/again");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // The HOST frees the blocks once the engine closed the file (its release may
            // still be on its way).
            let attempt = || -> std::io::Result<()> {
                let mut f = File::create(&again)?;
                f.write_all(b"room again")?;
                // With writeback the write lands in the page cache: fsync says whether it
                // reached the HOST.
                f.sync_all()
            };
            match attempt() {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{opts:?}: writing after freeing space: {e}"),
            }
        }
        assert_eq!(
            fs::read(small.join("again")).unwrap(),
            b"room again",
            "{opts:?}"
        );
        assert_eq!(fs::read(&again).unwrap(), b"room again", "{opts:?}");
    }
}

#[test]
fn a_dead_link_fails_with_enotconn_not_a_hang() {
    use dpuctl::fs::{FsCallError, FsTransport};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    struct Breakable(Arc<dyn FsTransport>, Arc<AtomicBool>);
    impl FsTransport for Breakable {
        fn call(
            &self,
            op: u16,
            p: bytes::Bytes,
        ) -> futures::future::BoxFuture<'static, Result<bytes::Bytes, FsCallError>> {
            if self.1.load(Ordering::SeqCst) {
                Box::pin(async { Err(FsCallError::errno(libc::ENOTCONN)) })
            } else {
                self.0.call(op, p)
            }
        }
    }
    let dead = Arc::new(AtomicBool::new(false));
    let d2 = dead.clone();
    let Some(fx) = setup_with(
        |p| StaticPolicy::new().with(ListType::Mount, p),
        ClientOptions {
            attr_ttl: Duration::ZERO,
            entry_ttl: Duration::ZERO,
            ..ClientOptions::default()
        },
        move |t| Arc::new(Breakable(t, d2)),
    ) else {
        return;
    };
    fs::write(fx.mnt().join("f"), b"x").unwrap();
    dead.store(true, Ordering::SeqCst);
    assert_eq!(code(fs::read(fx.mnt().join("f"))), libc::ENOTCONN);
    assert_eq!(code(fs::metadata(fx.mnt().join("g"))), libc::ENOTCONN);
}

#[test]
fn forgotten_nodes_and_closed_handles_are_released() {
    let Some(fx) = setup() else { return };
    for i in 0..100 {
        fs::write(fx.mnt().join(format!("f{i}")), b"x").unwrap();
    }
    // RELEASE is sent asynchronously after close(2) returns.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fx.server.handle_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fx.server.handle_count(), 0, "every open was released");
    let before = fx.server.node_count();
    assert!(before >= 100);
    assert_nodes_released(&fx.server, "after closing every file");
}

#[test]
fn posix_ops_match_with_writeback_cache_and_direct_io() {
    let local = tempfile::tempdir().unwrap();
    let want = transcript(local.path());
    // The default options have their own test (posix_ops_match_a_local_directory).
    for opts in cache_modes().into_iter().skip(1) {
        let Some(fx) = setup_with(
            |p| StaticPolicy::new().with(ListType::Mount, p),
            opts.clone(),
            |t| t,
        ) else {
            return;
        };
        let mut want = want.clone();
        if opts.writeback {
            // The DPU kernel answers SEEK_DATA/SEEK_HOLE there: all data up to the end of
            // the 4 MiB file, no holes (see seek_data_finds_data_not_yet_written_back).
            for line in want.iter_mut() {
                if line.starts_with("seek_data: ") {
                    *line = "seek_data: 0".into();
                } else if line.starts_with("seek_hole: ") {
                    *line = format!("seek_hole: {}", 4 << 20);
                }
            }
        }
        let got = transcript(&fx.mnt());
        assert_eq!(want, got, "{opts:?}");
    }
}

#[test]
fn missing_xattrs_are_remembered_but_a_set_is_seen_at_once() {
    use std::io::Write;
    let Some(fx) = setup() else { return };
    let path = fx.mnt().join("caps");
    let mut f = File::create(&path).unwrap();
    let stats = fx.mount.as_ref().unwrap().stats();
    let before = stats.snapshot().get("getxattr").map_or(0, |o| o.count);
    // The kernel asks for security.capability before each write; one answer serves them all.
    for _ in 0..200 {
        f.write_all(b"0123456789").unwrap();
    }
    let asked = stats.snapshot().get("getxattr").map_or(0, |o| o.count) - before;
    assert!(asked <= 2, "{asked} getxattr round trips for 200 writes");
    assert_eq!(fs::read(fx.export().join("caps")).unwrap().len(), 2000);

    let c_path = c(&path);
    let name = c"user.dpuctl";
    let mut buf = [0u8; 16];
    // SAFETY: valid NUL-terminated strings and a buffer of the stated size.
    let get = |buf: &mut [u8; 16]| unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(get(&mut buf), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );
    // SAFETY: as above.
    let r = unsafe { libc::setxattr(c_path.as_ptr(), name.as_ptr(), b"v1".as_ptr().cast(), 2, 0) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(
        get(&mut buf),
        2,
        "a set through the mount is visible at once"
    );
    assert_eq!(&buf[..2], b"v1");
}

/// With `writeback` the kernel keeps file times itself and writes them back (a SETATTR of
/// mtime and ctime it waits for) after every rename and unlink. When the mtime is the one the
/// engine just reported there is nothing to write, and the mount answers without a round trip;
/// a time that did change still reaches the HOST.
#[test]
fn writeback_unchanged_time_write_back_costs_no_round_trip() {
    let opts = ClientOptions {
        writeback: true,
        attr_ttl: Duration::from_secs(30),
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    for i in 0..20 {
        fs::write(fx.export().join(format!("f{i}")), b"x").unwrap();
        fs::metadata(fx.mnt().join(format!("f{i}"))).unwrap();
    }
    let mount = fx.mount.as_ref().unwrap();
    let setattrs = || {
        mount
            .stats()
            .snapshot()
            .get("setattr")
            .map_or(0, |s| s.count)
    };
    let before = setattrs();
    for i in 0..20 {
        fs::rename(
            fx.mnt().join(format!("f{i}")),
            fx.mnt().join(format!("g{i}")),
        )
        .unwrap();
    }
    for i in 0..10 {
        fs::remove_file(fx.mnt().join(format!("g{i}"))).unwrap();
    }
    assert_eq!(
        setattrs(),
        before,
        "unchanged times were written back through the engine"
    );
    assert!(fx.export().join("g10").exists() && !fx.export().join("g0").exists());

    // A time that changed is written: set through the mount, seen on the HOST.
    let f = OpenOptions::new()
        .write(true)
        .open(fx.mnt().join("g10"))
        .unwrap();
    f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
        .unwrap();
    assert_eq!(
        fs::metadata(fx.export().join("g10")).unwrap().mtime(),
        1_000_000_000
    );
    assert!(setattrs() > before);
}

/// A new engine (fresh node and handle tables, as after an engine restart) takes the mount
/// over with `reattach`: open files, a directory handle, renamed and deep inodes keep working
/// under the same inode numbers; a name that now holds another HOST file, and a file deleted
/// meanwhile, are lost (ESTALE/EBADF on the old handle, the path finds the new file).
#[test]
fn reattach_gives_a_new_engine_the_inodes_and_handles_the_kernel_holds() {
    use std::os::unix::fs::FileExt;
    let opts = ClientOptions {
        direct_io: true, // every read reaches the engine
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    let (exp, mnt) = (fx.export(), fx.mnt());
    fs::create_dir_all(exp.join("dir/deep")).unwrap();
    fs::write(exp.join("dir/a"), b"alpha").unwrap();
    fs::write(exp.join("dir/b"), b"bravo").unwrap();
    fs::write(exp.join("dir/deep/c"), b"charlie").unwrap();
    fs::write(exp.join("dir/gone"), b"x").unwrap();
    fs::create_dir(exp.join("many")).unwrap();
    for i in 0..200 {
        fs::write(exp.join(format!("many/f{i}")), b"m").unwrap();
    }
    // Each name looked up, most of them twice (through readdirplus and a lookup).
    for e in fs::read_dir(mnt.join("many")).unwrap() {
        fs::metadata(e.unwrap().path()).unwrap();
    }
    let a = File::open(mnt.join("dir/a")).unwrap();
    let b = File::open(mnt.join("dir/b")).unwrap();
    let mut w = OpenOptions::new()
        .append(true)
        .open(mnt.join("dir/deep/c"))
        .unwrap();
    fs::rename(mnt.join("dir/deep/c"), mnt.join("dir/deep/c2")).unwrap();
    let dir = File::open(mnt.join("dir")).unwrap();
    let ino_a = fs::metadata(mnt.join("dir/a")).unwrap().ino();
    fs::metadata(mnt.join("dir/gone")).unwrap();
    // Meanwhile, on the HOST: b is replaced by another file, gone is deleted.
    fs::write(exp.join("dir/b.new"), b"BRAVO2").unwrap();
    fs::rename(exp.join("dir/b.new"), exp.join("dir/b")).unwrap();
    fs::remove_file(exp.join("dir/gone")).unwrap();

    let (fresh, restored) = fx.reattach_to_a_new_engine();
    assert_eq!(
        restored.files, 3,
        "a, c2 and dir are reopened: {restored:?}"
    );
    assert_eq!(restored.files_lost, 1, "b's handle is lost: {restored:?}");
    assert_eq!(
        restored.nodes, 205,
        "dir, a, deep, c2, many and its 200: {restored:?}"
    );
    assert_eq!(restored.nodes_lost, 2, "the old b and gone: {restored:?}");
    assert_eq!(fresh.handle_count(), 3);

    let mut buf = [0u8; 16];
    let n = a.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"alpha");
    assert_eq!(
        code(b.read_at(&mut buf, 0)),
        libc::EBADF,
        "the replaced file's handle is gone"
    );
    w.write_all(b"+more").unwrap();
    assert_eq!(fs::read(exp.join("dir/deep/c2")).unwrap(), b"charlie+more");
    assert!(dir.metadata().unwrap().is_dir());
    assert_eq!(fs::read(mnt.join("dir/b")).unwrap(), b"BRAVO2");
    assert_eq!(fs::metadata(mnt.join("dir/a")).unwrap().ino(), ino_a);
    // The lost node answers ESTALE, on which the kernel looks the path up again.
    assert_eq!(code(File::open(mnt.join("dir/gone"))), libc::ENOENT);
    let mut names: Vec<_> = fs::read_dir(mnt.join("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "deep"]);
    fs::write(mnt.join("dir/new"), b"n").unwrap();
    assert_eq!(fs::read(exp.join("dir/new")).unwrap(), b"n");
    // The lookup counts handed over were the kernel's: once it lets go, the new engine holds
    // nothing more (none leaked), and nothing it needed was dropped early (above).
    drop((a, b, w, dir));
    let deadline = Instant::now() + Duration::from_secs(5);
    while fresh.handle_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fresh.handle_count(),
        0,
        "every reopened handle was released"
    );
    assert_nodes_released(&fresh, "after the kernel let go of a reattached mount");
}

/// While the link is down, calls wait: a reattach within the wait sends them to the new
/// engine; otherwise they fail with ENOTCONN once the wait is over.
#[test]
fn held_calls_wait_for_a_reattach_or_fail_after_the_wait() {
    let opts = ClientOptions {
        direct_io: true,
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    let (exp, mnt) = (fx.export(), fx.mnt());
    fs::write(exp.join("f"), b"held").unwrap();
    fs::metadata(mnt.join("f")).unwrap();
    let client = fx.mount.as_ref().unwrap().client();

    client.hold_calls(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(code(File::open(mnt.join("f"))), libc::ENOTCONN);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "failed after {:?}, before the wait was over",
        started.elapsed()
    );
    assert!(File::open(mnt.join("f")).is_ok(), "not held any more");

    client.hold_calls(Duration::from_secs(30));
    let path = mnt.join("f");
    let reader = std::thread::spawn(move || fs::read(path));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!reader.is_finished(), "the read did not wait");
    let (fresh, _) = fx.reattach_to_a_new_engine();
    assert_eq!(reader.join().unwrap().unwrap(), b"held");
    assert!(fresh.node_count() >= 1, "served by the new engine");
}

/// With the writeback cache, pages the kernel holds dirty while the engine is away are
/// written back through the handle the new engine reopened: nothing written is lost.
#[test]
fn writeback_pages_dirtied_during_an_outage_reach_the_new_engine() {
    let opts = ClientOptions {
        writeback: true,
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    let (exp, mnt) = (fx.export(), fx.mnt());
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(mnt.join("wb"))
        .unwrap();
    f.write_all(b"before the outage;").unwrap();
    f.sync_all().unwrap();
    let client = fx.mount.as_ref().unwrap().client();
    client.hold_calls(Duration::from_secs(30));
    // Dirty pages only: the kernel writes them back later, through the held handle.
    f.write_all(b" during it").unwrap();
    let (_, restored) = fx.reattach_to_a_new_engine();
    assert_eq!(restored.files, 1, "{restored:?}");
    f.write_all(b" after.").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        fs::read(exp.join("wb")).unwrap(),
        b"before the outage; during it after."
    );
}

/// `fresh_dirs`: in a directory this mount created, lookups of names it did not make are
/// answered without a round trip; names the HOST adds stay hidden until the directory is
/// contradicted (EEXIST, a listing) or expires, and directories made elsewhere are untouched.
#[test]
fn fresh_dirs_answer_absent_names_locally_until_contradicted_or_expired() {
    let opts = ClientOptions {
        fresh_dirs: std::time::Duration::from_secs(30),
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    let stats = fx.mount.as_ref().unwrap().stats();
    let lookups = || stats.snapshot().get("lookup").map_or(0, |o| o.count);
    let (mnt, host) = (fx.mnt(), fx.export());

    fs::create_dir(mnt.join("d")).unwrap();
    let before = lookups();
    for i in 0..100 {
        File::create(mnt.join(format!("d/f{i}"))).unwrap();
    }
    assert_eq!(code(fs::metadata(mnt.join("d/none"))), libc::ENOENT);
    assert!(
        lookups() - before <= 2,
        "{} lookups went to the engine for 100 creates in a fresh directory",
        lookups() - before
    );
    // What the mount made is there, renames and unlinks keep the names right.
    fs::rename(mnt.join("d/f1"), mnt.join("d/g1")).unwrap();
    assert_eq!(code(fs::metadata(mnt.join("d/f1"))), libc::ENOENT);
    assert!(fs::metadata(mnt.join("d/g1")).is_ok());
    fs::remove_file(mnt.join("d/f2")).unwrap();
    assert_eq!(code(fs::metadata(mnt.join("d/f2"))), libc::ENOENT);
    fs::create_dir(mnt.join("d/sub")).unwrap();
    fs::write(mnt.join("d/sub/x"), b"x").unwrap();
    assert_eq!(fs::read(mnt.join("d/sub/x")).unwrap(), b"x");

    // A name the HOST adds is hidden (the documented price) ...
    fs::write(host.join("d/host"), b"h").unwrap();
    assert_eq!(code(fs::metadata(mnt.join("d/host"))), libc::ENOENT);
    // ... until something contradicts the table: an exclusive create finds it.
    let excl = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(mnt.join("d/host"));
    assert_eq!(code(excl), libc::EEXIST);
    assert_eq!(fs::read(mnt.join("d/host")).unwrap(), b"h");

    // A listing that shows an unknown name ends the trust too.
    fs::create_dir(mnt.join("e")).unwrap();
    fs::write(host.join("e/host"), b"h").unwrap();
    assert_eq!(code(fs::metadata(mnt.join("e/host"))), libc::ENOENT);
    let listed: Vec<_> = fs::read_dir(mnt.join("e"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listed, vec![std::ffi::OsString::from("host")]);
    assert_eq!(fs::read(mnt.join("e/host")).unwrap(), b"h");

    // A directory the HOST made is never taken to be fresh.
    fs::create_dir(host.join("h")).unwrap();
    assert!(fs::metadata(mnt.join("h")).is_ok());
    fs::write(host.join("h/a"), b"a").unwrap();
    assert_eq!(fs::read(mnt.join("h/a")).unwrap(), b"a");
}

#[test]
fn fresh_dirs_expire() {
    let opts = ClientOptions {
        fresh_dirs: std::time::Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let Some(fx) = setup_opts(opts) else {
        return;
    };
    fs::create_dir(fx.mnt().join("d")).unwrap();
    fs::write(fx.export().join("d/host"), b"h").unwrap();
    assert_eq!(code(fs::metadata(fx.mnt().join("d/host"))), libc::ENOENT);
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(fs::read(fx.mnt().join("d/host")).unwrap(), b"h");
}

/// What user 1000 gets from a file inside a directory only root may enter (0700), after
/// root has used the path so the DPU kernel holds its names: the same as on a local file
/// system, every time (a cached path must not skip the directory's search permission).
fn search_permission_transcript(d: &Path) -> Vec<String> {
    let private = d.join("private");
    fs::create_dir(&private).unwrap();
    let conf = private.join("conf");
    fs::write(&conf, b"original").unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o666)).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    // A directory the user may list but not search (r--).
    let listed = d.join("listed");
    fs::create_dir(&listed).unwrap();
    fs::write(listed.join("a"), b"").unwrap();
    fs::set_permissions(&listed, fs::Permissions::from_mode(0o744)).unwrap();
    let mut t = Vec::new();
    for round in 0..2 {
        fs::read(&conf).unwrap();
        fs::metadata(listed.join("a")).unwrap();
        let (c, l) = (conf.clone(), listed.clone());
        let r = as_user(1000, move || {
            vec![
                format!("read: {}", code(fs::read(&c))),
                format!("write: {}", code(OpenOptions::new().write(true).open(&c))),
                format!("stat: {}", code(fs::metadata(&c))),
                format!(
                    "list r--: {:?}",
                    fs::read_dir(&l).map(|e| e
                        .map(|e| e.unwrap().file_name().into_string().unwrap())
                        .collect::<Vec<_>>())
                ),
                format!("stat in r--: {}", code(fs::metadata(l.join("a")))),
            ]
        });
        t.extend(r.into_iter().map(|s| format!("round {round}: {s}")));
    }
    t.push(format!("content: {:?}", fs::read_to_string(&conf).unwrap()));
    t
}

#[test]
fn cached_paths_keep_directory_search_permission_as_locally() {
    let local = tempfile::tempdir().unwrap();
    fs::set_permissions(local.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let want = search_permission_transcript(local.path());
    assert!(
        want.iter().any(|l| l.contains("read: 13")) && want.iter().any(|l| l.contains("[\"a\"]")),
        "the local file system: {want:?}"
    );
    for opts in cache_modes() {
        let Some(fx) = setup_opts(opts.clone()) else {
            return;
        };
        fs::set_permissions(fx.export(), fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(search_permission_transcript(&fx.mnt()), want, "{opts:?}");
    }
}

/// A POSIX ACL xattr (`system.posix_acl_*`, version 2): owner rwx, user 1000 rwx, group
/// r-x, mask rwx, other r-x.
fn acl_granting_user_1000() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 7u16, u32::MAX), // ACL_USER_OBJ
        (0x02, 7, 1000),           // ACL_USER
        (0x04, 5, u32::MAX),       // ACL_GROUP_OBJ
        (0x10, 7, u32::MAX),       // ACL_MASK
        (0x20, 5, u32::MAX),       // ACL_OTHER
    ] {
        v.extend(tag.to_le_bytes());
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
    }
    v
}

fn xattr_of(p: &Path, name: &std::ffi::CStr) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings, buffer valid for its length.
    let n = unsafe {
        libc::getxattr(
            c(p).as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

/// Under a directory with a default ACL, files and directories made with umask 022 (on a
/// thread of its own, as umask is per process otherwise) get the ACL's permissions, not the
/// umask's; elsewhere the umask applies.
fn default_acl_transcript(d: &Path) -> Vec<String> {
    let acl_dir = d.join("acl");
    let plain = d.join("plain");
    fs::create_dir(&acl_dir).unwrap();
    fs::create_dir(&plain).unwrap();
    let acl = acl_granting_user_1000();
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::setxattr(
            c(&acl_dir).as_ptr(),
            c"system.posix_acl_default".as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    assert_eq!(
        errno_of(r),
        0,
        "setting a default ACL on {}",
        acl_dir.display()
    );
    let (a, p) = (acl_dir.clone(), plain.clone());
    std::thread::spawn(move || {
        // SAFETY: this thread gets its own umask (CLONE_FS) before changing it.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_FS), 0);
            libc::umask(0o022);
        }
        for dir in [&a, &p] {
            File::create(dir.join("f")).unwrap();
            fs::create_dir(dir.join("s")).unwrap();
        }
    })
    .join()
    .unwrap();
    let mut t = Vec::new();
    for dir in [&acl_dir, &plain] {
        for name in ["f", "s"] {
            let p = dir.join(name);
            let mode = fs::metadata(&p).unwrap().mode() & 0o7777;
            let acl = xattr_of(&p, c"system.posix_acl_access");
            t.push(format!(
                "{}/{name}: mode {mode:o}, access ACL {}",
                dir.file_name().unwrap().to_string_lossy(),
                acl.map_or("none".into(), |a| format!("{} bytes", a.len()))
            ));
        }
    }
    let f = acl_dir.join("f");
    t.push(format!(
        "user 1000 may write acl/f: {}",
        code(as_user(1000, move || OpenOptions::new()
            .write(true)
            .open(&f)))
    ));
    t
}

#[test]
fn a_default_acl_replaces_the_umask_as_locally() {
    let local = tempfile::tempdir().unwrap();
    let want = default_acl_transcript(local.path());
    assert_eq!(
        want[0], "acl/f: mode 664, access ACL 44 bytes",
        "the local file system: {want:?}"
    );
    assert_eq!(want[2], "plain/f: mode 644, access ACL none", "{want:?}");
    for opts in cache_modes() {
        let Some(fx) = setup_opts(opts.clone()) else {
            return;
        };
        assert_eq!(default_acl_transcript(&fx.mnt()), want, "{opts:?}");
    }
}

/// A shared writable mapping of a file on a `direct_io` mount: the kernel maps it through
/// its page cache, and msync brings the bytes to the HOST.
#[test]
fn direct_io_files_map_shared() {
    let Some(fx) = setup_opts(ClientOptions {
        direct_io: true,
        ..ClientOptions::default()
    }) else {
        return;
    };
    fs::write(fx.export().join("shm"), b"hello").unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.mnt().join("shm"))
        .unwrap();
    // SAFETY: a fresh mapping of 5 bytes of an open file, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            5,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap(MAP_SHARED): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: p maps 5 writable bytes.
    unsafe {
        *(p as *mut u8) = b'J';
        assert_eq!(libc::msync(p, 5, libc::MS_SYNC), 0);
        libc::munmap(p, 5);
    }
    assert_eq!(fs::read(fx.export().join("shm")).unwrap(), b"Jello");
}

/// A file held open on the DPU sees what the HOST writes in place once its attributes are
/// refreshed (a changed modification time drops the cached pages), as a reader of a status
/// or log file expects.
#[test]
fn open_files_see_host_writes_after_the_attribute_timeout() {
    let Some(fx) = setup_opts(ClientOptions {
        attr_ttl: Duration::from_millis(100),
        ..ClientOptions::default()
    }) else {
        return;
    };
    let host = fx.export().join("status");
    fs::write(&host, b"v1\n").unwrap();
    let mut f = File::open(fx.mnt().join("status")).unwrap();
    let mut buf = [0u8; 3];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"v1\n");
    // A later modification time, as a write some time after the first gives.
    std::thread::sleep(Duration::from_millis(20));
    OpenOptions::new()
        .write(true)
        .open(&host)
        .unwrap()
        .write_all(b"v2\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"v2\n", "the open file kept its stale pages");
}

/// After a change inside a directory the DPU kernel drops the directory's attributes and
/// asks for them before its next permission check there; the engine sends them with the
/// change, so creating, renaming and removing many entries costs no GETATTR round trips, and
/// what the mount shows of the directory is still the HOST's.
#[test]
fn changes_in_a_directory_need_no_attribute_round_trips() {
    let Some(fx) = setup() else { return };
    let d = fx.mnt().join("d");
    fs::create_dir(&d).unwrap();
    let mount = fx.mount.as_ref().unwrap();
    let getattrs = || {
        mount
            .stats()
            .snapshot()
            .get("getattr")
            .map_or(0, |s| s.count)
    };
    let before = getattrs();
    for i in 0..30 {
        File::create(d.join(format!("f{i}"))).unwrap();
    }
    for i in 0..30 {
        fs::rename(d.join(format!("f{i}")), d.join(format!("g{i}"))).unwrap();
    }
    for i in 0..10 {
        fs::create_dir(d.join(format!("s{i}"))).unwrap();
        fs::remove_dir(d.join(format!("s{i}"))).unwrap();
    }
    for i in 0..30 {
        fs::remove_file(d.join(format!("g{i}"))).unwrap();
    }
    File::create(d.join("last")).unwrap();
    let asked = getattrs() - before;
    assert!(
        asked <= 2,
        "{asked} GETATTRs went to the engine for 111 changes in one directory"
    );
    let (m, h) = (
        fs::metadata(&d).unwrap(),
        fs::metadata(fx.export().join("d")).unwrap(),
    );
    assert_eq!(
        (m.mtime(), m.mtime_nsec(), m.ctime(), m.nlink(), m.mode()),
        (h.mtime(), h.mtime_nsec(), h.ctime(), h.nlink(), h.mode()),
        "the directory's attributes after the changes are the HOST's"
    );
    // A chmod of the directory right after a change inside it: the new mode is what the
    // mount shows and what the kernel checks.
    File::create(d.join("x")).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(fs::metadata(&d).unwrap().mode() & 0o7777, 0o700);
    let y = d.join("y");
    assert_eq!(code(as_user(1000, move || File::create(y))), libc::EACCES);
}

/// The lock a HOST process sees on `p`: F_WRLCK, F_RDLCK or F_UNLCK.
fn host_sees_lock(p: &Path) -> i16 {
    let h = OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut q = whole_file(libc::F_WRLCK);
    // SAFETY: valid flock pointer on an owned fd.
    assert_eq!(
        errno_of(unsafe { libc::fcntl(h.as_raw_fd(), libc::F_OFD_GETLK, &mut q) }),
        0
    );
    q.l_type
}

/// A process that holds a POSIX lock and starts a child (which shares the open file until
/// it exits or execs) keeps its lock, as locally: only its own close releases it.
#[test]
fn a_childs_exit_leaves_its_parents_lock_alone() {
    let Some(fx) = setup() else { return };
    let f = write_locked(&fx, "l");
    // SAFETY: the child only calls _exit (async-signal-safe), which closes its copy of the
    // descriptor: the DPU kernel sends a flush with the child's lock owner.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    // Spawning a program closes the descriptor in the child at exec (close-on-exec).
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    assert_eq!(
        host_sees_lock(&fx.export().join("l")),
        libc::F_WRLCK as i16,
        "the child's exit released its parent's lock"
    );
    drop(f);
    assert_eq!(
        host_sees_lock(&fx.export().join("l")),
        libc::F_UNLCK as i16,
        "the holder's close released the lock"
    );
}

/// Lock owners are processes, as locally: a forked child cannot take the lock its parent
/// holds through their shared open file, and F_GETLK names the parent; one process's two
/// opens of a file share its locks, and closing either releases them all; a read lock
/// taken through a read-only open becomes a write lock through a read-write one.
#[test]
fn posix_lock_owners_are_processes_as_locally() {
    let Some(fx) = setup() else { return };
    let f = write_locked(&fx, "l");
    let mut pipe = [0; 2];
    // SAFETY: valid array of two fds.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the child calls only fcntl, write and _exit (async-signal-safe).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // First let go of the copies of everything else (the in-process engine's lock
        // holders among them), which would keep other tests' locks alive.
        let (a, b) = (f.as_raw_fd().min(pipe[1]), f.as_raw_fd().max(pipe[1]));
        for (lo, hi) in [(3, a - 1), (a + 1, b - 1), (b + 1, libc::c_int::MAX)] {
            if lo <= hi {
                unsafe { libc::syscall(libc::SYS_close_range, lo as u32, hi as u32, 0) };
            }
        }
        let mut fl = whole_file(libc::F_WRLCK);
        let e = errno_of(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut fl) });
        let mut q = whole_file(libc::F_WRLCK);
        let g = errno_of(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut q) });
        let out = [e, g, i32::from(q.l_type), q.l_pid];
        unsafe {
            libc::write(pipe[1], out.as_ptr().cast(), std::mem::size_of_val(&out));
            libc::_exit(0)
        };
    }
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let mut out = [0i32; 4];
    // SAFETY: reading into a local array of its own size.
    let n = unsafe {
        libc::read(
            pipe[0],
            out.as_mut_ptr().cast(),
            std::mem::size_of_val(&out),
        )
    };
    // SAFETY: our own pipe fds.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
    assert_eq!(n as usize, std::mem::size_of_val(&out));
    let [set, get, typ, holder] = out;
    assert!(
        set == libc::EAGAIN || set == libc::EACCES,
        "the child took the lock its parent holds (errno {set})"
    );
    assert_eq!((get, typ), (0, libc::F_WRLCK), "F_GETLK in the child");
    assert_eq!(
        holder,
        std::process::id() as i32,
        "F_GETLK names the parent"
    );

    let g = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.mnt().join("l"))
        .unwrap();
    let mut fl = whole_file(libc::F_WRLCK);
    // SAFETY: valid flock pointer on an owned fd.
    let e = errno_of(unsafe { libc::fcntl(g.as_raw_fd(), libc::F_SETLK, &mut fl) });
    assert_eq!(e, 0, "one process's second open conflicts with its first");
    drop(g);
    let l = fx.export().join("l");
    assert_eq!(host_sees_lock(&l), libc::F_UNLCK as i16, "a close released");
    drop(f);

    let r = File::open(fx.mnt().join("l")).unwrap();
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.mnt().join("l"))
        .unwrap();
    let mut fl = whole_file(libc::F_RDLCK);
    fl.l_len = 4;
    // SAFETY: valid flock pointers on owned fds.
    unsafe {
        assert_eq!(
            errno_of(libc::fcntl(r.as_raw_fd(), libc::F_SETLK, &mut fl)),
            0
        );
        assert_eq!(host_sees_lock(&l), libc::F_RDLCK as i16);
        fl.l_type = libc::F_WRLCK as i16;
        assert_eq!(
            errno_of(libc::fcntl(w.as_raw_fd(), libc::F_SETLK, &mut fl)),
            0
        );
    }
    assert_eq!(host_sees_lock(&l), libc::F_WRLCK as i16);
    drop(r);
    assert_eq!(host_sees_lock(&l), libc::F_UNLCK as i16);
}

/// A file deleted on the HOST while the DPU kernel still holds its name (a long
/// `entry_timeout`) is gone for a new open, as locally: the kernel looks the name up again.
/// A file the DPU holds open stays readable after the HOST deletes it.
#[test]
fn a_file_deleted_on_the_host_cannot_be_opened_by_its_old_name() {
    let Some(fx) = setup_opts(ClientOptions {
        entry_ttl: Duration::from_secs(30),
        attr_ttl: Duration::from_secs(30),
        ..ClientOptions::default()
    }) else {
        return;
    };
    fs::write(fx.export().join("gone"), b"old").unwrap();
    assert_eq!(fs::read(fx.mnt().join("gone")).unwrap(), b"old");
    let mut held = File::open(fx.mnt().join("gone")).unwrap();
    fs::remove_file(fx.export().join("gone")).unwrap();
    assert_eq!(code(File::open(fx.mnt().join("gone"))), libc::ENOENT);
    let mut s = String::new();
    held.read_to_string(&mut s).unwrap();
    assert_eq!(s, "old");
    assert_eq!(held.metadata().unwrap().nlink(), 0);
}
