//! Crash safety under a model of a power cut: a backend whose objects are
//! visible at once but durable only as `Durability` and barriers say, and
//! which can lose everything else. Whatever point survives must restore.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::backend::{Backend, BoxFuture, Durability, ObjectMeta};
use crate::*;

const CS: u64 = 4096;

/// What readers see, and what a power cut would leave.
#[derive(Default)]
struct Volatile {
    state: Mutex<State>,
}

#[derive(Default, Clone)]
struct State {
    visible: BTreeMap<String, Bytes>,
    durable: BTreeMap<String, Bytes>,
}

impl Volatile {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// The power cut: only what was durable is left.
    fn cut_power(&self) {
        self.with(|s| s.visible = s.durable.clone());
    }
}

impl Backend for Volatile {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Bytes>> {
        let v = self.with(|s| s.visible.get(key).cloned());
        Box::pin(async move { Ok(v) })
    }

    fn put_parts<'a>(
        &'a self,
        key: &'a str,
        parts: Vec<Bytes>,
        durability: Durability,
    ) -> BoxFuture<'a, ()> {
        let data = Bytes::from(parts.concat());
        self.with(|s| {
            s.visible.insert(key.to_string(), data.clone());
            match durability {
                Durability::Deferred => {}
                Durability::Now => {
                    s.durable.insert(key.to_string(), data);
                }
                Durability::AfterAll => s.durable = s.visible.clone(),
            }
        });
        Box::pin(async { Ok(()) })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, bool> {
        let v = self.with(|s| s.visible.contains_key(key));
        Box::pin(async move { Ok(v) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        self.with(|s| s.visible.remove(key));
        Box::pin(async { Ok(()) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<ObjectMeta>> {
        let v = self.with(|s| {
            s.visible
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, b)| ObjectMeta {
                    key: k.clone(),
                    size: b.len() as u64,
                })
                .collect()
        });
        Box::pin(async move { Ok(v) })
    }

    fn rename<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, bool> {
        let moved = self.with(|s| match s.visible.remove(from) {
            Some(b) => {
                s.visible.insert(to.to_string(), b);
                true
            }
            None => false,
        });
        Box::pin(async move { Ok(moved) })
    }

    fn barrier(&self) -> BoxFuture<'_, ()> {
        self.with(|s| s.durable = s.visible.clone());
        Box::pin(async { Ok(()) })
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

fn repo(backend: &Arc<Volatile>) -> Repo {
    let config = RepoConfig {
        format: 1,
        chunk_size: CS,
        zstd: None,
        encryption: None,
    };
    Repo::with_config(backend.clone(), config, None).unwrap()
}

fn spec(size: u64, bitmap: bool) -> BackupSpec {
    BackupSpec {
        disk: "d".into(),
        source: "test:d".into(),
        bitmap: bitmap.then(|| "qemu:dirty-bitmap:b0".to_string()),
        size,
        notes: PointNotes::default(),
    }
}

async fn restore(repo: &Repo, point: &PointMeta) -> Vec<u8> {
    let r = PointReader::open(repo, "d", Some(&point.point))
        .await
        .unwrap();
    let mut out = vec![0u8; r.size() as usize];
    r.read_at(&mut out, 0).await.unwrap();
    out
}

#[tokio::test]
async fn points_that_survive_a_power_cut_have_all_their_chunks() {
    let backend = Arc::new(Volatile::default());
    let repo = repo(&backend);
    let mut img: Vec<u8> = (0..8 * CS as usize).map(|i| (i * 7 % 251) as u8).collect();
    let w = PointWriter::begin(&repo, spec(img.len() as u64, true))
        .await
        .unwrap();
    w.write(0, Bytes::copy_from_slice(&img)).await.unwrap();
    let p = w.commit(img.len() as u64).await.unwrap();
    backend.cut_power();
    assert!(restore(&repo, &p).await == img, "the full point");

    // An incremental stores one new chunk and keeps the rest.
    img[..CS as usize].fill(9);
    let w = PointWriter::begin(&repo, spec(img.len() as u64, true))
        .await
        .unwrap();
    assert!(w.incremental());
    w.write(0, Bytes::copy_from_slice(&img[..CS as usize]))
        .await
        .unwrap();
    w.keep(CS, img.len() as u64 - CS).await.unwrap();
    let p = w.commit(CS).await.unwrap();
    backend.cut_power();
    assert!(restore(&repo, &p).await == img, "the incremental");
}
