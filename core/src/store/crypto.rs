//! Encryption of a store: Argon2id key derivation from the passphrase, XChaCha20-Poly1305
//! authenticated encryption of chunks, index pages and manifests, and keyed chunk names.
//!
//! The store has one random 64-byte master key: a 32-byte encryption key and a 32-byte
//! chunk-id key. It is kept in `rewind-store.json` wrapped (sealed) with a key derived from
//! the passphrase, so changing the passphrase later only rewraps it. Every sealed message
//! carries a fresh random 24-byte nonce: `XChaCha20`'s nonce is long enough for random nonces
//! to be safe however many chunks a store holds.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
/// Bytes [`Keys::seal`] adds to a plaintext: nonce and tag.
pub const SEAL_OVERHEAD_BYTES: usize = NONCE_BYTES + TAG_BYTES;
const SALT_BYTES: usize = 16;
const CIPHER: &str = "xchacha20poly1305";
const KDF: &str = "argon2id";
/// Limits on KDF parameters read from a store: a hostile config must not be able to make
/// Rewind allocate gigabytes or spin for hours.
const MAX_MEMORY_KIB: u32 = 4 << 20;
const MAX_ITERATIONS: u32 = 100;
const MAX_PARALLELISM: u32 = 64;

/// Cost of the passphrase KDF (Argon2id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfCost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfCost {
    /// For real stores: 64 MiB, 3 passes, 1 lane (above OWASP's Argon2id minimum).
    pub const DEFAULT: KdfCost = KdfCost {
        memory_kib: 64 << 10,
        iterations: 3,
        parallelism: 1,
    };
    /// Cheap parameters, for tests only.
    pub const FAST_FOR_TESTS: KdfCost = KdfCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
}

/// What `rewind-store.json` keeps about a store's encryption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionConfig {
    /// Always `xchacha20poly1305`.
    pub cipher: String,
    /// Always `argon2id`.
    pub kdf: String,
    /// Argon2id memory in KiB.
    pub kdf_memory_kib: u32,
    /// Argon2id passes.
    pub kdf_iterations: u32,
    /// Argon2id lanes.
    pub kdf_parallelism: u32,
    /// Random salt, hex.
    pub salt_hex: String,
    /// `nonce ‖ ciphertext ‖ tag` of the 64-byte master key, hex.
    pub wrapped_key_hex: String,
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The passphrase does not unwrap the key.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// A sealed message failed authentication.
    #[error("authentication failed: the data was modified or damaged")]
    Tampered,
    /// The encryption settings cannot be used.
    #[error("{0}")]
    BadConfig(String),
    /// No randomness.
    #[error("the system's random number generator failed: {0}")]
    Random(String),
    /// Argon2 refused its parameters.
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

/// The store's secret keys. Zeroed when dropped; never printed.
pub struct Keys {
    encryption: Zeroizing<[u8; 32]>,
    chunk_id: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { .. }")
    }
}

fn random<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| CryptoError::Random(e.to_string()))?;
    Ok(bytes)
}

fn derive(
    passphrase: &[u8],
    salt: &[u8],
    cost: KdfCost,
) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let params = argon2::Params::new(cost.memory_kib, cost.iterations, cost.parallelism, Some(32))
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, key.as_mut())
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    Ok(key)
}

fn seal_with(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let cipher = XChaCha20Poly1305::new_from_slice(key).expect("32-byte key");
    let nonce_bytes = random::<NONCE_BYTES>()?;
    let nonce = XNonce::from(nonce_bytes);
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Kdf("encryption failed (message too long)".into()))?;
    let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn open_with(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < SEAL_OVERHEAD_BYTES {
        return Err(CryptoError::Tampered);
    }
    let cipher = XChaCha20Poly1305::new_from_slice(key).expect("32-byte key");
    let (nonce, body) = sealed.split_at(NONCE_BYTES);
    let nonce = XNonce::try_from(nonce).map_err(|_| CryptoError::Tampered)?;
    cipher
        .decrypt(&nonce, Payload { msg: body, aad })
        .map_err(|_| CryptoError::Tampered)
}

impl Keys {
    /// Fresh random keys for a new store.
    pub fn generate() -> Result<Keys, CryptoError> {
        Ok(Keys {
            encryption: Zeroizing::new(random()?),
            chunk_id: Zeroizing::new(random()?),
        })
    }

