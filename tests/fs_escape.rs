//! Escape attempts against the engine-side executor, driven through its request API (the
//! same bytes a DPU would send), so they cover what a malicious client could do, not only
//! what a well-behaved kernel sends. No FUSE needed.

use bytes::Bytes;
use dpuctl::allowlist::ListType;
use dpuctl::fs::proto::{Creds, Entry, Request, Response};
use dpuctl::fs::server::{FsPool, FsServer, FsServerOptions, StaticPolicy};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct Host {
    _dir: tempfile::TempDir,
    parent: PathBuf,
    server: FsServer,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let parent = fs::canonicalize(dir.path()).unwrap();
        let export = parent.join("export");
        fs::create_dir_all(export.join("sub/deeper")).unwrap();
        fs::write(parent.join("secret"), b"TOP SECRET").unwrap();
        std::os::unix::fs::symlink(parent.join("secret"), export.join("abs")).unwrap();
        std::os::unix::fs::symlink("../secret", export.join("rel")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../etc/passwd", export.join("sub/far"))
            .unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/passwd", export.join("magic")).unwrap();
        let pool = FsPool::new(2).unwrap();
        let server = FsServer::with_policy(
            Arc::new(StaticPolicy::new().with(ListType::Mount, &export)),
            FsServerOptions { pool },
        );
        Host {
            _dir: dir,
            parent,
            server,
        }
    }

    fn export(&self) -> PathBuf {
        self.parent.join("export")
    }

    async fn call(&self, req: Request) -> Result<Response, i32> {
        let op = req.op();
        let creds = Creds::default();
        match self.server.handle(op, req.encode(&creds)).await {
            Ok(b) => Ok(Response::decode(op, &b).unwrap()),
            Err(e) => Err(e.0),
        }
    }

    async fn entry(&self, req: Request) -> Result<Entry, i32> {
        match self.call(req).await? {
            Response::Entry(e) => Ok(e),
            r => panic!("unexpected {r:?}"),
        }
    }

    async fn mount(&self) -> Entry {
        self.entry(Request::Mount {
            path: self.export().as_os_str().as_encoded_bytes().to_vec(),
            flags: 0,
        })
        .await
        .unwrap()
    }

    async fn lookup(&self, parent: u64, name: &str) -> Result<Entry, i32> {
        self.entry(Request::Lookup {
            parent,
            name: name.as_bytes().to_vec(),
        })
        .await
    }

    async fn read_all(&self, node: u64) -> Result<Vec<u8>, i32> {
        let fh = match self
            .call(Request::Open {
                node,
                flags: libc::O_RDONLY,
            })
            .await?
        {
            Response::Opened { fh, .. } => fh,
            r => panic!("unexpected {r:?}"),
        };
        let r = self
            .call(Request::Read {
                fh,
                offset: 0,
                size: 1 << 16,
            })
            .await;
        self.call(Request::Release { fh }).await.unwrap();
        match r? {
            Response::Data(d) => Ok(d.to_vec()),
            r => panic!("unexpected {r:?}"),
        }
    }
}

#[tokio::test]
async fn symlinks_are_never_followed_on_the_host() {
    let h = Host::new();
    let root = h.mount().await;
    for (dir, name) in [(root.node, "abs"), (root.node, "rel"), (root.node, "magic")] {
        let e = h.lookup(dir, name).await.unwrap();
        assert_eq!(
            e.attr.mode & libc::S_IFMT,
            libc::S_IFLNK,
            "{name} resolves to the link itself"
        );
        let r = h.read_all(e.node).await;
        assert_eq!(r, Err(libc::ELOOP), "{name} must not be opened through");
    }
    let sub = h.lookup(root.node, "sub").await.unwrap();
    let far = h.lookup(sub.node, "far").await.unwrap();
    assert_eq!(h.read_all(far.node).await, Err(libc::ELOOP));
    // The link text itself is returned for the DPU kernel to resolve on its side.
    match h.call(Request::Readlink { node: far.node }).await.unwrap() {
        Response::Data(d) => assert_eq!(&d[..], b"../../../../../../../../etc/passwd"),
        r => panic!("{r:?}"),
    }
}

