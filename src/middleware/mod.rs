//! The per-request face of a [`Locker`](crate::Locker), laid out as tower-http lays out a
//! middleware: [`LockLayer`] (the builder), [`Lock`] (the service) and [`ResponseFuture`]
//! (acquire, call, release).

mod future;
mod layer;
mod service;

pub use self::{
    future::ResponseFuture,
    layer::{LockLayer, ReadWriteLayer, ReadWriteLock},
    service::Lock,
};
