//! The multi-call binary as a user meets it: link names, `--help`, keygen, config check,
//! install.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{dpuctl, s, text, Scratch};

/// Each link name, and a phrase its `--help` must show.
const NAMES: &[(&str, &str)] = &[
    ("engine", "engine <threads> <uds threads> <host addr>"),
    (
        "udsproxyd",
        "udsproxyd <thread num> <addr> <port> <peer addr> <peer port>",
    ),
    ("qtcfg", "-w"),
    ("mount.qtfs", "mount -t qtfs"),
];

#[test]
fn every_link_name_shows_its_own_help() {
    let scratch = Scratch::new();
    for (name, phrase) in NAMES {
        let link = scratch.path(name);
        std::os::unix::fs::symlink(common::bin(), &link).unwrap();
        let out = Command::new(&link).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name}: {}", text(&out));
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains(phrase),
            "{name} --help lacks {phrase:?}:\n{help}"
        );
        // The same tool as a subcommand.
        let sub = name.strip_suffix(".qtfs").unwrap_or(name);
        let out = dpuctl(&[sub, "--help"]);
        assert!(out.status.success(), "dpuctl {name}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(phrase));
    }
    let out = dpuctl(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for (name, _) in NAMES {
        let name = name.strip_suffix(".qtfs").unwrap_or(name);
        assert!(help.contains(name), "dpuctl --help lists {name}:\n{help}");
    }
    let out = dpuctl(&["no-such-tool"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn keygen_writes_a_private_key_once() {
    let scratch = Scratch::new();
    let key = scratch.path("sub/dir/psk");
    let out = dpuctl(&["keygen", s(&key)]);
    assert!(out.status.success(), "{}", text(&out));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = std::fs::read(&key).unwrap();
    let out = dpuctl(&["keygen", s(&key)]);
    assert!(
        !out.status.success(),
        "refuses to overwrite: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read(&key).unwrap(), first, "old key untouched");
    let out = dpuctl(&["keygen", s(&key), "--force", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(std::fs::read(&key).unwrap(), first);
}

#[test]
fn config_check_names_the_line_and_the_fix() {
    let scratch = Scratch::new();
    let bad = scratch.write("bad.toml", "[engine]\nthreads = 4\nlisten = \"ftp://x\"\n[common]\ninsecure = true\nwhitelist = \"/nonexistent\"\n");
    let out = dpuctl(&["config", "check", s(&bad)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(msg.contains("engine.listen"), "{msg}");
    let typo = scratch.write(
        "typo.toml",
        "[udsproxyd]\npeer = \"tcp://127.0.0.1:1\"\nthreds = 2\n",
    );
    let out = dpuctl(&["config", "check", s(&typo)]);
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(msg.contains("line 3") && msg.contains("threds"), "{msg}");
    let key = scratch.key("psk");
    let good = scratch.write(
        "good.toml",
        &format!(
            "[common]\nkey_file = \"{}\"\nwhitelist = \"/nonexistent\"\n",
            s(&key)
        ),
    );
    let out = dpuctl(&["config", "check", s(&good), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], true);
    // `show` prints the effective config, which parses back.
    let out = dpuctl(&["config", "show", s(&good)]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("listen = \"tcp://0.0.0.0:12345\""),
        "{shown}"
    );
}

#[test]
fn install_creates_links_that_work_and_is_idempotent() {
    let scratch = Scratch::new();
    let prefix = scratch.path("prefix");
    let out = dpuctl(&["install", "--prefix", s(&prefix)]);
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new(prefix.join("bin/qtcfg"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("-w"),
        "{}",
        text(&out)
    );
    assert!(prefix.join("sbin/mount.qtfs").symlink_metadata().is_ok());
    for script in [
        "share/bash-completion/completions/dpuctl",
        "share/bash-completion/completions/rexec",
        "share/zsh/vendor-completions/_qtcfg",
        "share/fish/vendor_completions.d/udsproxyd.fish",
    ] {
        let text = std::fs::read_to_string(prefix.join(script)).unwrap_or_default();
        assert!(text.contains("--help"), "{script}: {text}");
    }
    let out = Command::new(prefix.join("bin/dpuctl"))
        .args(["install", "--json", "--prefix", s(&prefix)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["actions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["action"] == "unchanged"),
        "second run changes nothing: {v}"
    );
}

#[test]
fn man_prints_a_page_lists_them_and_writes_them() {
    let out = dpuctl(&["man", "rexec"]);
    assert!(out.status.success(), "{}", text(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.contains(".TH REXEC 1 ") && page.contains(".SH OPTIONS"),
        "{page}"
    );
    let out = dpuctl(&["man", "--list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["file"].as_str())
        .collect();
    for want in [
        "dpuctl.8",
        "engine.8",
        "udsproxyd.8",
        "mount.qtfs.8",
        "rexec.1",
        "rexec_server.8",
        "qtcfg.8",
    ] {
        assert!(files.contains(&want), "{want} missing from {files:?}");
    }
    let out = dpuctl(&["man", "nonesuch"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("dpuctl man --list"), "{}", text(&out));
    let scratch = Scratch::new();
    let dir = scratch.path("man");
    let out = dpuctl(&["man", "--out-dir", s(&dir)]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        files.len(),
        "one line per page"
    );
    // man(1) reads the written page.
    let out = Command::new("man")
        .args(["-l", s(&dir.join("man8/mount.qtfs.8"))])
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .output();
    match out {
        Ok(out) => {
            assert!(out.status.success(), "{}", text(&out));
            assert!(String::from_utf8_lossy(&out.stdout).contains("reconnect_wait"));
        }
        Err(e) => eprintln!("SKIPPED the man(1) check: man is not installed ({e})"),
    }
}

/// What bash offers for `words` (the last one being completed), with the `program` script
/// `dpuctl completions bash` prints loaded the way bash-completion loads it.
fn bash_offers(program: &str, words: &[&str]) -> Option<Vec<String>> {
    let out = dpuctl(&["completions", "bash", program]);
    assert!(out.status.success(), "{}", text(&out));
    let script = String::from_utf8(out.stdout).unwrap();
    let cword = words.len() - 1;
    let prev = if cword > 0 { words[cword - 1] } else { "" };
    let code = format!(
        "{script}\nCOMP_WORDS=({}); COMP_CWORD={cword}; _{} {} '{}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
        program.replace(['.', '-'], "__"),
        program,
        words[cword],
    );
    let out = Command::new("bash").arg("-c").arg(&code).output().ok()?;
    assert!(out.status.success(), "{}", text(&out));
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn bash_completes_tools_and_their_options() {
    let Some(tools) = bash_offers("dpuctl", &["dpuctl", "rex"]) else {
        eprintln!("SKIPPED bash_completes_tools_and_their_options: bash is not installed");
        return;
    };
    assert_eq!(tools, ["rexec", "rexec_server"]);
    let options = bash_offers("dpuctl", &["dpuctl", "rexec", "--env"]).unwrap();
    assert_eq!(options, ["--env-only"]);
    let options = bash_offers("rexec", &["rexec", "--env"]).unwrap();
    assert_eq!(options, ["--env-only"]);
    let options = bash_offers("qtcfg", &["qtcfg", "-"]).unwrap();
    assert!(options.iter().any(|o| o == "-w"), "{options:?}");
    let out = dpuctl(&["completions", "bash", "mount.qtfs"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("give one of: dpuctl, engine"),
        "{}",
        text(&out)
    );
}
