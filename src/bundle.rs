//! Bundle identity: a bundle is named by the BLAKE3-256 hash of its content.
//!
//! The id is the only name a bundle has anywhere in the tree, so it is parsed strictly
//! (exactly 64 lowercase hex characters) before it touches a path or an upstream URL.

use std::fmt;
use std::str::FromStr;

/// The BLAKE3-256 hash of a bundle's content; displayed as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleId([u8; 32]);

/// Why a string is not a bundle id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleIdError {
    #[error("bundle id must be 64 characters, got {len}")]
    Length { len: usize },
    #[error("bundle id must be lowercase hex; found {found:?} at position {position}")]
    Character { found: char, position: usize },
}

impl BundleId {
    /// The id of `content`, as computed by BLAKE3.
    pub fn of(content: &[u8]) -> Self {
        Self::from_hash(blake3::hash(content))
    }

    /// Wraps a finished BLAKE3 hash.
    pub fn from_hash(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }

    /// The raw 32 bytes of the hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `hash` (of some received content) is this id.
    ///
    /// `blake3::Hash` compares in constant time, which costs nothing here and keeps the
    /// comparison free of timing questions.
    pub fn matches(&self, hash: &blake3::Hash) -> bool {
        *hash == blake3::Hash::from(self.0)
    }
}

impl FromStr for BundleId {
    type Err = BundleIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(BundleIdError::Length {
                len: s.chars().count(),
            });
        }

        let mut out = [0u8; 32];
        for (position, c) in s.chars().enumerate() {
            let nibble = match c {
                '0'..='9' => c as u8 - b'0',
                'a'..='f' => c as u8 - b'a' + 10,
                found => return Err(BundleIdError::Character { found, position }),
            };
            out[position / 2] |= if position % 2 == 0 {
                nibble << 4
            } else {
                nibble
            };
        }
        Ok(Self(out))
    }
}

impl fmt::Display for BundleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BundleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BundleId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_hex() {
        let id = BundleId::of(b"hello bundle");
        let text = id.to_string();
        assert_eq!(text, blake3::hash(b"hello bundle").to_hex().as_str());
        assert_eq!(text.parse::<BundleId>(), Ok(id));
    }

    #[test]
    fn rejects_wrong_length() {
        assert_eq!(
            "abc".parse::<BundleId>(),
            Err(BundleIdError::Length { len: 3 })
        );
        let long = "a".repeat(65);
        assert_eq!(
            long.parse::<BundleId>(),
            Err(BundleIdError::Length { len: 65 })
        );
    }

    #[test]
    fn rejects_uppercase_and_non_hex() {
        let mut upper = BundleId::of(b"x").to_string();
        upper.replace_range(10..11, "A");
        assert!(matches!(
            upper.parse::<BundleId>(),
            Err(BundleIdError::Character {
                found: 'A',
                position: 10
            })
        ));

        let dots = format!("..{}", "0".repeat(62));
        assert!(dots.parse::<BundleId>().is_err());
    }

    #[test]
    fn multibyte_input_of_64_bytes_is_rejected_not_panicking() {
        let s = "é".repeat(32);
        assert_eq!(s.len(), 64);
        assert!(s.parse::<BundleId>().is_err());
    }

    #[test]
    fn matches_only_its_own_hash() {
        let id = BundleId::of(b"content");
        assert!(id.matches(&blake3::hash(b"content")));
        assert!(!id.matches(&blake3::hash(b"contenT")));
    }
}
