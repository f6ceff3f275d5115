//! Encryption primitives of the store: Argon2id key derivation from the passphrase,
//! XChaCha20-Poly1305 authenticated encryption, and keyed BLAKE3 chunk names.
//!
//! An encrypted store has one random 64-byte master key: a 32-byte encryption key followed by
//! a 32-byte chunk-id key ([`Keys`]). `rewind-store.json` keeps it wrapped (sealed) with a key
//! derived from the passphrase ([`EncryptionConfig`]), so changing the passphrase only means
//! rewrapping 64 bytes, never re-encrypting the store.
//!
//! Every sealed message is `nonce (24) ‖ ciphertext ‖ tag (16)` with a fresh random nonce.
//! `XChaCha20`'s 192-bit nonce is long enough that random nonces never realistically repeat,
//! however many chunks a store holds; a 96-bit nonce would not be.
//!
//! Secrets (the master key, the passphrase-derived wrapping key and Argon2's working memory)
//! are wiped when dropped. The master key lives on the heap, so moving a [`Keys`] around does
//! not leave copies of it on the stack.

use chacha20poly1305::aead::inout::InOutBuf;
use chacha20poly1305::{AeadInOut, KeyInit, XChaCha20Poly1305};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Bytes in each of the two keys.
const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;

/// Overhead [`Keys::seal`] adds to a plaintext (nonce + tag), in bytes.
pub const SEAL_OVERHEAD_BYTES: usize = NONCE_BYTES + TAG_BYTES;

/// Where each key sits in the master key (and so in the wrapped key; see `core/FORMAT.md`).
const ENCRYPTION: usize = 0;
const CHUNK_ID: usize = 1;
const WRAPPED_KEY_BYTES: usize = 2 * KEY_BYTES + SEAL_OVERHEAD_BYTES;

const CIPHER_NAME: &str = "xchacha20poly1305";
const KDF_NAME: &str = "argon2id";

/// Salt length written by [`Keys::wrap`], and the shortest accepted by [`Keys::unwrap`].
const SALT_BYTES: usize = 16;
/// Longest salt [`Keys::unwrap`] accepts: far more than any sane salt, far less than a problem.
const MAX_SALT_BYTES: usize = 1024;

// KDF costs beyond these are refused. They come from a file in the store, so a hostile or
// corrupted config could otherwise make Rewind allocate huge amounts of memory or spin for
// hours before it can even say "wrong passphrase".
const MAX_KDF_MEMORY_KIB: u32 = 4 << 20; // 4 GiB
const MAX_KDF_ITERATIONS: u32 = 100;
const MAX_KDF_PARALLELISM: u32 = 64;

/// Cost of the passphrase KDF (Argon2id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfCost {
    /// Memory, in KiB (at least 8 per lane).
    pub memory_kib: u32,
    /// Passes over the memory (at least 1).
    pub iterations: u32,
    /// Lanes (at least 1). Rewind computes them one after another, so more lanes cost time.
    pub parallelism: u32,
}

impl KdfCost {
    /// For real stores: 64 MiB, 3 iterations, 1 lane (above OWASP's recommended minimum for
    /// Argon2id).
    pub const DEFAULT: KdfCost = KdfCost {
        memory_kib: 64 << 10,
        iterations: 3,
        parallelism: 1,
    };

    /// Cheap parameters for unit tests only: 64 KiB, 1 iteration, 1 lane.
    pub const FAST_FOR_TESTS: KdfCost = KdfCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
}

/// What a store's config file keeps about its encryption (serialised with `serde_json` by the
/// caller). None of it is secret: the master key in it is sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionConfig {
    /// The AEAD: always `"xchacha20poly1305"`.
    pub cipher: String,
    /// The passphrase KDF: always `"argon2id"`.
    pub kdf: String,
    /// Argon2id memory, in KiB.
    pub kdf_memory_kib: u32,
    /// Argon2id iterations.
    pub kdf_iterations: u32,
    /// Argon2id lanes.
    pub kdf_parallelism: u32,
    /// The random KDF salt (16 bytes or more), in hex.
    pub salt_hex: String,
    /// `nonce ‖ ciphertext ‖ tag` of the 64-byte master key (encryption key ‖ chunk-id key),
    /// sealed with the passphrase-derived key and the store's id as associated data, in hex.
    pub wrapped_key_hex: String,
}

