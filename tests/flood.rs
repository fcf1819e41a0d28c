//! Hostile bytes at the engine's port: 10,000 random byte strings, truncated and oversized
//! frames before and after authentication, and slow-loris connections. The engine must stay
//! up, log the rejects with the peer address, and serve a good client afterwards.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{s, Scratch};
use dpuctl::wire::{self, Addr, Auth, Hello, LinkOptions, Psk, Role};
use tokio::io::AsyncWriteExt;

/// xorshift64*: deterministic, dependency-free test randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

struct Engine {
    child: Child,
    log: std::path::PathBuf,
}
impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hello() -> Hello {
    Hello {
        role: Role::Client,
        instance: 7,
        name: "flood-test".into(),
    }
}

#[test]
fn engine_survives_garbage_and_serves_a_good_client() {
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let port = common::free_port();
    let addr: Addr = format!("tcp://127.0.0.1:{port}").parse().unwrap();
    let log = scratch.path("engine.log");
    let child = Command::new(common::bin())
        .args(["engine", "--no-uds", "--listen"])
        .arg(addr.to_string())
        .args(["--key", s(&key), "--run-dir", s(&scratch.path("run"))])
        .args([
            "--whitelist",
            s(&scratch.write("wl", "[Mount]\nPath=/tmp\n")),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut engine = Engine { child, log };
    let psk = Arc::new(Psk::load(&key).unwrap());
    let auth = Auth::Psk(psk);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Wait for the engine to listen.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "engine did not start: {}",
                std::fs::read_to_string(&engine.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Slow loris: a few bytes, then silence, held through the whole flood.
        let mut lorises = Vec::new();
        for _ in 0..20 {
            let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let _ = c.write_all(&[0x44, 0x50, 0x55]).await;
            lorises.push(c);
        }

        // 10,000 random byte strings, 64 connections at a time.
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for i in 0..10_000u32 {
            let len = (rng.next() % 600) as usize;
            let mut payload = rng.bytes(len);
            // Every tenth: a frame-shaped header claiming a huge length; every tenth+1: cut short.
            if i % 10 == 0 && payload.len() >= 4 {
                payload[..4].copy_from_slice(&u32::MAX.to_be_bytes());
            } else if i % 10 == 1 {
                payload.truncate(3);
            }
            let permit = sem.clone().acquire_owned().await.unwrap();
            tasks.spawn(async move {
                let _permit = permit;
                if let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = c.write_all(&payload).await;
                    let _ = c.shutdown().await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}

        // Authenticated peers that then send broken frames: oversized, truncated, garbage.
        for (n, bad) in [
            vec![0xFF, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            vec![0, 0, 0, 8, 1, 0],
            rng.bytes(4096),
        ]
        .into_iter()
        .enumerate()
        {
            let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            wire::handshake::client(
                &mut c,
                &addr.to_string(),
                &auth,
                &hello(),
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|e| panic!("case {n}: handshake with the right key failed: {e}"));
            let _ = c.write_all(&bad).await;
            let _ = c.shutdown().await;
        }

        // A good client is served promptly.
        let started = Instant::now();
        let link = wire::dial(
            &addr,
            &auth,
            &hello(),
            Arc::new(wire::NoService),
            LinkOptions::default(),
        )
        .await
        .expect("a good client connects after the flood");
        let rtt = link.ping().await.expect("ping answered");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "served in {:?}",
            started.elapsed()
        );
        assert!(rtt < Duration::from_secs(1), "rtt {rtt:?}");
        drop(lorises);
    });

    assert!(
        matches!(engine.child.try_wait(), Ok(None)),
        "engine still running"
    );
    // Rejects are logged with the peer address; the status counts them.
    let log = std::fs::read_to_string(&engine.log).unwrap();
    assert!(
        log.contains("127.0.0.1:"),
        "rejects name the peer address:\n{}",
        &log[..log.len().min(4000)]
    );
    let out = common::dpuctl(&["status", "--json", "--run-dir", s(&scratch.path("run"))]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let refused = st["daemons"][0]["counters"]["handshakes_refused"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        refused >= 9_000,
        "handshakes refused counted: {refused}\n{st}"
    );
    let _ = engine.child.kill();
}
