//! Load: 10,000 log events a second must scroll through the dashboard's log view without it
//! falling more than a second behind.
//!
//! The source is a synthetic daemon speaking the real control protocol on a Unix socket
//! (`status` answers, `logs {follow}` streams [`LogEvent`] lines), because no real daemon
//! can be made to log at an exact rate. Each event is stamped with the time it was *due*
//! (start + seq/10,000 s), so backpressure from a slow reader shows up as lag instead of
//! hiding in the generator. The dashboard runs for real in tmux; the newest event on its
//! screen must be less than a second old.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dpuctl::daemon::logring::{now_ms, LogEvent};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const RATE: u64 = 10_000;

fn tmux(socket: &str, args: &[&str]) -> Output {
    Command::new("tmux")
        .args(["-L", socket])
        .args(args)
        .env_remove("TMUX")
        .output()
        .expect("run tmux")
}

fn status_line() -> String {
    let status = serde_json::json!({
        "ok": true,
        "status": {
            "name": "flood", "pid": std::process::id(), "control": "", "version": "test",
            "uptime_secs": 1, "peers": [],
        }
    });
    format!("{status}\n")
}

/// Streams events at RATE per second, stamped with their due time, until the client leaves.
async fn stream_events(mut w: tokio::net::unix::OwnedWriteHalf) {
    let start = now_ms();
    let started = tokio::time::Instant::now();
    let mut seq: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        // Catch up to where the schedule says we should be.
        let due = started.elapsed().as_millis() as u64 * RATE / 1000;
        let mut buf = String::new();
        while seq < due {
            let ev = LogEvent {
                ts_ms: start + seq * 1000 / RATE,
                level: if seq % 100 == 0 { "warn" } else { "info" }.into(),
                daemon: "flood".into(),
                target: "flood".into(),
                message: format!("flood seq={seq} due={}", start + seq * 1000 / RATE),
                fields: Default::default(),
            };
            buf.push_str(&serde_json::to_string(&ev).expect("encode"));
            buf.push('\n');
            seq += 1;
        }
        if w.write_all(buf.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn serve(listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"logs\"") {
                    if w.write_all(b"{\"ok\":true}\n").await.is_ok() {
                        stream_events(w).await;
                    }
                    return;
                }
                if w.write_all(status_line().as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[test]
fn ten_thousand_events_a_second_stay_within_a_second() {
    let tmux_ok = Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !tmux_ok {
        eprintln!(
            "SKIPPED {}: tmux is not installed (scripts/deps.sh)",
            module_path!()
        );
        return;
    }
    let scratch = common::Scratch::new();
    let run = scratch.path("run");
    std::fs::create_dir(&run).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(run.join("flood.ctl")) })
        .expect("bind the synthetic daemon");
    rt.spawn(serve(listener));

    let socket = format!("dpuctl-flood-{}", std::process::id());
    let script = format!(
        "{} tui --no-color --run-dir {}",
        common::bin().display(),
        run.display()
    );
    let out = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "40",
            "-s",
            "t",
            &script,
        ],
    );
    assert!(out.status.success(), "{}", common::text(&out));
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            tmux(&self.0, &["kill-server"]);
        }
    }
    let _kill = Kill(socket.clone());
    tmux(&socket, &["send-keys", "-t", "t", "5"]);

    // Let the flood run, then sample the screen for a few seconds.
    std::thread::sleep(Duration::from_secs(3));
    let mut worst = 0u64;
    let mut samples = 0;
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        let screen =
            String::from_utf8_lossy(&tmux(&socket, &["capture-pane", "-p", "-t", "t"]).stdout)
                .into_owned();
        let captured = now_ms();
        let newest = screen
            .lines()
            .filter_map(|l| l.split("due=").nth(1))
            .filter_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        let Some(newest) = newest else {
            panic!("no flood events on screen:\n{screen}");
        };
        worst = worst.max(captured.saturating_sub(newest));
        samples += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(samples >= 5);
    assert!(
        worst < 1_000,
        "the log view fell {worst} ms behind a {RATE}/s flood"
    );
    eprintln!("flood: worst lag {worst} ms over {samples} samples at {RATE} events/s");
}