/// What can go wrong in encryption.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The passphrase does not unwrap the master key. This is also what a wrapped key from
    /// another store, or a modified salt or wrapped key, looks like: they cannot be told apart.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// A sealed message failed authentication.
    #[error("authentication failed: the data was modified or damaged")]
    Tampered,
    /// The encryption settings cannot be used; the text says what is wrong with them.
    #[error("the store's encryption settings are invalid: {0}")]
    BadConfig(String),
    /// The system's random number generator failed.
    #[error("the system's random number generator failed: {0}")]
    Random(String),
    /// Argon2 could not run: cost out of range when wrapping, or out of memory.
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

/// The store's secret keys: a 32-byte encryption key and a 32-byte chunk-id key.
///
/// Zeroized on drop; `Debug` prints `Keys { .. }` and nothing else.
pub struct Keys {
    /// `[encryption key, chunk-id key]`, contiguous so that it can be sealed as the 64-byte
    /// master key, and boxed so that moves copy a pointer rather than the keys.
    master: Box<Zeroizing<[[u8; KEY_BYTES]; 2]>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").finish_non_exhaustive()
    }
}

impl Keys {
    /// Fresh random keys, for a new store.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Random`] if the system's random number generator fails.
    pub fn generate() -> Result<Keys, CryptoError> {
        let mut keys = Keys::zeroed();
        fill_random(keys.master.as_flattened_mut())?;
        Ok(keys)
    }

    /// Wraps the keys with a key derived from the passphrase (Argon2id with a fresh random
    /// salt) using XChaCha20-Poly1305. `context` (the store's id) is bound as associated data,
    /// so a wrapped key copied into another store's config does not open.
    ///
    /// Takes as long as [`Keys::unwrap`] with the same cost.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Kdf`] for a cost that [`Keys::unwrap`] would refuse (rather than
    /// writing a config that could never be opened), or if the KDF's memory cannot be
    /// allocated; [`CryptoError::Random`] if the system's random number generator fails.
    pub fn wrap(
        &self,
        passphrase: &[u8],
        context: &[u8],
        cost: KdfCost,
    ) -> Result<EncryptionConfig, CryptoError> {
        let params = argon2_params(cost).map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let mut salt = [0u8; SALT_BYTES];
        fill_random(&mut salt)?;
        let mut wrapping_key = Zeroizing::new([0u8; KEY_BYTES]);
        derive_key(passphrase, &salt, params, &mut wrapping_key)?;
        let wrapped = seal_with(&wrapping_key, self.master.as_flattened(), context)?;
        Ok(EncryptionConfig {
            cipher: CIPHER_NAME.into(),
            kdf: KDF_NAME.into(),
            kdf_memory_kib: cost.memory_kib,
            kdf_iterations: cost.iterations,
            kdf_parallelism: cost.parallelism,
            salt_hex: hex::encode(salt),
            wrapped_key_hex: hex::encode(wrapped),
        })
    }

