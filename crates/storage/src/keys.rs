//! Big-endian, order-preserving key encodings.
//!
//! Strings are written as a u16 big-endian length followed by their bytes. Because the length
//! comes first, a session key is a *complete* prefix: no other session's keys can start with it
//! (tenant "a" + client "bc" and tenant "ab" + client "c" differ in the first length byte), so a
//! prefix scan over one session never picks up a neighbour's records. Numbers are big-endian so
//! lexicographic byte order equals numeric order and range scans come out sorted.

use crate::error::{Result, StorageError};
use crate::records::SessionKey;

/// Appends a u16-BE-length-prefixed string.
pub fn put_str(buf: &mut Vec<u8>, s: &str) -> Result<()> {
    let len = u16::try_from(s.len()).map_err(|_| StorageError::KeyTooLong(s.len()))?;
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Appends a session key: tenant then client id, both length-prefixed.
pub fn put_session(buf: &mut Vec<u8>, key: &SessionKey) -> Result<()> {
    put_str(buf, &key.tenant)?;
    put_str(buf, &key.client_id)
}

/// Encodes a session key on its own.
pub fn session_key(key: &SessionKey) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(4 + key.tenant.len() + key.client_id.len());
    put_session(&mut buf, key)?;
    Ok(buf)
}

/// Encodes a u64 so byte order equals numeric order.
pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Reads a length-prefixed string from the front of `buf`, returning it and the rest.
pub fn take_str(buf: &[u8]) -> Option<(String, &[u8])> {
    let (len, rest) = buf.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len {
        return None;
    }
    let (s, rest) = rest.split_at(len);
    Some((String::from_utf8(s.to_vec()).ok()?, rest))
}

/// Reads a session key from the front of `buf`, returning it and the rest.
pub fn take_session(buf: &[u8]) -> Option<(SessionKey, &[u8])> {
    let (tenant, rest) = take_str(buf)?;
    let (client_id, rest) = take_str(rest)?;
    Some((SessionKey { tenant, client_id }, rest))
}

/// Reads a big-endian u64 that must fill `buf` exactly.
pub fn read_u64(buf: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(buf.try_into().ok()?))
}

/// Reads a big-endian u16 that must fill `buf` exactly.
pub fn read_u16(buf: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(buf.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sk(t: &str, c: &str) -> Vec<u8> {
        session_key(&SessionKey::new(t, c)).expect("short key")
    }

    #[test]
    fn session_prefixes_never_overlap() {
        let a = sk("a", "bc");
        let b = sk("ab", "c");
        assert_ne!(a, b);
        assert!(!a.starts_with(&b) && !b.starts_with(&a));
        // A client id that extends another must not make one key a prefix of the other either.
        let c = sk("t", "dev");
        let d = sk("t", "dev1");
        assert!(!d.starts_with(&c));
    }

    #[test]
    fn u64_order_is_numeric() {
        let mut v: Vec<u64> = vec![300, 1, 256, u64::MAX, 0, 65_536];
        let mut enc: Vec<[u8; 8]> = v.iter().map(|n| u64_key(*n)).collect();
        v.sort();
        enc.sort();
        let dec: Vec<u64> = enc.iter().map(|b| u64::from_be_bytes(*b)).collect();
        assert_eq!(v, dec);
    }

    #[test]
    fn queue_keys_of_one_session_sort_by_seq() {
        let mut keys: Vec<Vec<u8>> = [5u64, 1, 1000, 70_000]
            .iter()
            .map(|s| {
                let mut k = sk("t", "c");
                k.extend_from_slice(&u64_key(*s));
                k
            })
            .collect();
        keys.sort();
        let prefix = sk("t", "c");
        let seqs: Vec<u64> = keys
            .iter()
            .map(|k| read_u64(&k[prefix.len()..]).expect("8 bytes"))
            .collect();
        assert_eq!(seqs, vec![1, 5, 1000, 70_000]);
    }

    #[test]
    fn round_trip_and_too_long() {
        let key = SessionKey::new("tenant", "client-ü");
        let enc = session_key(&key).expect("short");
        let (back, rest) = take_session(&enc).expect("decodes");
        assert_eq!(back, key);
        assert!(rest.is_empty());
        let long = "x".repeat(70_000);
        assert!(matches!(
            put_str(&mut Vec::new(), &long),
            Err(StorageError::KeyTooLong(70_000))
        ));
        assert!(take_str(&[0, 5, b'a']).is_none());
    }
}
