//! udsproxyd: the cross-host Unix domain socket proxy.