    /// Unwraps the keys that [`Keys::wrap`] wrapped. Never panics.
    ///
    /// Slow on purpose: about as long as Argon2id takes with the config's cost.
    ///
    /// # Errors
    ///
    /// - [`CryptoError::WrongPassphrase`] for a wrong passphrase or context (or a modified
    ///   salt or wrapped key, which cannot be told apart from them).
    /// - [`CryptoError::BadConfig`] for unknown cipher or KDF names, KDF costs out of range
    ///   (more than 4 GiB of memory, more than 100 iterations or 64 lanes, or below Argon2's
    ///   minimums), or malformed hex or lengths. All of this is checked before any memory is
    ///   allocated for the KDF.
    /// - [`CryptoError::Kdf`] if the KDF's memory cannot be allocated.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn unwrap(
        config: &EncryptionConfig,
        passphrase: &[u8],
        context: &[u8],
    ) -> Result<Keys, CryptoError> {
        Self::unwrap_either(config, passphrase, &[context]).map(|(keys, _)| keys)
    }

    /// [`Keys::unwrap`] trying each of `contexts` in turn (the passphrase's key is derived
    /// once): the keys, and which context they were wrapped with.
    ///
    /// # Errors
    /// As [`Keys::unwrap`]; [`CryptoError::WrongPassphrase`] when no context fits.
    pub fn unwrap_either(
        config: &EncryptionConfig,
        passphrase: &[u8],
        contexts: &[&[u8]],
    ) -> Result<(Keys, usize), CryptoError> {
        if config.cipher != CIPHER_NAME {
            return Err(CryptoError::BadConfig(format!(
                "unknown cipher {:?} (this version of Rewind knows {CIPHER_NAME:?})",
                config.cipher
            )));
        }
        if config.kdf != KDF_NAME {
            return Err(CryptoError::BadConfig(format!(
                "unknown key derivation function {:?} (this version of Rewind knows {KDF_NAME:?})",
                config.kdf
            )));
        }
        let params = argon2_params(KdfCost {
            memory_kib: config.kdf_memory_kib,
            iterations: config.kdf_iterations,
            parallelism: config.kdf_parallelism,
        })
        .map_err(|e| CryptoError::BadConfig(e.to_string()))?;

        let salt = decode_hex("salt_hex", &config.salt_hex, MAX_SALT_BYTES)?;
        if salt.len() < SALT_BYTES {
            return Err(CryptoError::BadConfig(format!(
                "the salt is {} bytes long; it must be at least {SALT_BYTES}",
                salt.len()
            )));
        }
        let wrapped = decode_hex(
            "wrapped_key_hex",
            &config.wrapped_key_hex,
            WRAPPED_KEY_BYTES,
        )?;
        let bad_length = || {
            CryptoError::BadConfig(format!(
                "the wrapped key is {} bytes long, not {WRAPPED_KEY_BYTES}",
                wrapped.len()
            ))
        };
        if wrapped.len() != WRAPPED_KEY_BYTES {
            return Err(bad_length());
        }
        let (nonce, ciphertext, tag) = split_sealed(&wrapped).ok_or_else(bad_length)?;

        let mut wrapping_key = Zeroizing::new([0u8; KEY_BYTES]);
        derive_key(passphrase, &salt, params, &mut wrapping_key)?;
        // Decrypt straight into the zeroizing buffer: the master key is never anywhere else.
        // (Poly1305 is checked before anything is decrypted, so a wrong key writes nothing.)
        let mut keys = Keys::zeroed();
        for (n, context) in contexts.iter().enumerate() {
            let buffer = InOutBuf::new(ciphertext, keys.master.as_flattened_mut())
                .map_err(|_| bad_length())?;
            if cipher(&wrapping_key)
                .decrypt_inout_detached(nonce.into(), context, buffer, tag.into())
                .is_ok()
            {
                return Ok((keys, n));
            }
        }
        Err(CryptoError::WrongPassphrase)
    }

    /// The chunk-id key: chunk names and the piece trees that add up to them are keyed
    /// BLAKE3 with it.
    #[must_use]
    pub fn chunk_id_key(&self) -> &[u8; 32] {
        &self.master[CHUNK_ID]
    }

    /// Keyed BLAKE3 (with the chunk-id key) of a chunk's plaintext: chunk names reveal nothing
    /// of content, not even whether two stores hold the same data.
    #[must_use]
    pub fn chunk_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.master[CHUNK_ID], data).as_bytes()
    }

    /// MAC of a store's header (`rewind-store.json` without its `mac_hex`), with a key
    /// derived from the master key: a header changed by anyone without the key is found.
    #[must_use]
    pub fn header_mac(&self, header: &[u8]) -> [u8; 32] {
        let key = Zeroizing::new(blake3::derive_key(
            "rewind-store 2026-12 header mac",
            self.master.as_flattened(),
        ));
        *blake3::keyed_hash(&key, header).as_bytes()
    }

    /// Authenticated encryption with the encryption key: returns `nonce (24 random bytes) ‖
    /// ciphertext ‖ tag (16)`, [`SEAL_OVERHEAD_BYTES`] longer than `plaintext`. `aad` is
    /// authenticated but not stored: [`Keys::open`] must be given the same.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Random`] if the system's random number generator fails.
    ///
    /// # Panics
    ///
    /// If `plaintext` is 256 GiB or longer, which XChaCha20-Poly1305 cannot seal.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        seal_with(&self.master[ENCRYPTION], plaintext, aad)
    }

    /// Inverse of [`Keys::seal`]; nothing unauthenticated is ever returned. Never panics.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Tampered`] for any modification of the sealed bytes or of `aad`, bytes
    /// sealed with other keys, and input shorter than [`SEAL_OVERHEAD_BYTES`].
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (nonce, ciphertext, tag) = split_sealed(sealed).ok_or(CryptoError::Tampered)?;
        let mut plaintext = ciphertext.to_vec();
        cipher(&self.master[ENCRYPTION])
            .decrypt_inout_detached(
                nonce.into(),
                aad,
                plaintext.as_mut_slice().into(),
                tag.into(),
            )
            .map_err(|_| CryptoError::Tampered)?;
        Ok(plaintext)
    }

    fn zeroed() -> Keys {
        Keys {
            master: Box::new(Zeroizing::new([[0; KEY_BYTES]; 2])),
        }
    }
}

