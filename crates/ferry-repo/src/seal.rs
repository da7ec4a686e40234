//! How every object is stored: compressed (zstd, when that makes it
//! smaller) and either encrypted with AES-256-GCM or followed by a BLAKE3
//! checksum, always bound to the object's key so that an object moved to
//! another key does not open. Also chunk identities: BLAKE3 of the content,
//! keyed with a secret from the key file when the repository is encrypted,
//! so that whoever holds the storage cannot confirm a guessed content.
//!
//! Stored layout: `"NFR1"`, one flags byte (bit 0: zstd, bit 1: AES-GCM),
//! then either `nonce(12) | ciphertext | tag(16)` or
//! `body | blake3(key | flags | body)(32)`.

use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::error::{Error, Result};
use crate::id::ChunkId;

const MAGIC: &[u8; 4] = b"NFR1";
const ZSTD: u8 = 1;
const AES_GCM: u8 = 2;
const TAG_LEN: usize = 16;
const SUM_LEN: usize = 32;

/// The secret from a key file; every working key is derived from it.
#[derive(Clone)]
pub struct KeyFile {
    master: [u8; 32],
}

impl KeyFile {
    /// Reads a key file: any file of at least 32 bytes (e.g. `head -c 32
    /// /dev/urandom`); its whole content is the secret.
    pub fn read(path: &Path) -> Result<KeyFile> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            what: "cannot read the key file",
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.len() < 32 {
            return Err(Error::ShortKey(path.to_path_buf()));
        }
        Ok(KeyFile {
            master: blake3::derive_key("nbdferry backup repository key file v1", &bytes),
        })
    }

    /// A value stored in the repository's config that tells a right key
    /// from a wrong one and reveals nothing about the key.
    pub fn check_value(&self) -> String {
        hex(&blake3::derive_key("nbdferry key check v1", &self.master))
    }
}

struct Cipher {
    aead: LessSafeKey,
    id_key: [u8; 32],
    nonce_key: [u8; 32],
}

/// Seals and opens objects, computes chunk ids. Cheap to share (`Arc`).
pub struct Sealer {
    cipher: Option<Cipher>,
    /// zstd level, if compressing.
    zstd: Option<i32>,
}

/// Where an object's nonce comes from.
pub enum NonceFrom<'a> {
    /// Derived from the chunk's (keyed) id: a chunk's content decides its
    /// nonce, distinct contents get distinct nonces, and storing the same
    /// chunk twice yields the same bytes.
    Chunk(&'a ChunkId),
    /// Fresh random bytes (indexes, journals: one key, many versions).
    Random,
}

