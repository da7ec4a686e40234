//! A repository on an S3-compatible object store, through `object_store`.
//! `s3://bucket/prefix`; credentials, region and endpoint come from the
//! standard `AWS_*` environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT`,
//! `AWS_ALLOW_HTTP`, ...). A PUT that returned is durable and atomic, so
//! the barrier has nothing to do.

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{Backend, BoxFuture, Durability, ObjectMeta};
use crate::error::{Error, Result};

pub struct S3 {
    store: AmazonS3,
    /// Key prefix inside the bucket, without a trailing `/` (may be empty).
    prefix: String,
    location: String,
}

impl S3 {
    /// `rest` is the location without `s3://`: `bucket[/prefix]`.
    pub fn from_env(location: &str, rest: &str) -> Result<S3> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::BadLocation {
                location: location.to_string(),
                reason: "no bucket name".into(),
            });
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        // A plain-HTTP endpoint (a local test server) is what the user
        // asked for by naming it; object_store refuses it unless told.
        if std::env::var("AWS_ENDPOINT")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .is_ok_and(|e| e.starts_with("http://"))
        {
            builder = builder.with_allow_http(true);
        }
        if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL")
            && std::env::var("AWS_ENDPOINT").is_err()
        {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder.build().map_err(|source| Error::ObjectStore {
            key: location.to_string(),
            source,
        })?;
        Ok(S3 {
            store,
            prefix: prefix.trim_matches('/').to_string(),
            location: location.to_string(),
        })
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    fn err(&self, key: &str) -> impl FnOnce(object_store::Error) -> Error + use<> {
        let key = format!("{}/{key}", self.location.trim_end_matches('/'));
        move |source| Error::ObjectStore { key, source }
    }
}

impl Backend for S3 {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            match self.store.get(&self.path(key)).await {
                Ok(r) => Ok(Some(r.bytes().await.map_err(self.err(key))?)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err(key)(e)),
            }
        })
    }

    fn put_parts<'a>(
        &'a self,
        key: &'a str,
        parts: Vec<Bytes>,
        _: Durability,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.store
                .put(&self.path(key), PutPayload::from_iter(parts))
                .await
                .map(|_| ())
                .map_err(self.err(key))
        })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match self.store.head(&self.path(key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.err(key)(e)),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            match self.store.delete(&self.path(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err(key)(e)),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<ObjectMeta>> {
        Box::pin(async move {
            let base = self.path(prefix.trim_end_matches('/'));
            let strip = if self.prefix.is_empty() {
                0
            } else {
                self.prefix.len() + 1
            };
            let found: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&base))
                .try_collect()
                .await
                .map_err(self.err(prefix))?;
            Ok(found
                .into_iter()
                .filter_map(|m| {
                    let key = m.location.as_ref().get(strip..)?.to_string();
                    Some(ObjectMeta { key, size: m.size })
                })
                .collect())
        })
    }

    fn rename<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match self.store.rename(&self.path(from), &self.path(to)).await {
                Ok(()) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.err(from)(e)),
            }
        })
    }

    fn barrier(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn describe(&self) -> String {
        self.location.clone()
    }

    /// Keys are built without the location's trailing slashes.
    fn identity(&self) -> String {
        self.location.trim_end_matches('/').to_string()
    }
}