/// The AEAD with `key`.
///
/// The cipher keeps its own copy of the key, which is not wiped on drop unless the
/// `zeroize` feature of `chacha20poly1305` is enabled; building it per message keeps that
/// copy short-lived.
fn cipher(key: &[u8; KEY_BYTES]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(key.into())
}

fn seal_with(key: &[u8; KEY_BYTES], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_BYTES];
    fill_random(&mut nonce)?;
    // Allocated once at its final size, so no reallocation leaves a stray copy of the
    // plaintext behind; the copy made here is encrypted in place right away.
    let mut sealed = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD_BYTES);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(plaintext);
    let tag = cipher(key)
        .encrypt_inout_detached((&nonce).into(), aad, (&mut sealed[NONCE_BYTES..]).into())
        .expect("XChaCha20-Poly1305 seals anything shorter than 256 GiB");
    sealed.extend_from_slice(&tag);
    Ok(sealed)
}

/// Splits `nonce ‖ ciphertext ‖ tag`; `None` if it is too short to hold a nonce and a tag.
fn split_sealed(sealed: &[u8]) -> Option<(&[u8; NONCE_BYTES], &[u8], &[u8; TAG_BYTES])> {
    let (nonce, rest) = sealed.split_first_chunk::<NONCE_BYTES>()?;
    let (ciphertext, tag) = rest.split_last_chunk::<TAG_BYTES>()?;
    Some((nonce, ciphertext, tag))
}

fn fill_random(bytes: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(bytes).map_err(|e| CryptoError::Random(e.to_string()))
}

/// A key derivation cost that Rewind or Argon2 refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KdfCostError {
    /// More memory than Rewind allows.
    #[error(
        "the key derivation asks for {0} KiB of memory; at most {MAX_KDF_MEMORY_KIB} KiB (4 GiB) is allowed"
    )]
    Memory(u32),
    /// More iterations than Rewind allows.
    #[error("the key derivation asks for {0} iterations; at most {MAX_KDF_ITERATIONS} are allowed")]
    Iterations(u32),
    /// More lanes than Rewind allows.
    #[error("the key derivation asks for {0} lanes; at most {MAX_KDF_PARALLELISM} are allowed")]
    Parallelism(u32),
    /// Argon2 refuses the combination.
    #[error("Argon2id cannot run with {} KiB, {} iterations and {} lanes: {source}", cost.memory_kib, cost.iterations, cost.parallelism)]
    Argon2 {
        /// The cost.
        cost: KdfCost,
        /// Argon2's reason.
        source: argon2::Error,
    },
}

/// Checks a KDF cost against Rewind's limits and Argon2's; the error says what is wrong.
fn argon2_params(cost: KdfCost) -> Result<argon2::Params, KdfCostError> {
    let KdfCost {
        memory_kib,
        iterations,
        parallelism,
    } = cost;
    if memory_kib > MAX_KDF_MEMORY_KIB {
        return Err(KdfCostError::Memory(memory_kib));
    }
    if iterations > MAX_KDF_ITERATIONS {
        return Err(KdfCostError::Iterations(iterations));
    }
    if parallelism > MAX_KDF_PARALLELISM {
        return Err(KdfCostError::Parallelism(parallelism));
    }
    argon2::Params::new(memory_kib, iterations, parallelism, Some(KEY_BYTES))
        .map_err(|source| KdfCostError::Argon2 { cost, source })
}

