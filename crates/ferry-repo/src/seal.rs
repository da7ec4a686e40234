//! How every object is stored: compressed (zstd, when that makes it
//! smaller) and either encrypted with AES-256-GCM or followed by a BLAKE3
//! checksum, always bound to the object's key so that an object moved to
//! another key does not open. Also chunk identities: BLAKE3 of the content,
//! keyed with a secret from the key file when the repository is encrypted,
//! so that whoever holds the storage cannot confirm a guessed content.
//!
//! Stored layout: `"NFR1"`, one flags byte (bit 0: zstd, bit 1: AES-GCM,
//! bit 2: bare), then either `nonce(12) | ciphertext | tag(16)`,
//! `body | blake3(key | flags | body)(32)`, or (bare) `body` alone: an
//! unencrypted chunk, whose id is a hash of every byte it holds, needs no
//! second hash (it was 9% of a full backup's CPU). Objects written before
//! bare chunks existed read as they always did.

use std::cell::RefCell;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::id::ChunkId;

const MAGIC: &[u8; 4] = b"NFR1";
const ZSTD: u8 = 1;
const AES_GCM: u8 = 2;
const BARE: u8 = 4;
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
    /// chunk twice yields the same bytes. Unencrypted, the chunk is stored
    /// bare: only [`Sealer::open_chunk`], whose caller checks the content
    /// against the id, opens it.
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
        let (mut out, plain_follows) = self.seal_head(key, plain, nonce)?;
        if plain_follows {
            out.extend_from_slice(plain);
        }
        Ok(out)
    }

    /// [`seal`](Self::seal) in parts to store one after the other: a bare
    /// chunk that does not compress is its header and then `plain` itself,
    /// not a copy of it (a copy cost 5% of a full backup's CPU).
    pub fn seal_parts(&self, key: &str, plain: Bytes, nonce: NonceFrom<'_>) -> Result<Vec<Bytes>> {
        let (out, plain_follows) = self.seal_head(key, &plain, nonce)?;
        Ok(if plain_follows {
            vec![Bytes::from(out), plain]
        } else {
            vec![Bytes::from(out)]
        })
    }

    /// The sealed object, or only its header when it is a bare chunk that
    /// does not compress (`true`: `plain` follows the header as it is).
    fn seal_head(&self, key: &str, plain: &[u8], nonce: NonceFrom<'_>) -> Result<(Vec<u8>, bool)> {
        let bare = self.cipher.is_none() && matches!(nonce, NonceFrom::Chunk(_));
        let mut out = Vec::with_capacity(if bare { 64 } else { plain.len() + 64 });
        out.extend_from_slice(MAGIC);
        out.push(0); // the flags, known below
        let mut n = [0u8; NONCE_LEN];
        if let Some(c) = &self.cipher {
            match nonce {
                NonceFrom::Chunk(id) => n.copy_from_slice(
                    &blake3::keyed_hash(&c.nonce_key, &id.0).as_bytes()[..NONCE_LEN],
                ),
                NonceFrom::Random => n = crate::id::random()?,
            }
            out.extend_from_slice(&n);
        }
        let start = out.len();
        let mut flags = match self.zstd {
            Some(level) if compress_into(level, plain, &mut out) => ZSTD,
            _ if bare => {
                out.truncate(start);
                out[MAGIC.len()] = BARE;
                return Ok((out, true));
            }
            _ => {
                out.truncate(start);
                out.extend_from_slice(plain);
                0
            }
        };
        match &self.cipher {
            Some(c) => {
                flags |= AES_GCM;
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
            None if bare => flags |= BARE,
            None => {
                let sum = checksum(key, flags, &out[start..]);
                out.extend_from_slice(&sum);
            }
        }
        out[MAGIC.len()] = flags;
        Ok((out, false))
    }

    /// Checks a stored object's integrity (tag or checksum) and returns its
    /// plain bytes, refusing more than `max_len` of them (a corrupt or
    /// hostile object must not make us allocate without bound).
    pub fn open(&self, key: &str, stored: &[u8], max_len: usize) -> Result<Vec<u8>> {
        let (flags, body) = self.unwrap(key, stored, Envelope::Check, false)?;
        let body = match &body {
            Body::Within(r) => &stored[r.clone()],
            Body::Decrypted(v) => v.as_slice(),
        };
        if flags & ZSTD != 0 {
            return decompress(key, body, max_len);
        }
        if body.len() > max_len {
            return Err(Error::corrupt(key, "longer than any object of its kind"));
        }
        Ok(body.to_vec())
    }

    /// [`open`](Self::open) for a chunk, whose content the caller checks
    /// against its id. In an unencrypted repository that id is a hash of
    /// every byte the reader gets, so the envelope's checksum (a second
    /// hash of the same bytes), where a chunk has one, is skipped unless
    /// `envelope` asks for it; an encrypted chunk is always authenticated,
    /// as it is decrypted.
    /// The content shares `stored`'s memory where it is stored plain.
    pub fn open_chunk(
        &self,
        key: &str,
        stored: Bytes,
        max_len: usize,
        envelope: Envelope,
    ) -> Result<Bytes> {
        let (flags, body) = self.unwrap(key, &stored, envelope, true)?;
        let body = match body {
            Body::Within(r) => stored.slice(r),
            Body::Decrypted(v) => Bytes::from(v),
        };
        if flags & ZSTD != 0 {
            return decompress(key, &body, max_len).map(Bytes::from);
        }
        if body.len() > max_len {
            return Err(Error::corrupt(key, "longer than any object of its kind"));
        }
        Ok(body)
    }

    /// Removes the envelope: (flags, body still compressed if flagged).
    /// Only a `chunk` may be bare.
    fn unwrap(
        &self,
        key: &str,
        stored: &[u8],
        envelope: Envelope,
        chunk: bool,
    ) -> Result<(u8, Body)> {
        if stored.len() < MAGIC.len() + 1 || &stored[..4] != MAGIC {
            return Err(Error::corrupt(key, "no object header"));
        }
        let flags = stored[4];
        let rest = &stored[5..];
        if flags & !(ZSTD | AES_GCM | BARE) != 0 {
            return Err(Error::corrupt(key, format!("unknown flags {flags:#x}")));
        }
        if flags & BARE != 0 && (!chunk || flags & AES_GCM != 0) {
            return Err(Error::corrupt(key, "bare, but not an unencrypted chunk"));
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
                Ok((flags, Body::Decrypted(buf)))
            }
            (None, false) if flags & BARE != 0 => Ok((flags, Body::Within(5..stored.len()))),
            (None, false) => {
                if rest.len() < SUM_LEN {
                    return Err(Error::corrupt(key, "truncated"));
                }
                let (body, sum) = rest.split_at(rest.len() - SUM_LEN);
                if envelope == Envelope::Check && checksum(key, flags, body) != sum {
                    return Err(Error::corrupt(key, "checksum mismatch"));
                }
                Ok((flags, Body::Within(5..5 + body.len())))
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

/// Whether opening a chunk checks the envelope's checksum too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    Check,
    /// The content is checked against the chunk's id instead.
    ContentOnly,
}

/// An object's body once the envelope is off.
enum Body {
    /// Stored as is: this range of the stored bytes.
    Within(std::ops::Range<usize>),
    Decrypted(Vec<u8>),
}

/// Appends `plain` compressed at `level` to `out`, if that makes it
/// smaller. The compressor is kept per thread: setting one up costs more
/// than compressing a small chunk, and writes come from a few threads.
fn compress_into(level: i32, plain: &[u8], out: &mut Vec<u8>) -> bool {
    thread_local! {
        static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { RefCell::new(None) };
    }
    COMPRESSOR.with_borrow_mut(|c| {
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
        }
        let Some((_, z)) = c else { return false };
        if !worth_compressing(z, plain) {
            return false;
        }
        let start = out.len();
        // Into the Vec's spare room after what it holds (a cursor there:
        // zstd writes a bare Vec from its start), not zeroed first: zeroing
        // a chunk's worth and faulting its pages in cost a fifth of an
        // incremental's CPU (perf). Output that is not smaller is refused.
        out.reserve_exact(plain.len());
        let mut at = std::io::Cursor::new(&mut *out);
        at.set_position(start as u64);
        match z.compress_to_buffer(plain, &mut at) {
            Ok(n) if n < plain.len() => true,
            _ => {
                out.truncate(start);
                false
            }
        }
    })
}

/// Pieces of a large object compressed first, to tell incompressible
/// content (encrypted or already compressed disk data) cheaply: zstd would
/// spend as long failing on a whole chunk as on compressing it
/// (measured: 7% of a full backup's CPU on the benchmark's random data).
const PROBE_PIECES: usize = 8;
const PROBE_PIECE: usize = 512;

/// False when samples spread over `plain` do not shrink by 1/32: then the
/// whole would not either, save in rare mixed content, stored plain.
fn worth_compressing(z: &mut zstd::bulk::Compressor<'static>, plain: &[u8]) -> bool {
    let step = plain.len() / PROBE_PIECES;
    if step < 2 * PROBE_PIECE {
        return true;
    }
    // Slice by slice: a byte-wise iterator here cost 6% of a full
    // backup's CPU (perf, 64 KiB chunks).
    let mut sample = Vec::with_capacity(PROBE_PIECES * PROBE_PIECE);
    for i in 0..PROBE_PIECES {
        sample.extend_from_slice(&plain[i * step..i * step + PROBE_PIECE]);
    }
    let mut out = vec![0u8; sample.len() - sample.len() / 32];
    z.compress_to_buffer(&sample, &mut out).is_ok()
}

fn decompress(key: &str, body: &[u8], max_len: usize) -> Result<Vec<u8>> {
    zstd::bulk::decompress(body, max_len)
        .map_err(|e| Error::corrupt(key, format!("does not decompress: {e}")))
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
            let nonces = if s.encrypted() {
                vec![NonceFrom::Chunk(&id), NonceFrom::Random]
            } else {
                // Unencrypted chunks are bare: see the test below.
                vec![NonceFrom::Random]
            };
            for nonce in nonces {
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
    fn sealed_chunks_keep_the_stored_format() {
        // Objects written before the compressor was kept per thread must
        // read the same, and new ones must match them byte for byte.
        let data = b"0123456789abcdef".repeat(1000);
        let s = Sealer::new(None, Some(1)).unwrap();
        let stored = s.seal("k", &data, NonceFrom::Random).unwrap();
        let body = zstd::bulk::compress(&data, 1).unwrap();
        assert_eq!(&stored[..5], b"NFR1\x01");
        assert_eq!(&stored[5..stored.len() - SUM_LEN], body.as_slice());
        assert_eq!(
            &stored[stored.len() - SUM_LEN..],
            checksum("k", ZSTD, &body)
        );
        // Incompressible content is stored as it is.
        let noise = crate::tests::noise(4096, 1);
        let stored = s.seal("k", &noise, NonceFrom::Random).unwrap();
        assert_eq!(stored[4], 0);
        assert_eq!(&stored[5..stored.len() - SUM_LEN], noise.as_slice());
    }

    #[test]
    fn the_probe_spares_only_incompressible_chunks() {
        let noise = crate::tests::noise(65536, 2);
        let mut half = noise.clone();
        half[32768..].fill(0);
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        assert!(!worth_compressing(&mut z, &noise));
        assert!(worth_compressing(&mut z, &half));
        let s = Sealer::new(None, Some(1)).unwrap();
        assert_eq!(s.seal("k", &noise, NonceFrom::Random).unwrap()[4], 0);
        let stored = s.seal("k", &half, NonceFrom::Random).unwrap();
        assert_eq!(stored[4], ZSTD);
        assert!(stored.len() < 33000, "{}", stored.len());
    }

    #[test]
    fn chunks_may_skip_only_the_envelope_checksum() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 7) as u8).collect();
        let s = Sealer::new(None, Some(1)).unwrap();
        let mut stored = s.seal("k", &data, NonceFrom::Random).unwrap();
        let last = stored.len() - 1;
        stored[last] ^= 1;
        let open = |e| s.open_chunk("k", Bytes::from(stored.clone()), data.len(), e);
        assert!(open(Envelope::Check).is_err());
        assert_eq!(open(Envelope::ContentOnly).unwrap(), data);
        // Encrypted chunks are authenticated whatever the caller asks.
        let s = Sealer::new(Some(&key()), None).unwrap();
        let mut stored = s.seal("k", &data, NonceFrom::Random).unwrap();
        stored[last / 2] ^= 1;
        let r = s.open_chunk("k", Bytes::from(stored), data.len(), Envelope::ContentOnly);
        assert!(matches!(r, Err(Error::Corrupt { .. })));
    }

    #[test]
    fn sealing_in_parts_stores_the_same_bytes() {
        let mut random = vec![0u8; 70_000];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        let pattern: Vec<u8> = (0..70_000u32).map(|i| (i % 13) as u8).collect();
        let k = key();
        for key_file in [None, Some(&k)] {
            for z in [None, Some(1)] {
                let s = Sealer::new(key_file, z).unwrap();
                for data in [&random, &pattern] {
                    let id = s.chunk_id(data);
                    let key = id.key();
                    let whole = s.seal(&key, data, NonceFrom::Chunk(&id)).unwrap();
                    let parts = s
                        .seal_parts(&key, Bytes::from(data.clone()), NonceFrom::Chunk(&id))
                        .unwrap();
                    assert_eq!(
                        parts.concat(),
                        whole,
                        "key {} zstd {z:?}",
                        key_file.is_some()
                    );
                    // The plain bytes are handed on, not copied, only where
                    // they are stored as they are.
                    let as_is = key_file.is_none() && (z.is_none() || data == &random);
                    assert_eq!(parts.len(), if as_is { 2 } else { 1 });
                }
            }
        }
    }

    #[test]
    fn unencrypted_chunks_are_bare_and_open_only_as_chunks() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 13) as u8).collect();
        for z in [None, Some(1)] {
            let s = Sealer::new(None, z).unwrap();
            let id = s.chunk_id(&data);
            let key = id.key();
            let stored = s.seal(&key, &data, NonceFrom::Chunk(&id)).unwrap();
            assert_ne!(stored[4] & BARE, 0);
            let body = if z.is_some() {
                zstd::bulk::compress(&data, 1).unwrap()
            } else {
                data.clone()
            };
            assert_eq!(&stored[5..], body.as_slice(), "no checksum after the body");
            for e in [Envelope::Check, Envelope::ContentOnly] {
                let got = s.open_chunk(&key, Bytes::from(stored.clone()), data.len(), e);
                assert_eq!(got.unwrap(), data);
            }
            // Not as another kind of object: those are bound to their key
            // by the checksum a bare chunk lacks.
            assert!(matches!(
                s.open(&key, &stored, data.len()),
                Err(Error::Corrupt { .. })
            ));
            // A flipped byte: an error or other content, which the id
            // check of every chunk read refuses.
            let mut bad = stored.clone();
            bad[stored.len() / 2] ^= 1;
            match s.open_chunk(&key, Bytes::from(bad), data.len(), Envelope::Check) {
                Err(Error::Corrupt { .. }) => {}
                Ok(other) => assert_ne!(s.chunk_id(&other), id),
                Err(e) => panic!("{e}"),
            }
        }
        // Encrypted chunks are authenticated, never bare; nor is anything
        // else, whatever its flags say.
        let enc = Sealer::new(Some(&key()), None).unwrap();
        let id = enc.chunk_id(&data);
        assert_eq!(
            enc.seal("k", &data, NonceFrom::Chunk(&id)).unwrap()[4] & BARE,
            0
        );
        let s = Sealer::new(None, None).unwrap();
        let mut meta = s.seal("k", &data, NonceFrom::Random).unwrap();
        meta[4] |= BARE;
        assert!(s.open("k", &meta, data.len()).is_err());
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