    /// Wraps the keys with a key derived from `passphrase` (fresh salt); `context` (the
    /// store's id) is bound as associated data, so the wrapped key does not open elsewhere.
    pub fn wrap(
        &self,
        passphrase: &[u8],
        context: &[u8],
        cost: KdfCost,
    ) -> Result<EncryptionConfig, CryptoError> {
        let salt = random::<SALT_BYTES>()?;
        let wrapping = derive(passphrase, &salt, cost)?;
        let mut master = Zeroizing::new([0u8; 64]);
        master[..32].copy_from_slice(self.encryption.as_ref());
        master[32..].copy_from_slice(self.chunk_id.as_ref());
        let wrapped = seal_with(&wrapping, master.as_ref(), context)?;
        Ok(EncryptionConfig {
            cipher: CIPHER.into(),
            kdf: KDF.into(),
            kdf_memory_kib: cost.memory_kib,
            kdf_iterations: cost.iterations,
            kdf_parallelism: cost.parallelism,
            salt_hex: hex::encode(salt),
            wrapped_key_hex: hex::encode(wrapped),
        })
    }

    /// Unwraps the keys; a wrong passphrase (or a config from another store) is
    /// [`CryptoError::WrongPassphrase`], unusable settings [`CryptoError::BadConfig`].
    pub fn unwrap(
        config: &EncryptionConfig,
        passphrase: &[u8],
        context: &[u8],
    ) -> Result<Keys, CryptoError> {
        if config.cipher != CIPHER {
            return Err(CryptoError::BadConfig(format!(
                "unknown cipher {:?}",
                config.cipher
            )));
        }
        if config.kdf != KDF {
            return Err(CryptoError::BadConfig(format!(
                "unknown key derivation {:?}",
                config.kdf
            )));
        }
        if config.kdf_memory_kib > MAX_MEMORY_KIB
            || config.kdf_iterations > MAX_ITERATIONS
            || config.kdf_parallelism > MAX_PARALLELISM
        {
            return Err(CryptoError::BadConfig(format!(
                "key derivation cost ({} KiB, {} passes, {} lanes) is beyond what Rewind accepts",
                config.kdf_memory_kib, config.kdf_iterations, config.kdf_parallelism
            )));
        }
        let salt = hex::decode(&config.salt_hex)
            .map_err(|e| CryptoError::BadConfig(format!("salt: {e}")))?;
        if salt.len() < argon2::MIN_SALT_LEN {
            return Err(CryptoError::BadConfig("salt is too short".into()));
        }
        let wrapped = hex::decode(&config.wrapped_key_hex)
            .map_err(|e| CryptoError::BadConfig(format!("wrapped key: {e}")))?;
        if wrapped.len() != 64 + SEAL_OVERHEAD_BYTES {
            return Err(CryptoError::BadConfig(format!(
                "wrapped key is {} bytes, not {}",
                wrapped.len(),
                64 + SEAL_OVERHEAD_BYTES
            )));
        }
        let cost = KdfCost {
            memory_kib: config.kdf_memory_kib,
            iterations: config.kdf_iterations,
            parallelism: config.kdf_parallelism,
        };
        let wrapping =
            derive(passphrase, &salt, cost).map_err(|e| CryptoError::BadConfig(e.to_string()))?;
        let mut master = Zeroizing::new(
            open_with(&wrapping, &wrapped, context).map_err(|_| CryptoError::WrongPassphrase)?,
        );
        let mut keys = Keys {
            encryption: Zeroizing::new([0; 32]),
            chunk_id: Zeroizing::new([0; 32]),
        };
        keys.encryption.copy_from_slice(&master[..32]);
        keys.chunk_id.copy_from_slice(&master[32..64]);
        master.zeroize();
        Ok(keys)
    }

