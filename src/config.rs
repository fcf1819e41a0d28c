//! `/etc/dpuctl/config.toml`.