#[tokio::test]
async fn dotdot_and_multi_component_names_cannot_climb() {
    let h = Host::new();
    let root = h.mount().await;
    // `..` of the root is the root.
    assert_eq!(h.lookup(root.node, "..").await.unwrap().node, root.node);
    let sub = h.lookup(root.node, "sub").await.unwrap();
    assert_eq!(h.lookup(sub.node, "..").await.unwrap().node, root.node);
    for bad in ["../secret", "sub/../../secret", "/etc/passwd", "", "a\0b"] {
        assert_eq!(
            h.lookup(root.node, bad).await.err(),
            Some(libc::EINVAL),
            "{bad:?}"
        );
    }
    for bad in ["..", ".", "../x", "x/y"] {
        let r = h
            .call(Request::Create {
                parent: root.node,
                name: bad.into(),
                mode: 0o644,
                umask: 0,
                flags: libc::O_WRONLY,
            })
            .await;
        assert_eq!(r.err(), Some(libc::EINVAL), "create {bad:?}");
        let r = h
            .call(Request::Mkdir {
                parent: root.node,
                name: bad.into(),
                mode: 0o755,
                umask: 0,
            })
            .await;
        assert_eq!(r.err(), Some(libc::EINVAL), "mkdir {bad:?}");
        let r = h
            .call(Request::Rename {
                parent: root.node,
                name: b"sub".to_vec(),
                newparent: root.node,
                newname: bad.into(),
                flags: 0,
            })
            .await;
        assert_eq!(r.err(), Some(libc::EINVAL), "rename to {bad:?}");
    }
    assert!(h.parent.join("secret").exists());
    assert!(!h.parent.join("x").exists());
}

#[tokio::test]
async fn a_directory_moved_out_of_the_export_is_unreachable() {
    let h = Host::new();
    let root = h.mount().await;
    let sub = h.lookup(root.node, "sub").await.unwrap();
    // A HOST process moves the directory out while the DPU holds its node.
    fs::rename(h.export().join("sub"), h.parent.join("outside")).unwrap();
    let r = h
        .call(Request::Create {
            parent: sub.node,
            name: b"planted".to_vec(),
            mode: 0o644,
            umask: 0,
            flags: libc::O_WRONLY,
        })
        .await;
    assert_eq!(r.err(), Some(libc::ENOENT));
    assert_eq!(h.lookup(sub.node, "deeper").await.err(), Some(libc::ENOENT));
    assert_eq!(
        h.call(Request::Opendir { node: sub.node }).await.err(),
        Some(libc::ENOENT)
    );
    assert!(!h.parent.join("outside/planted").exists());
    // Moving it back makes it usable again.
    fs::rename(h.parent.join("outside"), h.export().join("sub")).unwrap();
    assert!(h.lookup(sub.node, "deeper").await.is_ok());
}

#[tokio::test]
async fn mount_requires_the_mount_allowlist_on_the_real_path() {
    let h = Host::new();
    let req = |p: &Path| Request::Mount {
        path: p.as_os_str().as_encoded_bytes().to_vec(),
        flags: 0,
    };
    assert_eq!(
        h.call(req(&h.parent)).await.err(),
        Some(libc::EACCES),
        "parent of the allowed root"
    );
    assert_eq!(
        h.call(req(Path::new("/etc"))).await.err(),
        Some(libc::EACCES)
    );
    // A symlink inside the allowed tree pointing outside is judged by its target.
    std::os::unix::fs::symlink(&h.parent, h.export().join("up")).unwrap();
    assert_eq!(
        h.call(req(&h.export().join("up"))).await.err(),
        Some(libc::EACCES)
    );
    assert_eq!(
        h.call(req(&h.export().join("missing"))).await.err(),
        Some(libc::ENOENT)
    );
    assert_eq!(
        h.call(req(Path::new("relative"))).await.err(),
        Some(libc::EINVAL)
    );
    // A subdirectory of an allowed root is fine.
    assert!(h.call(req(&h.export().join("sub"))).await.is_ok());
}

