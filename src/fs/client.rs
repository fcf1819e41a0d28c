//! FUSE client (in progress).
