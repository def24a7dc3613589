//! Transports: how events travel between peers. gRPC (tonic) is the built-in one.
pub mod grpc;
pub mod handshake;
