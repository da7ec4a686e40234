//! Where the repository's objects live: a local directory or an
//! S3-compatible object store. Both hold the same keys and bytes; the
//! repository above never knows which one it talks to.
//!
//! What the repository relies on (both backends provide it):
//! - `put` is atomic: a reader sees the whole object or none of it;
//! - `barrier` makes every `put` that has returned durable (local: one
//!   `syncfs`; S3: a returned PUT already is);
//! - `list` and `exists` after `put` see the object (S3 is strongly
//!   consistent);
//! - `rename` moves one object (local: `rename(2)`; S3: copy, then delete).

mod local;
mod s3;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

pub use local::Local;
pub use s3::S3;

use crate::error::{Error, Result};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key, relative to the repository's root (`chunks/ab/ab12…`).
    pub key: String,
    pub size: u64,
}

/// Whether a `put` must be durable on its own before it returns (small
/// metadata that commits something), or may wait for the next
/// [`Backend::barrier`] (chunks, of which there are many).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Deferred,
    Now,
    /// Durable before it returns, and never visible before every `put`
    /// that returned earlier is durable: a barrier and a `Now` in one
    /// (an index after its chunks; local: one `syncfs` serves both).
    AfterAll,
}

pub trait Backend: Send + Sync + 'static {
    /// The object's bytes, or `None` if it does not exist.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Bytes>>;
    fn put<'a>(&'a self, key: &'a str, data: Bytes, durability: Durability) -> BoxFuture<'a, ()> {
        self.put_parts(key, vec![data], durability)
    }
    /// [`put`](Self::put) of the parts one after the other, as one object
    /// (a chunk's header and its bytes, without joining them in memory).
    fn put_parts<'a>(
        &'a self,
        key: &'a str,
        parts: Vec<Bytes>,
        durability: Durability,
    ) -> BoxFuture<'a, ()>;
    /// Whether the object exists, without reading it.
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, bool>;
    /// Removes an object; a missing one is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()>;
    /// Every object whose key starts with `prefix` (a folder, ending in
    /// `/`), at any depth.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<ObjectMeta>>;
    /// Moves `from` to `to`; `false` if `from` does not exist.
    fn rename<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, bool>;
    /// Makes every completed `put` durable.
    fn barrier(&self) -> BoxFuture<'_, ()>;
    /// Where the objects are, for messages.
    fn describe(&self) -> String;
    /// Where the objects are, written one way however the location was
    /// given (it names the repository in `backup run`'s checkpoints).
    fn identity(&self) -> String {
        self.describe()
    }
}

/// Opens a repository location: `s3://bucket/prefix` or a local directory.
pub fn open(location: &str) -> Result<Arc<dyn Backend>> {
    if let Some(rest) = location.strip_prefix("s3://") {
        Ok(Arc::new(S3::from_env(location, rest)?))
    } else if location.contains("://") {
        Err(Error::BadLocation {
            location: location.to_string(),
            reason: "only local directories and s3:// are supported".into(),
        })
    } else {
        Ok(Arc::new(Local::new(location.into())))
    }
}