    /// Keyed BLAKE3 of a chunk's content: chunk names reveal nothing of the content.
    #[must_use]
    pub fn chunk_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.chunk_id, data).as_bytes()
    }

    /// Encrypts and authenticates: `nonce (24) ‖ ciphertext ‖ tag (16)`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        seal_with(&self.encryption, plaintext, aad)
    }

    /// Inverse of [`Keys::seal`]; anything modified is [`CryptoError::Tampered`].
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.encryption, sealed, aad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(pass: &[u8]) -> (Keys, EncryptionConfig) {
        let keys = Keys::generate().unwrap();
        let config = keys
            .wrap(pass, b"store-1", KdfCost::FAST_FOR_TESTS)
            .unwrap();
        (keys, config)
    }

    #[test]
    fn wrap_and_unwrap() {
        let (keys, config) = wrapped(b"pass");
        let again = Keys::unwrap(&config, b"pass", b"store-1").unwrap();
        assert_eq!(keys.chunk_id(b"x"), again.chunk_id(b"x"));
        let sealed = keys.seal(b"hello", b"aad").unwrap();
        assert_eq!(again.open(&sealed, b"aad").unwrap(), b"hello");
        assert!(matches!(
            Keys::unwrap(&config, b"Pass", b"store-1"),
            Err(CryptoError::WrongPassphrase)
        ));
        assert!(matches!(
            Keys::unwrap(&config, b"pass", b"store-2"),
            Err(CryptoError::WrongPassphrase)
        ));
    }

    #[test]
    fn damaged_or_hostile_configs_are_errors() {
        let (_, config) = wrapped(b"pass");
        for i in 0..config.wrapped_key_hex.len() {
            let mut c = config.clone();
            let mut bytes = c.wrapped_key_hex.into_bytes();
            bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
            c.wrapped_key_hex = String::from_utf8(bytes).unwrap();
            assert!(Keys::unwrap(&c, b"pass", b"store-1").is_err());
        }
        let mut c = config.clone();
        c.salt_hex.replace_range(0..2, "zz");
        assert!(matches!(
            Keys::unwrap(&c, b"pass", b"store-1"),
            Err(CryptoError::BadConfig(_))
        ));
        let mut c = config.clone();
        c.kdf_memory_kib = u32::MAX;
        assert!(matches!(
            Keys::unwrap(&c, b"pass", b"store-1"),
            Err(CryptoError::BadConfig(_))
        ));
        let mut c = config.clone();
        c.kdf_iterations = 0;
        assert!(matches!(
            Keys::unwrap(&c, b"pass", b"store-1"),
            Err(CryptoError::BadConfig(_))
        ));
        let mut c = config.clone();
        c.cipher = "rot13".into();
        assert!(matches!(
            Keys::unwrap(&c, b"pass", b"store-1"),
            Err(CryptoError::BadConfig(_))
        ));
        let mut c = config;
        c.wrapped_key_hex.truncate(10);
        assert!(matches!(
            Keys::unwrap(&c, b"pass", b"store-1"),
            Err(CryptoError::BadConfig(_))
        ));
    }

    #[test]
    fn every_bit_flip_and_truncation_is_detected() {
        let keys = Keys::generate().unwrap();
        let sealed = keys.seal(b"some plaintext", b"aad").unwrap();
        assert_eq!(sealed.len(), 14 + SEAL_OVERHEAD_BYTES);
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut s = sealed.clone();
                s[i] ^= 1 << bit;
                assert!(matches!(keys.open(&s, b"aad"), Err(CryptoError::Tampered)));
            }
        }
        assert!(matches!(
            keys.open(&sealed, b"other"),
            Err(CryptoError::Tampered)
        ));
        for n in 0..sealed.len() {
            assert!(keys.open(&sealed[..n], b"aad").is_err());
        }
        let empty = keys.seal(b"", b"").unwrap();
        assert_eq!(keys.open(&empty, b"").unwrap(), b"");
        assert_ne!(
            keys.seal(b"same", b"").unwrap(),
            keys.seal(b"same", b"").unwrap(),
            "fresh nonces"
        );
    }

    #[test]
    fn chunk_ids_are_keyed_and_keys_are_not_printed() {
        let a = Keys::generate().unwrap();
        let b = Keys::generate().unwrap();
        assert_ne!(a.chunk_id(b"data"), b.chunk_id(b"data"));
        assert_ne!(a.chunk_id(b"data"), *blake3::hash(b"data").as_bytes());
        let shown = format!("{a:?}");
        assert_eq!(shown, "Keys { .. }");
        assert!(!shown.contains(&hex::encode(&a.encryption[..4])));
    }
}
