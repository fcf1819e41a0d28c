//! Manual pages, made from the same text `--help` prints, so the two never disagree.
//!
//! Each tool's clap command gives NAME, SYNOPSIS, DESCRIPTION, OPTIONS and SUBCOMMANDS
//! (through `clap_mangen`); the paragraphs of its after-help that start with a known heading
//! ("Examples:", "Exit status:", "Environment:", "Files:") become sections of those names, and
//! any other paragraph goes to NOTES. `mount.qtfs` parses its own options (mount(8) syntax),
//! so its page is made from its help text the same way. `dpuctl man` prints a page or writes
//! them all; `dpuctl install` puts them under PREFIX/share/man.

use std::path::{Path, PathBuf};

use clap_mangen::roff::{bold, roman, Roff};

/// One manual page.
pub struct Page {
    /// File name without the section: `rexec`, `dpuctl-status`.
    pub name: &'static str,
    /// `1` for commands users run, `8` for daemons and administration.
    pub section: &'static str,
    source: Source,
}

enum Source {
    Clap(fn() -> clap::Command),
    /// A help text in the layout of `mount.qtfs --help`: first line "name - summary",
    /// then paragraphs; "Usage:" gives the synopsis.
    Text(&'static str),
}

/// Every page, the main one first.
pub fn pages() -> Vec<Page> {
    let clap = |name, section, f| Page {
        name,
        section,
        source: Source::Clap(f),
    };
    vec![
        clap("dpuctl", "8", crate::cli::top_command),
        clap("engine", "8", crate::daemon::engine::command),
        clap("udsproxyd", "8", crate::uds::command),
        Page {
            name: "mount.qtfs",
            section: "8",
            source: Source::Text(crate::fs::mount::HELP),
        },
        clap("rexec", "1", crate::exec::client::command),
        clap("rexec_server", "8", crate::exec::server::command),
        clap("qtcfg", "8", crate::allowlist::qtcfg::command),
        clap("dpuctl-status", "8", crate::daemon::tools::status_cli),
        clap("dpuctl-logs", "8", crate::daemon::tools::logs_cli),
        clap("dpuctl-tui", "8", crate::tui::command),
        clap("dpuctl-demo", "8", crate::demo::command),
        clap("dpuctl-install", "8", crate::cli::install_command),
        clap("dpuctl-keygen", "8", crate::cli::keygen_command),
        clap("dpuctl-config", "8", crate::cli::config_command),
        clap("dpuctl-uds-connect", "8", crate::uds::connect::command),
        clap("dpuctl-man", "8", crate::cli::man_command),
        clap("dpuctl-completions", "8", crate::cli::completions_command),
    ]
}

/// The page called `name` (with or without its section: `rexec`, `rexec.1`), or for a tool
/// of `dpuctl` its page (`status` finds `dpuctl-status`).
pub fn find(name: &str) -> Option<Page> {
    let bare = name
        .rsplit_once('.')
        .filter(|(_, s)| s.len() == 1 && s.chars().all(|c| c.is_ascii_digit()))
        .map_or(name, |(b, _)| b);
    // `dpuctl mount` is the mount.qtfs helper.
    let bare = if bare == "mount" { "mount.qtfs" } else { bare };
    let prefixed = format!("dpuctl-{bare}");
    pages()
        .into_iter()
        .find(|p| p.name == bare || p.name == prefixed)
}

impl Page {
    /// `rexec.1`.
    pub fn file_name(&self) -> String {
        format!("{}.{}", self.name, self.section)
    }

    /// Where the page goes under a man directory: `DIR/man1/rexec.1`.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(format!("man{}", self.section))
            .join(self.file_name())
    }

    /// The clap command the page is made from; None for `mount.qtfs`, whose help is text.
    pub fn command(&self) -> Option<clap::Command> {
        match &self.source {
            Source::Clap(command) => Some(command()),
            Source::Text(_) => None,
        }
    }

    /// The page as roff (man(7) macros).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let source = format!("dpuctl {}", env!("CARGO_PKG_VERSION"));
        let title = self.name.to_uppercase();
        match &self.source {
            Source::Clap(command) => {
                let cmd = command();
                let man = clap_mangen::Man::new(cmd.clone())
                    .title(title)
                    .section(self.section)
                    .source(source)
                    .manual("dpuctl manual");
                let mut head = Roff::default();
                let mut tail = Roff::default();
                name_section(&mut head, self.name, cmd.get_about().map(|a| a.to_string()));
                let notes = cmd
                    .get_after_long_help()
                    .or_else(|| cmd.get_after_help())
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                text_sections(&mut tail, &notes, "NOTES");
                see_also(&mut tail, self.name);
                // Writing into a Vec cannot fail.
                let _ = man.render_title(&mut out);
                let _ = head.to_writer(&mut out);
                let _ = man.render_synopsis_section(&mut out);
                let _ = man.render_description_section(&mut out);
                if cmd.get_arguments().any(|a| !a.is_hide_set()) {
                    let _ = man.render_options_section(&mut out);
                }
                let mut subs = Roff::default();
                subcommands(&mut subs, &cmd);
                let _ = subs.to_writer(&mut out);
                let _ = tail.to_writer(&mut out);
            }
            Source::Text(help) => {
                let mut roff = Roff::default();
                roff.control(
                    "TH",
                    [title.as_str(), self.section, "", &source, "dpuctl manual"],
                );
                let (first, rest) = help.split_once('\n').unwrap_or((help, ""));
                let summary = first.split_once(" - ").map(|(_, s)| s.to_string());
                name_section(&mut roff, self.name, summary);
                text_sections(&mut roff, rest, "DESCRIPTION");
                see_also(&mut roff, self.name);
                let _ = roff.to_writer(&mut out);
            }
        }
        once_preamble(&String::from_utf8_lossy(&out))
    }
}

