//! Unit tests of qtcfg's pure parts: argument parsing, daemon choice, answers and output.

use super::*;
use serde_json::json;

fn argv(args: &[&str]) -> Vec<OsString> {
    std::iter::once("qtcfg")
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect()
}

fn parse(args: &[&str]) -> Invocation {
    match parse_args(argv(args)) {
        Ok(inv) => inv,
        Err(e) => panic!("{args:?}: {e:?}"),
    }
}

fn usage_error(args: &[&str]) -> String {
    match parse_args(argv(args)) {
        Err(ParseStop::Usage(msg)) => msg,
        other => panic!("{args:?}: expected a usage error, got {other:?}"),
    }
}

#[test]
fn parses_the_original_flag_combinations() {
    let cases: &[(&[&str], Action)] = &[
        (&["-z"], Action::List(None)),
        (
            &["-z", "udsconnect"],
            Action::List(Some(ListType::Udsconnect)),
        ),
        (&["-zOPEN"], Action::List(Some(ListType::Open))),
        (
            &["-w", "udsconnect", "-z"],
            Action::List(Some(ListType::Udsconnect)),
        ),
        (&["-z", "-w", "Kill"], Action::List(Some(ListType::Kill))),
        (
            &["-w", "Mount", "-z", "mount"],
            Action::List(Some(ListType::Mount)),
        ),
        (
            &["-w", "UdsConnect", "-x", "/var/run/rexec/"],
            Action::Add {
                list_type: ListType::Udsconnect,
                path: "/var/run/rexec".into(),
            },
        ),
        (
            &["-w", "open", "-x", "//var/./lib/docker/x/.."],
            Action::Add {
                list_type: ListType::Open,
                path: "/var/lib/docker".into(),
            },
        ),
        (
            &["-w", "setxattr", "-y", "3"],
            Action::Delete {
                list_type: ListType::Setxattr,
                index: 3,
            },
        ),
    ];
    for (args, want) in cases {
        let inv = parse(args);
        assert_eq!(&inv.action, want, "{args:?}");
        assert_eq!(inv.target, Target::Auto);
        assert!(!inv.json && !inv.persist);
    }
}

#[test]
fn parses_long_options() {
    let inv = parse(&[
        "--json",
        "--persist",
        "--target",
        "udsproxyd",
        "--run-dir",
        "/tmp/rd",
        "-w",
        "udsconnect",
        "-y",
        "0",
    ]);
    assert!(inv.json && inv.persist);
    assert_eq!(inv.target, Target::Daemon(DaemonName::Udsproxyd));
    assert_eq!(inv.run_dir, PathBuf::from("/tmp/rd"));
    assert_eq!(
        parse(&["--target", "ENGINE", "-z"]).target,
        Target::Daemon(DaemonName::Engine)
    );
    assert_eq!(
        parse(&["--target", "/run/x/mount-7.ctl", "-z"]).target,
        Target::Socket(PathBuf::from("/run/x/mount-7.ctl"))
    );
    assert_eq!(
        parse(&["--target=./engine.ctl", "-z"]).target,
        Target::Socket(PathBuf::from("./engine.ctl"))
    );
}

#[test]
fn usage_errors_are_one_line_and_say_what_to_do() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["-w", "bogus", "-x", "/a"],
            "unknown allowlist type 'bogus': expected one of open,",
        ),
        (&["-z", "bogus"], "unknown allowlist type 'bogus'"),
        (
            &["-w", "udsconnect", "-x", "relative"],
            "\"relative\" is a relative path",
        ),
        (&["-w", "udsconnect", "-x", ""], "empty path"),
        (&["-w", "udsconnect", "-x", "/a\nb"], "control character"),
        (
            &["-w", "udsconnect", "-y", "abc"],
            "index 'abc' is not a number",
        ),
        (
            &["-w", "udsconnect", "-y", "-1"],
            "index '-1' is not a number",
        ),
        (&["-x", "/a"], "-x needs -w TYPE"),
        (&["-y", "0"], "-y needs -w TYPE"),
        (&["-w", "open"], "nothing to do"),
        (&["-w", "open", "-z", "kill"], "name different types"),
        (&["-z", "--persist"], "--persist only applies to -x and -y"),
        (
            &["-w", "open", "-x", "/a", "-y", "0"],
            "cannot be used with",
        ),
        (&["--target", "nobody", "-z"], "unknown target 'nobody'"),
        (&["--bogus"], "unexpected argument '--bogus'"),
    ];
    for (args, fragment) in cases {
        let msg = usage_error(args);
        assert!(msg.contains(fragment), "{args:?}: {msg}");
        assert!(!msg.contains('\n'), "{args:?}: not one line: {msg}");
        assert!(!msg.starts_with("error"), "{args:?}: {msg}");
    }
}