impl Sealer {
    pub fn new(key: Option<&KeyFile>, zstd: Option<i32>) -> Result<Sealer> {
        let cipher = match key {
            None => None,
            Some(k) => {
                let aead_key = blake3::derive_key("nbdferry aead key v1", &k.master);
                let unbound = UnboundKey::new(&AES_256_GCM, &aead_key)
                    .map_err(|_| Error::Invalid("cannot set up AES-256-GCM".into()))?;
                Some(Cipher {
                    aead: LessSafeKey::new(unbound),
                    id_key: blake3::derive_key("nbdferry chunk id key v1", &k.master),
                    nonce_key: blake3::derive_key("nbdferry chunk nonce key v1", &k.master),
                })
            }
        };
        Ok(Sealer { cipher, zstd })
    }

    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// The identity of a chunk's content.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        let hash = match &self.cipher {
            Some(c) => blake3::keyed_hash(&c.id_key, data),
            None => blake3::hash(data),
        };
        ChunkId(*hash.as_bytes())
    }

    pub fn seal(&self, key: &str, plain: &[u8], nonce: NonceFrom<'_>) -> Result<Vec<u8>> {
        let compressed = match self.zstd {
            Some(level) => zstd::bulk::compress(plain, level)
                .ok()
                .filter(|c| c.len() < plain.len()),
            None => None,
        };
        let (mut flags, body) = match &compressed {
            Some(c) => (ZSTD, c.as_slice()),
            None => (0, plain),
        };
        let mut out = Vec::with_capacity(body.len() + 64);
        out.extend_from_slice(MAGIC);
        match &self.cipher {
            Some(c) => {
                flags |= AES_GCM;
                out.push(flags);
                let mut n = [0u8; NONCE_LEN];
                match nonce {
                    NonceFrom::Chunk(id) => n.copy_from_slice(
                        &blake3::keyed_hash(&c.nonce_key, &id.0).as_bytes()[..NONCE_LEN],
                    ),
                    NonceFrom::Random => aws_lc_rs::rand::fill(&mut n)
                        .map_err(|_| Error::Invalid("no random bytes for a nonce".into()))?,
                }
                out.extend_from_slice(&n);
                let start = out.len();
                out.extend_from_slice(body);
                let tag = c
                    .aead
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        aad(key, flags),
                        &mut out[start..],
                    )
                    .map_err(|_| Error::Invalid("encryption failed".into()))?;
                out.extend_from_slice(tag.as_ref());
            }
            None => {
                out.push(flags);
                out.extend_from_slice(body);
                let sum = checksum(key, flags, body);
                out.extend_from_slice(&sum);
            }
        }
        Ok(out)
    }

    /// Checks a stored object's integrity (tag or checksum) and returns its
    /// plain bytes, refusing more than `max_len` of them (a corrupt or
    /// hostile object must not make us allocate without bound).
    pub fn open(&self, key: &str, stored: &[u8], max_len: usize) -> Result<Vec<u8>> {
        let (flags, body) = self.unwrap(key, stored)?;
        if flags & ZSTD == 0 {
            if body.len() > max_len {
                return Err(Error::corrupt(key, "longer than any object of its kind"));
            }
            return Ok(body);
        }
        zstd::bulk::decompress(&body, max_len)
            .map_err(|e| Error::corrupt(key, format!("does not decompress: {e}")))
    }

    /// Removes the envelope: (flags, body still compressed if flagged).
    fn unwrap(&self, key: &str, stored: &[u8]) -> Result<(u8, Vec<u8>)> {
        if stored.len() < MAGIC.len() + 1 || &stored[..4] != MAGIC {
            return Err(Error::corrupt(key, "no object header"));
        }
        let flags = stored[4];
        let rest = &stored[5..];
        if flags & !(ZSTD | AES_GCM) != 0 {
            return Err(Error::corrupt(key, format!("unknown flags {flags:#x}")));
        }
        match (&self.cipher, flags & AES_GCM != 0) {
            (Some(c), true) => {
                if rest.len() < NONCE_LEN + TAG_LEN {
                    return Err(Error::corrupt(key, "truncated"));
                }
                let mut n = [0u8; NONCE_LEN];
                n.copy_from_slice(&rest[..NONCE_LEN]);
                let mut buf = rest[NONCE_LEN..].to_vec();
                let plain = c
                    .aead
                    .open_in_place(Nonce::assume_unique_for_key(n), aad(key, flags), &mut buf)
                    .map_err(|_| Error::corrupt(key, "authentication failed"))?;
                let len = plain.len();
                buf.truncate(len);
                Ok((flags, buf))
            }
            (None, false) => {
                if rest.len() < SUM_LEN {
                    return Err(Error::corrupt(key, "truncated"));
                }
                let (body, sum) = rest.split_at(rest.len() - SUM_LEN);
                if checksum(key, flags, body) != sum {
                    return Err(Error::corrupt(key, "checksum mismatch"));
                }
                Ok((flags, body.to_vec()))
            }
            (None, true) => Err(Error::corrupt(
                key,
                "encrypted in an unencrypted repository",
            )),
            (Some(_), false) => Err(Error::corrupt(
                key,
                "not encrypted in an encrypted repository",
            )),
        }
    }
}

fn aad(key: &str, flags: u8) -> Aad<Vec<u8>> {
    let mut a = key.as_bytes().to_vec();
    a.push(flags);
    Aad::from(a)
}

fn checksum(key: &str, flags: u8, body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key.as_bytes());
    h.update(&[flags]);
    h.update(body);
    *h.finalize().as_bytes()
}

pub(crate) fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyFile {
        KeyFile { master: [7u8; 32] }
    }

    #[test]
    fn round_trips_in_every_mode_and_refuses_tampering() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for (k, z) in [
            (None, None),
            (None, Some(1)),
            (Some(key()), None),
            (Some(key()), Some(3)),
        ] {
            let s = Sealer::new(k.as_ref(), z).unwrap();
            let id = s.chunk_id(&data);
            for nonce in [NonceFrom::Chunk(&id), NonceFrom::Random] {
                let mut stored = s.seal("chunks/x", &data, nonce).unwrap();
                assert_eq!(s.open("chunks/x", &stored, data.len()).unwrap(), data);
                // Another key name, a short limit, a flipped byte: refused.
                assert!(s.open("chunks/y", &stored, data.len()).is_err());
                assert!(s.open("chunks/x", &stored, 10).is_err());
                let mid = stored.len() / 2;
                stored[mid] ^= 1;
                assert!(matches!(
                    s.open("chunks/x", &stored, data.len()),
                    Err(Error::Corrupt { .. })
                ));
            }
        }
    }

    #[test]
    fn encrypted_objects_hide_content_and_ids_depend_on_the_key() {
        let data = b"attack at dawn, attack at dawn, attack at dawn".repeat(10);
        let s = Sealer::new(Some(&key()), None).unwrap();
        let stored = s.seal("k", &data, NonceFrom::Random).unwrap();
        assert!(!stored.windows(13).any(|w| w == b"attack at daw"));
        let plain = Sealer::new(None, None).unwrap();
        assert_ne!(s.chunk_id(&data), plain.chunk_id(&data));
        assert_eq!(plain.chunk_id(&data).0, *blake3::hash(&data).as_bytes());
    }
}