#[tokio::test]
async fn garbage_and_stale_ids_are_errors_not_panics() {
    let h = Host::new();
    let _root = h.mount().await;
    assert_eq!(
        h.server
            .handle(0x0101, Bytes::from_static(b"\x01\x02"))
            .await
            .err()
            .map(|e| e.0),
        Some(libc::EINVAL)
    );
    assert_eq!(
        h.server
            .handle(0x01fe, Bytes::new())
            .await
            .err()
            .map(|e| e.0),
        Some(libc::EINVAL)
    );
    assert_eq!(h.lookup(999_999, "x").await.err(), Some(libc::ESTALE));
    assert_eq!(
        h.call(Request::Read {
            fh: 424_242,
            offset: 0,
            size: 10
        })
        .await
        .err(),
        Some(libc::EBADF)
    );
}

/// The reconnect requests (Reserve, Relookup, Reopen) as a hostile client could send them:
/// they stay beneath the export, check the HOST file, refuse ids in use or out of range, and
/// Reopen is gated like Open.
#[tokio::test]
async fn reconnect_requests_cannot_escape_or_take_over_ids() {
    let h = Host::new();
    assert_eq!(
        h.call(Request::Reserve { floor: u64::MAX }).await,
        Err(libc::EINVAL),
        "a floor near the counter's end"
    );
    h.call(Request::Reserve { floor: 1000 }).await.unwrap();
    let root = h.mount().await;
    assert!(root.node >= 1000, "new ids start above the floor");
    let sub = h.lookup(root.node, "sub").await.unwrap();
    let relookup = |parent: u64, name: &str, node: u64, ino: u64| Request::Relookup {
        parent,
        name: name.as_bytes().to_vec(),
        node,
        ino,
        nlookup: 1,
    };
    let deeper_ino = fs::metadata(h.export().join("sub/deeper")).unwrap().ino();
    // Names are single components: no way up or out.
    for bad in ["..", ".", "../secret", "deeper/.."] {
        assert_eq!(
            h.call(relookup(sub.node, bad, 50, deeper_ino)).await,
            Err(libc::EINVAL),
            "{bad}"
        );
    }
    // A symlink is registered as the link, never followed.
    let abs_ino = fs::symlink_metadata(h.export().join("abs")).unwrap().ino();
    let e = h
        .entry(relookup(root.node, "abs", 51, abs_ino))
        .await
        .unwrap();
    assert_eq!(e.node, 51);
    assert_eq!(h.read_all(51).await, Err(libc::ELOOP));
    // Another file under the name, an id in use, ids out of range.
    assert_eq!(
        h.call(relookup(sub.node, "deeper", 52, deeper_ino + 1))
            .await,
        Err(libc::ESTALE)
    );
    assert_eq!(
        h.call(relookup(sub.node, "deeper", sub.node, deeper_ino))
            .await,
        Err(libc::EEXIST),
        "the id is taken"
    );
    for id in [0, 1, u64::MAX] {
        assert_eq!(
            h.call(relookup(sub.node, "deeper", id, deeper_ino)).await,
            Err(libc::EINVAL),
            "id {id}"
        );
    }
    let e = h
        .entry(relookup(sub.node, "deeper", 52, deeper_ino))
        .await
        .unwrap();
    assert_eq!((e.node, e.attr.ino), (52, deeper_ino));
    assert_eq!(
        h.call(relookup(sub.node, "deeper", 53, deeper_ino)).await,
        Err(libc::EEXIST),
        "one node per HOST file"
    );
    // Reopen: the ids it may take, and the checks Open makes.
    let reopen = |node: u64, fh: u64, flags: i32, dir: bool| Request::Reopen {
        node,
        fh,
        flags,
        dir,
    };
    assert_eq!(
        h.call(reopen(52, 60, libc::O_RDONLY, true)).await,
        Ok(Response::Opened { fh: 60, flags: 0 })
    );
    assert_eq!(
        h.call(reopen(52, 60, libc::O_RDONLY, true)).await,
        Err(libc::EEXIST)
    );
    assert_eq!(
        h.call(reopen(52, 1 << 60, libc::O_RDONLY, true)).await,
        Err(libc::EINVAL)
    );
    assert_eq!(
        h.call(reopen(51, 61, libc::O_RDONLY, false)).await,
        Err(libc::ELOOP),
        "a symlink is not opened through"
    );
    assert_eq!(
        h.call(reopen(9999, 62, libc::O_RDONLY, false)).await,
        Err(libc::ESTALE),
        "an unknown node"
    );
    h.call(Request::Release { fh: 60 }).await.unwrap();
    assert_eq!(h.server.handle_count(), 0);
}
