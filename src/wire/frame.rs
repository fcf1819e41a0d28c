//! Frames: a fixed header followed by raw payload bytes.
