//! mount helper (in progress).
