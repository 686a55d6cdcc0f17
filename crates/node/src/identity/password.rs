//! Password hashing (argon2id) off the async threads, with a bounded number of hashes at once
//! and a cache of recently verified credentials.
//!
//! Why the cache: an argon2 verification costs ~20 MiB and tens of milliseconds by design, so a
//! reconnect storm of a few thousand devices would otherwise take minutes of CPU. A successful
//! verification stores HMAC(node key, stored hash ‖ password); the next login with the same
//! password and the same stored hash compares that digest in constant time instead. A changed
//! password changes the stored hash, so the old entry stops matching.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

/// Memory cost (KiB) of hashes of generated passwords (see `hash_generated`).
const GENERATED_M_KIB: u32 = 64;

/// Cached digests kept at most; the cache is cleared when full (a rare, cheap event).
const CACHE_MAX: usize = 200_000;

/// Hashes and verifies passwords.
pub struct Passwords {
    /// At most this many argon2 computations run at once (each needs ~19 MiB).
    permits: Semaphore,
    key: [u8; 32],
    cache: Mutex<HashMap<(String, String), [u8; 32]>>,
    /// A real hash to verify against when the user does not exist, so that the answer for an
    /// unknown user takes as long as for a wrong password (no user enumeration by timing).
    dummy: String,
}

impl Passwords {
    /// A hasher allowing `parallel` argon2 computations at once.
    pub fn new(parallel: usize) -> Arc<Passwords> {
        let dummy = hash_blocking("fleetmq-dummy-password").unwrap_or_default();
        Arc::new(Passwords {
            permits: Semaphore::new(parallel.max(1)),
            key: rand::random(),
            cache: Mutex::new(HashMap::new()),
            dummy,
        })
    }

    /// An argon2id PHC string for `password` (OWASP parameters: 19 MiB, 2 passes).
    pub async fn hash(&self, password: &str) -> Result<String, String> {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let pw = password.to_string();
        tokio::task::spawn_blocking(move || hash_blocking(&pw))
            .await
            .map_err(|e| e.to_string())?
    }

    /// An argon2id PHC string with light parameters, only for passwords this node generated
    /// itself (`generate(24)`: ~140 bits of entropy). A slow hash buys nothing against brute
    /// force of such a secret, and it would make the first login of every registered device
    /// after a node restart cost ~40 ms of CPU: a fleet reconnecting at once would queue for
    /// minutes. The PHC string carries its parameters, so `verify` needs no flag.
    pub fn hash_generated(password: &str) -> Result<String, String> {
        let params = argon2::Params::new(GENERATED_M_KIB, 1, 1, None).map_err(|e| e.to_string())?;
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    }

    fn digest(&self, phc: &str, password: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        mac.update(phc.as_bytes());
        mac.update(&[0]);
        mac.update(password);
        mac.finalize().into_bytes().into()
    }

    /// Whether this exact credential was verified recently (cheap, constant time).
    pub fn cached(&self, tenant: &str, user: &str, phc: &str, password: &[u8]) -> bool {
        let d = self.digest(phc, password);
        let cache = self.cache.lock();
        match cache.get(&(tenant.to_string(), user.to_string())) {
            Some(c) => bool::from(c.ct_eq(&d)),
            None => false,
        }
    }

    /// Verifies `password` against the stored PHC string (argon2, on a blocking thread).
    /// `None` for `phc` verifies against a dummy hash and always fails.
    pub async fn verify(
        &self,
        tenant: &str,
        user: &str,
        phc: Option<&str>,
        password: &[u8],
    ) -> bool {
        let real = phc.is_some();
        let phc_owned = phc.unwrap_or(&self.dummy).to_string();
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let pw = password.to_vec();
        let stored = phc_owned.clone();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&stored)
                .map(|h| Argon2::default().verify_password(&pw, &h).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if ok && real {
            let d = self.digest(&phc_owned, password);
            let mut cache = self.cache.lock();
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert((tenant.to_string(), user.to_string()), d);
        }
        ok && real
    }

    /// Forgets the cached credential of a user (password changed or user deleted).
    pub fn forget(&self, tenant: &str, user: &str) {
        self.cache
            .lock()
            .remove(&(tenant.to_string(), user.to_string()));
    }

    /// Drops the cached logins of every user of a tenant.
    pub fn forget_tenant(&self, tenant: &str) {
        self.cache.lock().retain(|(t, _), _| t != tenant);
    }
}

fn hash_blocking(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A random password of `len` characters from an alphabet without look-alikes.
pub fn generate(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verify_and_cache() {
        let p = Passwords::new(2);
        let h = p.hash("s3cret").await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(!p.cached("t1", "u", &h, b"s3cret"));
        assert!(p.verify("t1", "u", Some(&h), b"s3cret").await);
        assert!(p.cached("t1", "u", &h, b"s3cret"));
        assert!(!p.cached("t1", "u", &h, b"wrong"));
        assert!(!p.verify("t1", "u", Some(&h), b"wrong").await);
        assert!(!p.verify("t1", "nobody", None, b"s3cret").await);
        // A new hash (password changed) does not match the old digest.
        let h2 = p.hash("s3cret").await.unwrap();
        assert!(!p.cached("t1", "u", &h2, b"s3cret"));
        p.forget("t1", "u");
        assert!(!p.cached("t1", "u", &h, b"s3cret"));
    }

    #[tokio::test]
    async fn generated_password_hashes_are_light_but_verify() {
        let p = Passwords::new(1);
        let pw = generate(24);
        let h = Passwords::hash_generated(&pw).unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{h}");
        assert!(p.verify("t", "device_x", Some(&h), pw.as_bytes()).await);
        assert!(!p.verify("t", "device_x", Some(&h), b"guess").await);
    }

    #[test]
    fn generated_passwords_differ() {
        let a = generate(20);
        assert_eq!(a.len(), 20);
        assert_ne!(a, generate(20));
    }
}
