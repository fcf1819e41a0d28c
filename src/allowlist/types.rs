//! The fourteen allowlist types of the original qtfs/udsproxyd/rexec tools.

use std::fmt;
use std::str::FromStr;

/// One allowlist type. The order is the original's (`qtcfg -z` lists them in this order).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ListType {
    Open,
    Write,
    Read,
    Readdir,
    Mkdir,
    Rmdir,
    Create,
    Unlink,
    Rename,
    Setattr,
    Setxattr,
    Mount,
    Kill,
    Udsconnect,
}

impl ListType {
    /// Every type, in the original's order.
    pub const ALL: [ListType; 14] = [
        ListType::Open,
        ListType::Write,
        ListType::Read,
        ListType::Readdir,
        ListType::Mkdir,
        ListType::Rmdir,
        ListType::Create,
        ListType::Unlink,
        ListType::Rename,
        ListType::Setattr,
        ListType::Setxattr,
        ListType::Mount,
        ListType::Kill,
        ListType::Udsconnect,
    ];

    /// The lower-case name used on the command line and in JSON (`udsconnect`).
    pub fn name(self) -> &'static str {
        match self {
            ListType::Open => "open",
            ListType::Write => "write",
            ListType::Read => "read",
            ListType::Readdir => "readdir",
            ListType::Mkdir => "mkdir",
            ListType::Rmdir => "rmdir",
            ListType::Create => "create",
            ListType::Unlink => "unlink",
            ListType::Rename => "rename",
            ListType::Setattr => "setattr",
            ListType::Setxattr => "setxattr",
            ListType::Mount => "mount",
            ListType::Kill => "kill",
            ListType::Udsconnect => "udsconnect",
        }
    }

    /// The section name in `/etc/qtfs/whitelist` (`Udsconnect`).
    pub fn section(self) -> &'static str {
        match self {
            ListType::Open => "Open",
            ListType::Write => "Write",
            ListType::Read => "Read",
            ListType::Readdir => "Readdir",
            ListType::Mkdir => "Mkdir",
            ListType::Rmdir => "Rmdir",
            ListType::Create => "Create",
            ListType::Unlink => "Unlink",
            ListType::Rename => "Rename",
            ListType::Setattr => "Setattr",
            ListType::Setxattr => "Setxattr",
            ListType::Mount => "Mount",
            ListType::Kill => "Kill",
            ListType::Udsconnect => "Udsconnect",
        }
    }
}

impl fmt::Display for ListType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An allowlist type name that is not one of the fourteen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown allowlist type '{0}': expected one of open, write, read, readdir, mkdir, rmdir, create, unlink, rename, setattr, setxattr, mount, kill, udsconnect")]
pub struct UnknownListType(pub String);

impl FromStr for ListType {
    type Err = UnknownListType;

    /// Case-insensitive, as the original `qtcfg -w` is.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ListType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownListType(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_case_insensitively() {
        for t in ListType::ALL {
            assert_eq!(t.name().parse::<ListType>().unwrap(), t);
            assert_eq!(t.section().parse::<ListType>().unwrap(), t);
            assert_eq!(t.name().to_uppercase().parse::<ListType>().unwrap(), t);
        }
        assert!("bogus".parse::<ListType>().is_err());
        assert!("".parse::<ListType>().is_err());
    }
}
