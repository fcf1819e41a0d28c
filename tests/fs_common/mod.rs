//! Shared fixture for the qtfs integration tests (included with `#[path]`): an engine-side
//! executor and a real FUSE mount of a temp HOST dir in this process, over the in-process
//! transport. Needs root and /dev/fuse; otherwise the tests print SKIPPED and return.

#![allow(dead_code)]

use dpuctl::allowlist::ListType;
use dpuctl::fs::client::ClientOptions;
use dpuctl::fs::mount::{mount_with_transport, MountHandle};
use dpuctl::fs::server::{FsPool, FsServer, FsServerOptions, StaticPolicy};
use dpuctl::fs::{FsTransport, InProcessTransport};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Fixture {
    // Field order is drop order: unmount before the runtime and the temp dirs go away.
    pub mount: Option<MountHandle>,
    pub server: Arc<FsServer>,
    pub rt: tokio::runtime::Runtime,
    /// The HOST directory's parent (holds `export/` and things outside it).
    pub host_parent: tempfile::TempDir,
    pub mnt_parent: tempfile::TempDir,
}

impl Fixture {
    pub fn export(&self) -> PathBuf {
        self.host_parent.path().join("export")
    }
    pub fn mnt(&self) -> PathBuf {
        self.mnt_parent.path().join("mnt")
    }

    /// Hands the mount to a new engine-side executor (fresh node and handle tables, as after
    /// an engine restart) allowing the same export, and returns it with what was restored.
    pub fn reattach_to_a_new_engine(&self) -> (Arc<FsServer>, dpuctl::fs::client::Restored) {
        let export = std::fs::canonicalize(self.export()).unwrap();
        let fresh = Arc::new(FsServer::with_policy(
            Arc::new(StaticPolicy::new().with(ListType::Mount, &export)),
            FsServerOptions {
                pool: FsPool::new(2).unwrap(),
            },
        ));
        let client = self.mount.as_ref().expect("mounted").client();
        let transport = Arc::new(InProcessTransport::new(fresh.clone()));
        let restored = self
            .rt
            .block_on(client.reattach(transport))
            .expect("reattach");
        (fresh, restored)
    }
}

pub fn can_mount() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root (FUSE mount needs it)".into());
    }
    Ok(())
}

/// Mounts a fresh `export/` dir. `policy` receives the canonical export path and returns the
/// policy (it must allow Mount of that path for the mount to succeed).
pub fn setup_with(
    policy: impl FnOnce(&Path) -> StaticPolicy,
    opts: ClientOptions,
    wrap: impl FnOnce(Arc<dyn FsTransport>) -> Arc<dyn FsTransport>,
) -> Option<Fixture> {
    if let Err(why) = can_mount() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let host_parent = tempfile::Builder::new()
        .prefix("qtfs-host")
        .tempdir()
        .unwrap();
    let mnt_parent = tempfile::Builder::new()
        .prefix("qtfs-mnt")
        .tempdir()
        .unwrap();
    std::fs::create_dir(host_parent.path().join("export")).unwrap();
    std::fs::create_dir(mnt_parent.path().join("mnt")).unwrap();
    let export = std::fs::canonicalize(host_parent.path().join("export")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let pool = FsPool::new(4).unwrap();
    let server = Arc::new(FsServer::with_policy(
        Arc::new(policy(&export)),
        FsServerOptions { pool },
    ));
    let transport = wrap(Arc::new(InProcessTransport::new(server.clone())));
    let mnt = mnt_parent.path().join("mnt");
    let mount = rt
        .block_on(mount_with_transport(transport, &export, &mnt, opts))
        .expect("mount");
    Some(Fixture {
        mount: Some(mount),
        server,
        rt,
        host_parent,
        mnt_parent,
    })
}

pub fn setup() -> Option<Fixture> {
    setup_opts(ClientOptions::default())
}

/// [`setup`] with these mount options.
pub fn setup_opts(opts: ClientOptions) -> Option<Fixture> {
    setup_with(
        |p| StaticPolicy::new().with(ListType::Mount, p),
        opts,
        |t| t,
    )
}

/// errno of an io::Error, or 0 for success, for transcript comparisons.
pub fn code<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}
