//! The pre-shared key file.

/// A pre-shared key (32 random bytes).
pub struct Psk {}