#[test]
fn too_long_path_is_a_usage_error_with_the_limit() {
    let long = format!("/{}", "a".repeat(crate::allowlist::PATH_MAX));
    let msg = usage_error(&["-w", "open", "-x", &long]);
    assert!(msg.contains("4096"), "{msg}");
    assert!(!msg.contains(&long), "the path itself is not echoed");
}

#[test]
fn help_and_no_arguments_go_to_clap() {
    match parse_args(argv(&[])) {
        Err(ParseStop::NoArguments(help)) => assert!(help.contains("Usage: qtcfg"), "{help}"),
        other => panic!("no arguments: {other:?}"),
    }
    for args in [&["--help"][..], &["-h"], &["--version"]] {
        match parse_args(argv(args)) {
            Err(ParseStop::Clap(e)) => {
                let text = e.render().to_string();
                assert!(text.contains("qtcfg"), "{args:?}: {text}");
            }
            other => panic!("{args:?}: {other:?}"),
        }
    }
    let Err(ParseStop::Clap(e)) = parse_args(argv(&["--help"])) else {
        panic!("--help did not stop");
    };
    let help = e.render().to_string();
    for needle in [
        "-w <TYPE>",
        "-x <PATH>",
        "-y <INDEX>",
        "-z [<TYPE>]",
        "--persist",
        "Examples:",
    ] {
        assert!(help.contains(needle), "help lacks {needle}: {help}");
    }
}

// ---------------------------------------------------------------- daemon choice

