//! Shell completions, made from the same clap commands as `--help` and the manual pages, so
//! the three never disagree. `dpuctl completions SHELL [PROGRAM]` prints a script;
//! `dpuctl install` writes the bash, zsh and fish scripts of `dpuctl` and of every tool link
//! where those shells look for them.
//!
//! `dpuctl`'s script completes each tool's own options after the tool's name (`dpuctl rexec
//! --env-<TAB>`), although the top-level parser only picks the tool: the tree is rebuilt from
//! every tool's command. `mount.qtfs` parses mount(8) options itself and gets no script (its
//! options are a single `-o` list).

use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// The programs that get a script: `dpuctl`, then the tool links whose parser is clap's.
pub fn programs() -> Vec<&'static str> {
    std::iter::once("dpuctl")
        .chain(
            crate::cli::LINK_NAMES
                .iter()
                .map(|(name, _)| *name)
                .filter(|name| tool_command(name).is_some()),
        )
        .collect()
}

/// A tool's command, named as it is invoked (`status`, `rexec`), or None when it is not
/// parsed by clap.
fn tool_command(name: &str) -> Option<clap::Command> {
    let page = crate::man::find(name)?;
    Some(page.command()?.name(name.to_string()).bin_name(name))
}

/// The command tree a shell completes for `program` (`dpuctl` or a tool link name).
pub fn command_for(program: &str) -> Option<clap::Command> {
    if program != "dpuctl" {
        let is_link = crate::cli::LINK_NAMES
            .iter()
            .any(|(name, _)| *name == program);
        return tool_command(program).filter(|_| is_link);
    }
    let mut top = crate::cli::top_command();
    let names: Vec<String> = top
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        if let Some(tool) = tool_command(&name) {
            top = top.mut_subcommand(&name, |sub| {
                let mut tool = tool.bin_name(format!("dpuctl {name}"));
                if let Some(about) = sub.get_about() {
                    tool = tool.about(about.clone());
                }
                tool
            });
        }
    }
    Some(top)
}

/// The completion script of `program` for `shell`, or None for an unknown program.
pub fn script(shell: Shell, program: &str) -> Option<String> {
    let mut cmd = command_for(program)?;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, program, &mut out);
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Where `shell` looks for the script of `program` under `prefix` (`/usr`): the directories
/// bash-completion, zsh and fish packages install into. None for shells without one.
pub fn install_path(prefix: &Path, shell: Shell, program: &str) -> Option<PathBuf> {
    let share = prefix.join("share");
    match shell {
        Shell::Bash => Some(share.join("bash-completion/completions").join(program)),
        Shell::Zsh => Some(
            share
                .join("zsh/vendor-completions")
                .join(format!("_{program}")),
        ),
        Shell::Fish => Some(
            share
                .join("fish/vendor_completions.d")
                .join(format!("{program}.fish")),
        ),
        _ => None,
    }
}

/// One script written (or that would be) by [`write_all`].
pub struct Written {
    pub path: PathBuf,
    pub shell: Shell,
    pub program: &'static str,
    /// False when the file already had this text and was left alone.
    pub changed: bool,
}

/// Writes the bash, zsh and fish scripts of every program under `prefix`. A file that
/// already has the same text is left alone; with `dry_run` nothing is written.
pub fn write_all(prefix: &Path, dry_run: bool) -> std::io::Result<Vec<Written>> {
    let mut done = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        for program in programs() {
            let (Some(path), Some(text)) =
                (install_path(prefix, shell, program), script(shell, program))
            else {
                continue;
            };
            let changed = std::fs::read_to_string(&path).map_or(true, |t| t != text);
            if changed && !dry_run {
                crate::man::replace_file(&path, &text)?;
            }
            done.push(Written {
                path,
                shell,
                program,
                changed,
            });
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_has_a_script_for_every_shell() {
        assert_eq!(
            programs(),
            [
                "dpuctl",
                "engine",
                "udsproxyd",
                "qtcfg",
                "rexec",
                "rexec_server"
            ]
        );
        for program in programs() {
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish, Shell::Elvish] {
                let text = script(shell, program).expect("a script");
                assert!(text.contains(program), "{shell} {program}");
                assert!(text.contains("help"), "{shell} {program}: options missing");
            }
        }
        assert!(script(Shell::Bash, "mount.qtfs").is_none());
        assert!(script(Shell::Bash, "sh").is_none());
    }

    #[test]
    fn dpuctl_completes_each_tools_own_options() {
        let bash = script(Shell::Bash, "dpuctl").unwrap();
        for option in [
            "--env-only",
            "--uds-threads",
            "--json",
            "--follow",
            "--prefix",
        ] {
            assert!(bash.contains(option), "dpuctl's script lacks {option}");
        }
        let rexec = script(Shell::Fish, "rexec").unwrap();
        assert!(rexec.contains("env-only"), "{rexec}");
    }

    #[test]
    fn scripts_go_where_each_shell_looks() {
        let p = Path::new("/usr");
        assert_eq!(
            install_path(p, Shell::Bash, "rexec").unwrap(),
            Path::new("/usr/share/bash-completion/completions/rexec")
        );
        assert_eq!(
            install_path(p, Shell::Zsh, "dpuctl").unwrap(),
            Path::new("/usr/share/zsh/vendor-completions/_dpuctl")
        );
        assert_eq!(
            install_path(p, Shell::Fish, "qtcfg").unwrap(),
            Path::new("/usr/share/fish/vendor_completions.d/qtcfg.fish")
        );
        assert!(install_path(p, Shell::PowerShell, "dpuctl").is_none());
    }
}
