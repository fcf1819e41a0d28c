//! Version negotiation and mutual authentication.

/// How a link authenticates.
pub enum Auth {}
/// What each side says about itself.
pub struct Hello {}
/// What we learned about the peer.
pub struct PeerInfo {}
/// Which dpuctl component is speaking.
pub enum Role {}
