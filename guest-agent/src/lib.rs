//! The guest agent's core, usable outside a guest: [`server::serve`] runs the
//! host<->agent protocol over any byte stream (vsock in the guest, a Unix
//! socket in tests).

pub mod server;