/// Argon2's working memory, wiped when dropped: its final blocks determine the derived key.
struct ArgonMemory(Vec<argon2::Block>);

impl Drop for ArgonMemory {
    fn drop(&mut self) {
        for block in &mut self.0 {
            block.as_mut().zeroize();
        }
    }
}

/// Argon2id(`passphrase`, `salt`) into `key`.
fn derive_key(
    passphrase: &[u8],
    salt: &[u8],
    params: argon2::Params,
    key: &mut [u8; KEY_BYTES],
) -> Result<(), CryptoError> {
    // The memory is allocated here rather than by `hash_password_into` so that it can be
    // wiped afterwards (argon2's own wiping needs its `zeroize` feature), and so that failing
    // to get it is an error rather than an abort.
    let blocks = params.block_count();
    let mut memory = ArgonMemory(Vec::new());
    memory.0.try_reserve_exact(blocks).map_err(|_| {
        CryptoError::Kdf(format!(
            "could not allocate {} MiB of memory",
            params.m_cost().div_ceil(1024)
        ))
    })?;
    memory.0.resize(blocks, argon2::Block::new());
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into_with_memory(passphrase, salt, key, memory.0.as_mut_slice())
        .map_err(|e| CryptoError::Kdf(e.to_string()))
}

/// Decodes a hex field of the config, refusing (before decoding) anything over `max_bytes`.
fn decode_hex(field: &str, text: &str, max_bytes: usize) -> Result<Vec<u8>, CryptoError> {
    if text.len() > 2 * max_bytes {
        return Err(CryptoError::BadConfig(format!(
            "{field} is {} characters long; at most {} are expected",
            text.len(),
            2 * max_bytes
        )));
    }
    hex::decode(text).map_err(|e| CryptoError::BadConfig(format!("{field} is not valid hex: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTEXT: &[u8] = b"store-1";

    fn wrapped(passphrase: &[u8]) -> (Keys, EncryptionConfig) {
        let keys = Keys::generate().unwrap();
        let config = keys
            .wrap(passphrase, CONTEXT, KdfCost::FAST_FOR_TESTS)
            .unwrap();
        (keys, config)
    }

    fn same_keys(a: &Keys, b: &Keys) -> bool {
        a.master.as_flattened() == b.master.as_flattened()
    }

    /// Replaces the character at `i` of a hex string.
    fn with_char(text: &str, i: usize, c: char) -> String {
        text.chars()
            .enumerate()
            .map(|(j, old)| if j == i { c } else { old })
            .collect()
    }

    /// Another hex digit than `c`.
    fn other_digit(c: char) -> char {
        if c == '0' { '1' } else { '0' }
    }

    #[test]
    fn wrap_and_unwrap_round_trip() {
        let (keys, config) = wrapped(b"correct horse");
        assert_eq!(config.cipher, "xchacha20poly1305");
        assert_eq!(config.kdf, "argon2id");
        assert_eq!(
            (
                config.kdf_memory_kib,
                config.kdf_iterations,
                config.kdf_parallelism
            ),
            (64, 1, 1)
        );
        assert_eq!(config.salt_hex.len(), 2 * SALT_BYTES);
        assert_eq!(config.wrapped_key_hex.len(), 2 * (64 + SEAL_OVERHEAD_BYTES));

        let again = Keys::unwrap(&config, b"correct horse", CONTEXT).unwrap();
        assert!(same_keys(&keys, &again));
        assert_eq!(again.chunk_id(b"data"), keys.chunk_id(b"data"));
        let sealed = keys.seal(b"hello", b"aad").unwrap();
        assert_eq!(again.open(&sealed, b"aad").unwrap(), b"hello");

        // A fresh salt and nonce each time.
        let other = keys
            .wrap(b"correct horse", CONTEXT, KdfCost::FAST_FOR_TESTS)
            .unwrap();
        assert_ne!(other.salt_hex, config.salt_hex);
        assert_ne!(other.wrapped_key_hex, config.wrapped_key_hex);
        assert!(same_keys(
            &keys,
            &Keys::unwrap(&other, b"correct horse", CONTEXT).unwrap()
        ));
    }

    #[test]
    fn config_keeps_the_documented_field_names() {
        let (_, config) = wrapped(b"pass");
        let json = serde_json::to_value(&config).unwrap();
        let mut fields: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        fields.sort();
        assert_eq!(
            fields,
            [
                "cipher",
                "kdf",
                "kdf_iterations",
                "kdf_memory_kib",
                "kdf_parallelism",
                "salt_hex",
                "wrapped_key_hex"
            ]
        );
        assert_eq!(
            serde_json::from_value::<EncryptionConfig>(json).unwrap(),
            config
        );
    }

    /// A config written by the first implementation of format v1: the key layout, Argon2
    /// version, salt handling and associated data of the wrapped key must never change.
    #[test]
    fn unwraps_a_config_written_by_format_v1() {
        let config = EncryptionConfig {
            cipher: "xchacha20poly1305".into(),
            kdf: "argon2id".into(),
            kdf_memory_kib: 64,
            kdf_iterations: 1,
            kdf_parallelism: 1,
            salt_hex: "000102030405060708090a0b0c0d0e0f".into(),
            wrapped_key_hex: V1_WRAPPED_KEY_HEX.into(),
        };
        let keys = Keys::unwrap(&config, b"correct horse", b"store-v1").unwrap();
        let expected: Vec<u8> = (0..64).collect();
        assert_eq!(keys.master.as_flattened(), expected.as_slice());
        assert!(matches!(
            Keys::unwrap(&config, b"correct horse", b"store-v2"),
            Err(CryptoError::WrongPassphrase)
        ));
    }

    /// Master key 00 01 … 3f wrapped with passphrase "correct horse", the salt above, nonce
    /// 40 41 … 57 and context "store-v1".
    const V1_WRAPPED_KEY_HEX: &str = concat!(
        "404142434445464748494a4b4c4d4e4f5051525354555657",
        "f6e69f97e4f5f1c2c0c7d84c1e5b873bd6085879386ea9c60468dc440d96f7d5",
        "90b9816f15da0d0b88d3b414259ba5b79178ae538b813bcf8da1e64dd2a0892c",
        "c99148466daa7cb080354bbb52a6b3d3",
    );

    #[test]
    fn wrong_passphrase_or_context_is_wrong_passphrase() {
        let (_, config) = wrapped(b"correct horse");
        for (passphrase, context) in [
            (&b"Correct horse"[..], CONTEXT),
            (b"", CONTEXT),
            (b"correct horse ", CONTEXT),
            (b"correct horse", b"store-2"),
            (b"correct horse", b""),
        ] {
            assert!(matches!(
                Keys::unwrap(&config, passphrase, context),
                Err(CryptoError::WrongPassphrase)
            ));
        }
    }

    #[test]
    fn every_changed_character_of_salt_or_wrapped_key_is_an_error() {
        let (_, config) = wrapped(b"pass");
        for i in 0..config.wrapped_key_hex.len() {
            let digit = config.wrapped_key_hex.as_bytes()[i] as char;
            let mut c = config.clone();
            c.wrapped_key_hex = with_char(&config.wrapped_key_hex, i, other_digit(digit));
            assert!(matches!(
                Keys::unwrap(&c, b"pass", CONTEXT),
                Err(CryptoError::WrongPassphrase)
            ));
            c.wrapped_key_hex = with_char(&config.wrapped_key_hex, i, 'g');
            assert!(matches!(
                Keys::unwrap(&c, b"pass", CONTEXT),
                Err(CryptoError::BadConfig(_))
            ));
            c.wrapped_key_hex = with_char(&config.wrapped_key_hex, i, 'é');
            assert!(matches!(
                Keys::unwrap(&c, b"pass", CONTEXT),
                Err(CryptoError::BadConfig(_))
            ));
        }
        for i in 0..config.salt_hex.len() {
            let digit = config.salt_hex.as_bytes()[i] as char;
            let mut c = config.clone();
            c.salt_hex = with_char(&config.salt_hex, i, other_digit(digit));
            assert!(matches!(
                Keys::unwrap(&c, b"pass", CONTEXT),
                Err(CryptoError::WrongPassphrase)
            ));
            c.salt_hex = with_char(&config.salt_hex, i, 'z');
            assert!(matches!(
                Keys::unwrap(&c, b"pass", CONTEXT),
                Err(CryptoError::BadConfig(_))
            ));
        }
    }

    #[test]
    fn malformed_configs_are_bad_config() {
        let (_, config) = wrapped(b"pass");
        let bad = |change: &dyn Fn(&mut EncryptionConfig)| {
            let mut c = config.clone();
            change(&mut c);
            match Keys::unwrap(&c, b"pass", CONTEXT) {
                Err(CryptoError::BadConfig(detail)) => detail,
                other => panic!("{c:?} gave {other:?}"),
            }
        };
        assert!(bad(&|c| c.cipher = "aes256gcm".into()).contains("aes256gcm"));
        assert!(bad(&|c| c.cipher = "XChaCha20Poly1305".into()).contains("cipher"));
        assert!(bad(&|c| c.kdf = "scrypt".into()).contains("scrypt"));
        assert!(bad(&|c| c.salt_hex.clear()).contains("salt"));
        assert!(bad(&|c| c.salt_hex.truncate(31)).contains("salt_hex"));
        assert!(bad(&|c| c.salt_hex.truncate(30)).contains("15 bytes"));
        assert!(bad(&|c| c.salt_hex = "00".repeat(2000)).contains("salt_hex"));
        assert!(bad(&|c| c.wrapped_key_hex.clear()).contains("0 bytes"));
        assert!(bad(&|c| c.wrapped_key_hex.truncate(206)).contains("103 bytes"));
        assert!(bad(&|c| c.wrapped_key_hex.truncate(207)).contains("wrapped_key_hex"));
        assert!(bad(&|c| c.wrapped_key_hex.push_str("00")).contains("wrapped_key_hex"));
        assert!(bad(&|c| c.wrapped_key_hex = "x".repeat(1 << 20)).contains("wrapped_key_hex"));

        // All of it is found before the KDF runs: with this cost it would take minutes.
        let start = std::time::Instant::now();
        assert!(
            bad(&|c| {
                c.kdf_memory_kib = MAX_KDF_MEMORY_KIB;
                c.kdf_iterations = MAX_KDF_ITERATIONS;
                c.wrapped_key_hex.truncate(206);
            })
            .contains("103 bytes")
        );
        assert!(
            bad(&|c| {
                c.kdf_memory_kib = MAX_KDF_MEMORY_KIB;
                c.kdf_iterations = MAX_KDF_ITERATIONS;
                c.salt_hex.truncate(30);
            })
            .contains("15 bytes")
        );
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn absurd_kdf_costs_are_bad_config_and_cost_nothing() {
        let (_, config) = wrapped(b"pass");
        let costs = [
            (MAX_KDF_MEMORY_KIB + 1, 1, 1),
            (u32::MAX, 1, 1),
            (64, MAX_KDF_ITERATIONS + 1, 1),
            (64, u32::MAX, 1),
            (1 << 20, 1, MAX_KDF_PARALLELISM + 1),
            (u32::MAX, u32::MAX, u32::MAX),
            // Below Argon2's minimums.
            (64, 0, 1),
            (64, 1, 0),
            (7, 1, 1),
            (8 * 4 - 1, 1, 4),
            (0, 0, 0),
        ];
        let start = std::time::Instant::now();
        for (memory_kib, iterations, parallelism) in costs {
            let mut c = config.clone();
            c.kdf_memory_kib = memory_kib;
            c.kdf_iterations = iterations;
            c.kdf_parallelism = parallelism;
            assert!(
                matches!(
                    Keys::unwrap(&c, b"pass", CONTEXT),
                    Err(CryptoError::BadConfig(_))
                ),
                "{memory_kib} KiB, {iterations} iterations, {parallelism} lanes"
            );
        }
        // Refused up front, not after trying.
        assert!(start.elapsed() < std::time::Duration::from_secs(1));

        // `wrap` refuses to write a config that `unwrap` would refuse.
        let keys = Keys::generate().unwrap();
        for cost in [
            KdfCost {
                memory_kib: u32::MAX,
                ..KdfCost::DEFAULT
            },
            KdfCost {
                iterations: 0,
                ..KdfCost::FAST_FOR_TESTS
            },
        ] {
            assert!(matches!(
                keys.wrap(b"pass", CONTEXT, cost),
                Err(CryptoError::Kdf(_))
            ));
        }
    }

    #[test]
    fn seal_and_open_round_trip() {
        let keys = Keys::generate().unwrap();
        for plaintext in [&b""[..], b"x", b"some plaintext", &vec![0xa5; 100_000]] {
            for aad in [&b""[..], b"aad"] {
                let sealed = keys.seal(plaintext, aad).unwrap();
                assert_eq!(sealed.len(), plaintext.len() + SEAL_OVERHEAD_BYTES);
                assert_eq!(keys.open(&sealed, aad).unwrap(), plaintext);
            }
        }
        let sealed = keys.seal(b"some plaintext", b"").unwrap();
        assert!(!sealed.windows(14).any(|w| w == b"some plaintext"));
    }

    #[test]
    fn every_bit_flip_is_tampered() {
        let keys = Keys::generate().unwrap();
        let sealed = keys.seal(b"some plaintext", b"aad").unwrap();
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut s = sealed.clone();
                s[i] ^= 1 << bit;
                assert!(
                    matches!(keys.open(&s, b"aad"), Err(CryptoError::Tampered)),
                    "byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn wrong_aad_or_keys_is_tampered() {
        let keys = Keys::generate().unwrap();
        let sealed = keys.seal(b"some plaintext", b"aad").unwrap();
        for aad in [&b""[..], b"aae", b"aad\0", b"AAD"] {
            assert!(matches!(
                keys.open(&sealed, aad),
                Err(CryptoError::Tampered)
            ));
        }
        let other = Keys::generate().unwrap();
        assert!(matches!(
            other.open(&sealed, b"aad"),
            Err(CryptoError::Tampered)
        ));
    }

    #[test]
    fn truncated_or_extended_input_is_tampered() {
        let keys = Keys::generate().unwrap();
        let sealed = keys.seal(b"some plaintext", b"aad").unwrap();
        for n in 0..sealed.len() {
            assert!(
                matches!(keys.open(&sealed[..n], b"aad"), Err(CryptoError::Tampered)),
                "{n} bytes"
            );
            assert!(matches!(
                keys.open(&sealed[n + 1..], b"aad"),
                Err(CryptoError::Tampered)
            ));
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(
            keys.open(&longer, b"aad"),
            Err(CryptoError::Tampered)
        ));
        // Exactly nonce + tag is a valid empty message, but not this one.
        assert!(matches!(
            keys.open(&[0; SEAL_OVERHEAD_BYTES], b""),
            Err(CryptoError::Tampered)
        ));
    }

    #[test]
    fn seals_of_the_same_plaintext_differ() {
        let keys = Keys::generate().unwrap();
        let a = keys.seal(b"same", b"").unwrap();
        let b = keys.seal(b"same", b"").unwrap();
        assert_ne!(a[..NONCE_BYTES], b[..NONCE_BYTES], "fresh nonces");
        assert_ne!(a, b);
    }

    #[test]
    fn chunk_ids_are_keyed_with_the_chunk_id_key() {
        let a = Keys::generate().unwrap();
        let b = Keys::generate().unwrap();
        assert!(!same_keys(&a, &b));
        assert_eq!(a.chunk_id(b"data"), a.chunk_id(b"data"));
        assert_ne!(a.chunk_id(b"data"), a.chunk_id(b"datb"));
        assert_ne!(a.chunk_id(b"data"), b.chunk_id(b"data"));
        assert_ne!(a.chunk_id(b"data"), *blake3::hash(b"data").as_bytes());
        assert_eq!(
            a.chunk_id(b"data"),
            *blake3::keyed_hash(&a.master[CHUNK_ID], b"data").as_bytes()
        );
        assert_ne!(a.master[CHUNK_ID], a.master[ENCRYPTION]);
    }

    #[test]
    fn debug_shows_no_key_material() {
        let keys = Keys::generate().unwrap();
        assert_eq!(format!("{keys:?}"), "Keys { .. }");
        for shown in [format!("{keys:?}"), format!("{keys:#?}")] {
            for key in keys.master.iter() {
                assert!(!shown.contains(&hex::encode(key)));
                assert!(!shown.contains(&hex::encode(&key[..2])));
                assert!(!shown.contains(&format!("{}, {}", key[0], key[1])));
            }
        }
    }
}