fn names(v: &[(String, PathBuf)]) -> Vec<&str> {
    v.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn auto_prefers_the_enforcing_daemon_and_falls_back() {
    let rd = Path::new("/rd");
    let both = |_: &Path| true;
    let only_engine = |p: &Path| p == Path::new("/rd/engine.ctl");
    let only_uds = |p: &Path| p == Path::new("/rd/udsproxyd.ctl");
    let uds = Some(ListType::Udsconnect);
    let open = Some(ListType::Open);

    let s = select_sockets(&Target::Auto, uds, rd, both).unwrap();
    assert_eq!(names(&s), ["udsproxyd", "engine"]);
    assert_eq!(s[0].1, PathBuf::from("/rd/udsproxyd.ctl"));
    assert_eq!(
        names(&select_sockets(&Target::Auto, open, rd, both).unwrap()),
        ["engine", "udsproxyd"]
    );
    assert_eq!(
        names(&select_sockets(&Target::Auto, None, rd, both).unwrap()),
        ["engine", "udsproxyd"]
    );
    assert_eq!(
        names(&select_sockets(&Target::Auto, uds, rd, only_engine).unwrap()),
        ["engine"]
    );
    assert_eq!(
        names(&select_sockets(&Target::Auto, open, rd, only_uds).unwrap()),
        ["udsproxyd"]
    );

    let err = select_sockets(&Target::Auto, open, rd, |_| false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no engine or udsproxyd is running (no control socket in /rd): start one, or pass --run-dir/--target"
    );
}

#[test]
fn explicit_targets_do_not_look_for_sockets() {
    let rd = Path::new("/rd");
    let s = select_sockets(
        &Target::Daemon(DaemonName::Engine),
        Some(ListType::Udsconnect),
        rd,
        |_| false,
    )
    .unwrap();
    assert_eq!(s, [("engine".to_string(), PathBuf::from("/rd/engine.ctl"))]);
    let s = select_sockets(&Target::Socket("/x/y.ctl".into()), None, rd, |_| false).unwrap();
    assert_eq!(s, [("/x/y.ctl".to_string(), PathBuf::from("/x/y.ctl"))]);
}

/// A stand-in for the control client's error that wraps an io::Error as its source.
#[derive(Debug, thiserror::Error)]
#[error("connect failed: {0}")]
struct Wrapped(#[source] io::Error);

#[test]
fn connect_failures_are_classified_through_the_source_chain() {
    let sock = Path::new("/rd/engine.ctl");
    let denied = Wrapped(io::Error::from(io::ErrorKind::PermissionDenied));
    let e = connect_failure("engine", sock, &denied, true);
    assert_eq!(
        e.to_string(),
        "permission denied on control socket /rd/engine.ctl: run qtcfg as root"
    );
    assert!(!is_absent(&e));

    let refused = Wrapped(io::Error::from(io::ErrorKind::ConnectionRefused));
    let e = connect_failure("engine", sock, &refused, true);
    assert!(matches!(e, QtcfgError::Stale { .. }), "{e:?}");
    assert!(e
        .to_string()
        .contains("start one, or pass --run-dir/--target"));
    assert!(is_absent(&e));

    let e = connect_failure("engine", sock, &refused, false);
    let msg = e.to_string();
    assert!(
        msg.starts_with("cannot connect to engine at /rd/engine.ctl: connect failed"),
        "{msg}"
    );
    assert!(
        msg.ends_with("is it running? start it, or pass --run-dir/--target"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- answers and output

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn list_output_matches_the_original_lines() {
    let answer = obj(json!({"allowlists": {
        "udsconnect": ["/var/run/test", "/var/run/rexec"],
        "open": [],
        "kill": ["/usr/bin"],
        "futuretype": ["/x"],
    }}));
    let out = Outcome::from_answer(&Action::List(None), false, "engine", &answer).unwrap();
    assert_eq!(
        out.render_text(),
        "Get qtfs <Open> white list:\n\
         Get qtfs <Kill> white list:\n  [index:0][path:/usr/bin]\n\
         Get qtfs <Udsconnect> white list:\n  [index:0][path:/var/run/test]\n  [index:1][path:/var/run/rexec]\n"
    );
    assert_eq!(
        out.render_json(),
        "{\"allowlists\":{\"kill\":[\"/usr/bin\"],\"open\":[],\"udsconnect\":[\"/var/run/test\",\"/var/run/rexec\"]}}\n"
    );
}

#[test]
fn listing_one_type_shows_it_even_when_the_daemon_omits_it() {
    let answer = obj(json!({"allowlists": {"open": ["/a"]}}));
    let out = Outcome::from_answer(
        &Action::List(Some(ListType::Udsconnect)),
        false,
        "e",
        &answer,
    )
    .unwrap();
    assert_eq!(out.render_text(), "Get qtfs <Udsconnect> white list:\n");
    assert_eq!(out.render_json(), "{\"allowlists\":{}}\n");

    let answer = obj(json!({"allowlists": {"udsconnect": ["/var/run/test"]}}));
    let out = Outcome::from_answer(
        &Action::List(Some(ListType::Udsconnect)),
        false,
        "e",
        &answer,
    )
    .unwrap();
    assert_eq!(
        out.render_json(),
        "{\"allowlists\":{\"udsconnect\":[\"/var/run/test\"]}}\n"
    );
}

#[test]
fn add_and_delete_output() {
    let add = Action::Add {
        list_type: ListType::Udsconnect,
        path: "/x".into(),
    };
    let out = Outcome::from_answer(&add, false, "e", &obj(json!({"index": 0}))).unwrap();
    assert_eq!(
        out.render_text(),
        "Added [index:0][path:/x] to the <Udsconnect> white list.\n\
         Live only: pass --persist to also save it in the whitelist file.\n"
    );
    assert_eq!(
        out.render_json(),
        "{\"added\":{\"type\":\"udsconnect\",\"path\":\"/x\",\"index\":0}}\n"
    );

    let del = Action::Delete {
        list_type: ListType::Open,
        index: 2,
    };
    let out =
        Outcome::from_answer(&del, true, "e", &obj(json!({"removed": "/var/lib/docker"}))).unwrap();
    assert_eq!(
        out.render_text(),
        "Removed [index:2][path:/var/lib/docker] from the <Open> white list; later entries moved up by one.\n\
         Saved to the daemon's whitelist file.\n"
    );
    assert_eq!(
        out.render_json(),
        "{\"removed\":{\"type\":\"open\",\"path\":\"/var/lib/docker\",\"index\":2}}\n"
    );
}

#[test]
fn malformed_answers_are_reported_not_panicked_on() {
    let list = Action::List(None);
    let add = Action::Add {
        list_type: ListType::Open,
        path: "/a".into(),
    };
    let del = Action::Delete {
        list_type: ListType::Open,
        index: 0,
    };
    let cases: Vec<(&Action, Value, &str)> = vec![
        (&list, json!({}), "no \"allowlists\" object"),
        (
            &list,
            json!({"allowlists": {"open": "/a"}}),
            "\"open\" is not a list of paths",
        ),
        (
            &list,
            json!({"allowlists": {"open": [1]}}),
            "\"open\" is not a list of paths",
        ),
        (&add, json!({"index": -1}), "no \"index\" number"),
        (&del, json!({"removed": 3}), "no \"removed\" path"),
    ];
    for (action, answer, fragment) in cases {
        let err = Outcome::from_answer(action, false, "engine", &obj(answer)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("unexpected answer from engine"), "{msg}");
        assert!(msg.contains(fragment), "{msg}");
    }
}

#[test]
fn requests_carry_type_path_index_and_persist() {
    let add = Action::Add {
        list_type: ListType::Udsconnect,
        path: "/x".into(),
    };
    assert_eq!(
        add.request(true),
        Request::AllowlistAdd {
            list_type: ListType::Udsconnect,
            path: "/x".into(),
            persist: true
        }
    );
    let del = Action::Delete {
        list_type: ListType::Kill,
        index: 4,
    };
    assert_eq!(
        del.request(false),
        Request::AllowlistDelete {
            list_type: ListType::Kill,
            index: 4,
            persist: false
        }
    );
    assert_eq!(
        Action::List(Some(ListType::Open)).request(false),
        Request::AllowlistList {
            list_type: Some(ListType::Open)
        }
    );
}