/// Each piece rendered on its own starts with roff's two-line quote preamble; the page needs
/// it once, at the top.
fn once_preamble(page: &str) -> String {
    let mut seen = false;
    let mut out = String::with_capacity(page.len());
    let mut lines = page.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with(".ie \\n(.g .ds Aq") {
            let next = lines.peek().copied().unwrap_or_default();
            if seen && next.starts_with(".el .ds Aq") {
                lines.next();
                continue;
            }
            seen = true;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The tools of `dpuctl` (or the actions of `dpuctl config`), each with the page that
/// describes it where there is one.
fn subcommands(roff: &mut Roff, cmd: &clap::Command) {
    let visible: Vec<_> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    if visible.is_empty() {
        return;
    }
    roff.control("SH", ["COMMANDS"]);
    for sub in visible {
        roff.control("TP", []);
        roff.text([bold(format!("{} {}", cmd.get_name(), sub.get_name()))]);
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        match find(sub.get_name()) {
            Some(page) => roff.text([
                roman(format!("{about}; see ")),
                bold(page.name),
                roman(format!("({}).", page.section)),
            ]),
            None => roff.text([roman(about)]),
        };
    }
}

fn name_section(roff: &mut Roff, name: &str, about: Option<String>) {
    roff.control("SH", ["NAME"]);
    match about {
        Some(about) => roff.text([roman(format!("{name} - {about}"))]),
        None => roff.text([roman(name)]),
    };
}

/// The section a help paragraph's first line names, and what follows the heading on it.
fn heading(line: &str) -> Option<(&'static str, &str)> {
    const KNOWN: &[(&str, &str)] = &[
        ("Usage:", "SYNOPSIS"),
        ("Examples:", "EXAMPLES"),
        ("Exit status:", "EXIT STATUS"),
        ("Environment:", "ENVIRONMENT"),
        ("Files:", "FILES"),
        ("Options (-o, comma-separated):", "MOUNT OPTIONS"),
        ("Flags:", "OPTIONS"),
    ];
    KNOWN
        .iter()
        .find_map(|(h, section)| line.strip_prefix(h).map(|rest| (*section, rest.trim())))
}

/// Turns help paragraphs into sections: one with a known heading becomes that section (its
/// indented lines kept as they are, since they are tables and examples); plain paragraphs go
/// to `plain` until the first heading other than a synopsis, to NOTES after it.
fn text_sections(roff: &mut Roff, text: &str, plain: &'static str) {
    let mut sections: Vec<(&'static str, Vec<&str>)> = Vec::new();
    let mut seen_heading = false;
    for para in text
        .split("\n\n")
        .map(|p| p.trim_start_matches('\n').trim_end())
        .filter(|p| !p.trim().is_empty())
    {
        let mut lines = para.lines();
        let first = lines.next().unwrap_or_default();
        match heading(first) {
            Some((section, rest)) => {
                seen_heading |= section != "SYNOPSIS";
                let mut body: Vec<&str> = Vec::new();
                if !rest.is_empty() {
                    body.push(rest);
                }
                body.extend(lines);
                sections.push((section, body));
            }
            None => {
                let section = if seen_heading { "NOTES" } else { plain };
                match sections.last_mut() {
                    Some((s, body)) if *s == section => {
                        body.push("");
                        body.extend(para.lines());
                    }
                    _ => sections.push((section, para.lines().collect())),
                }
            }
        }
    }
    for (section, body) in sections {
        roff.control("SH", [section]);
        write_body(roff, &body);
    }
}

/// Lines that start with spaces are kept as they are (no filling); others are running text.
fn write_body(roff: &mut Roff, body: &[&str]) {
    let mut verbatim = false;
    for line in body {
        let indented = line.starts_with(' ');
        if line.is_empty() {
            if verbatim {
                roff.control("fi", []);
                verbatim = false;
            }
            roff.control("PP", []);
            continue;
        }
        if indented != verbatim {
            roff.control(if indented { "nf" } else { "fi" }, []);
            verbatim = indented;
        }
        roff.text([roman(*line)]);
    }
    if verbatim {
        roff.control("fi", []);
    }
}

fn see_also(roff: &mut Roff, this: &str) {
    roff.control("SH", ["SEE ALSO"]);
    let mut refs = Vec::new();
    for page in pages().iter().filter(|p| p.name != this) {
        if !refs.is_empty() {
            refs.push(roman(", "));
        }
        refs.push(bold(page.name));
        refs.push(roman(format!("({})", page.section)));
    }
    refs.push(roman(
        ". The documentation in docs/ of the dpuctl sources has the full guides \
         (qtfs.md, udsproxyd.md, rexec.md, allowlists.md, protocol.md).",
    ));
    roff.text(refs);
}

/// Writes every page under `dir` (`dir/man1`, `dir/man8`): (path, changed). A page whose
/// file already has the same text is left alone; with `dry_run` nothing is written.
pub fn write_all(dir: &Path, dry_run: bool) -> std::io::Result<Vec<(PathBuf, bool)>> {
    let mut done = Vec::new();
    for page in pages() {
        let path = page.path_in(dir);
        let text = page.render();
        let same = std::fs::read_to_string(&path).is_ok_and(|t| t == text);
        if !same && !dry_run {
            replace_file(&path, &text)?;
        }
        done.push((path, !same));
    }
    Ok(done)
}

/// Writes `text` to `path` through a temporary file renamed over it (a reader sees the old
/// file or the new one, never half of one), creating the directories on the way.
pub(crate) fn replace_file(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_has_the_sections_a_reader_looks_for() {
        for page in pages() {
            let text = page.render();
            let title = format!("\n.TH {} {} ", page.name.to_uppercase(), page.section);
            assert!(text.contains(&title), "{}: {}", page.name, &text[..120]);
            assert_eq!(
                text.matches(".ds Aq").count(),
                2,
                "{}: one preamble",
                page.name
            );
            for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"] {
                assert!(
                    text.contains(&format!(".SH {section}"))
                        || text.contains(&format!(".SH \"{section}\"")),
                    "{} lacks {section}",
                    page.name
                );
            }
            assert!(
                !text.contains("\n.SH EXTRA"),
                "{}: after-help left in a generic section",
                page.name
            );
        }
    }

    #[test]
    fn help_headings_become_their_own_sections() {
        let rexec = find("rexec").expect("rexec page").render();
        for section in ["\"EXIT STATUS\"", "ENVIRONMENT", "EXAMPLES", "OPTIONS"] {
            assert!(
                rexec.contains(&format!(".SH {section}")),
                "rexec lacks {section}"
            );
        }
        assert!(rexec.contains("CMD_NET_ADDR"));
        let mount = find("mount.qtfs").expect("mount.qtfs page").render();
        for section in [
            "SYNOPSIS",
            "\"MOUNT OPTIONS\"",
            "EXAMPLES",
            "\"EXIT STATUS\"",
        ] {
            assert!(
                mount.contains(&format!(".SH {section}")),
                "mount.qtfs lacks {section}"
            );
        }
        assert!(mount.contains("reconnect_wait"));
        let engine = find("engine.8").expect("engine page").render();
        assert!(engine.contains(".SH FILES") && engine.contains("/etc/qtfs/whitelist"));
    }

    #[test]
    fn pages_are_found_by_name_section_or_tool() {
        assert_eq!(find("rexec.1").map(|p| p.name), Some("rexec"));
        assert_eq!(find("status").map(|p| p.name), Some("dpuctl-status"));
        assert_eq!(find("mount").map(|p| p.name), Some("mount.qtfs"));
        assert_eq!(
            find("dpuctl-status.8").map(|p| p.name),
            Some("dpuctl-status")
        );
        assert!(find("nonesuch").is_none());
    }

    /// groff formats every page without a warning (a stray macro or escape would show).
    #[test]
    fn groff_formats_every_page_cleanly() {
        if std::process::Command::new("groff")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED groff_formats_every_page_cleanly: groff is not installed (apt-get install groff-base)");
            return;
        }
        for page in pages() {
            let mut child = std::process::Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("groff runs");
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(page.render().as_bytes())
                .expect("write page");
            let out = child.wait_with_output().expect("groff finishes");
            let warnings = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && warnings.trim().is_empty(),
                "{}: groff said: {warnings}",
                page.name
            );
        }
    }

    #[test]
    fn write_all_writes_then_leaves_unchanged_pages_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = write_all(dir.path(), false).expect("write");
        assert_eq!(first.len(), pages().len());
        assert!(first.iter().all(|(p, changed)| *changed && p.is_file()));
        assert!(dir.path().join("man1/rexec.1").is_file());
        assert!(dir.path().join("man8/mount.qtfs.8").is_file());
        let again = write_all(dir.path(), false).expect("write again");
        assert!(again.iter().all(|(_, changed)| !changed));
    }
}
