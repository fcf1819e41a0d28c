//! The multiplexed link.

/// A multiplexed authenticated connection.
pub struct Link {}
/// Tunables.
pub struct LinkOptions {}
/// Counters.
pub struct LinkStats {}
/// Error on a call.
pub enum CallError {}
/// Error returned by the remote service.
pub struct RemoteError {}
/// The service a side offers on a link.
pub trait Service {}
