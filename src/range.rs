//! The `Range` request header: one byte range, as RFC 9110 §14.2 defines it.
//!
//! A single range in any of its three forms is supported. Several ranges in one header
//! are refused with a clear error rather than answered with a multipart body no agent
//! asks for; a range unit other than `bytes` is ignored, as the RFC requires.

/// One requested byte range, before the length of the bundle is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-b`, both inclusive.
    FromTo(u64, u64),
    /// `bytes=a-`
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// A `Range` header the relay will not act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("malformed Range header: {0}")]
    Malformed(String),
    #[error("multiple ranges in one request are not supported; ask for one range")]
    Multiple,
}

/// The range cannot be served from a bundle of this length (416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Parses a `Range` header value. `Ok(None)` means "serve the whole bundle".
pub fn parse(value: &[u8]) -> Result<Option<ByteRange>, RangeError> {
    let text = std::str::from_utf8(value)
        .map_err(|_| RangeError::Malformed("not ASCII text".into()))?
        .trim();
    let Some((unit, spec)) = text.split_once('=') else {
        return Err(RangeError::Malformed(format!("{text:?} has no '='")));
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ok(None);
    }
    if spec.contains(',') {
        return Err(RangeError::Multiple);
    }

    let spec = spec.trim();
    let Some((first, last)) = spec.split_once('-') else {
        return Err(RangeError::Malformed(format!("{spec:?} is not first-last")));
    };
    let range = match (number(first)?, number(last)?) {
        (Some(a), Some(b)) if a <= b => ByteRange::FromTo(a, b),
        (Some(a), Some(b)) => {
            return Err(RangeError::Malformed(format!(
                "range {a}-{b} ends before it starts"
            )))
        }
        (Some(a), None) => ByteRange::From(a),
        (None, Some(n)) => ByteRange::Suffix(n),
        (None, None) => return Err(RangeError::Malformed("range without positions".into())),
    };
    Ok(Some(range))
}

fn number(text: &str) -> Result<Option<u64>, RangeError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::Malformed(format!(
            "{text:?} is not a byte position"
        )));
    }
    text.parse()
        .map(Some)
        .map_err(|_| RangeError::Malformed(format!("{text:?} is too large")))
}

impl ByteRange {
    /// The half-open span `start..end` this range selects from `len` bytes.
    pub fn resolve(self, len: u64) -> Result<(u64, u64), Unsatisfiable> {
        let (start, end) = match self {
            Self::FromTo(a, b) => (a, b.saturating_add(1).min(len)),
            Self::From(a) => (a, len),
            Self::Suffix(n) => (len.saturating_sub(n), if n == 0 { 0 } else { len }),
        };
        if start >= end {
            return Err(Unsatisfiable);
        }
        Ok((start, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(parse(b"bytes=0-99"), Ok(Some(ByteRange::FromTo(0, 99))));
        assert_eq!(parse(b"bytes=100-"), Ok(Some(ByteRange::From(100))));
        assert_eq!(parse(b"bytes=-50"), Ok(Some(ByteRange::Suffix(50))));
        assert_eq!(parse(b" Bytes = 5 - 6 "), Ok(Some(ByteRange::FromTo(5, 6))));
    }

    #[test]
    fn other_units_are_ignored() {
        assert_eq!(parse(b"items=0-1"), Ok(None));
    }

    #[test]
    fn refuses_malformed_and_multiple() {
        assert_eq!(parse(b"bytes=0-1,5-6"), Err(RangeError::Multiple));
        for bad in [
            &b"bytes=5-1"[..],
            b"bytes=-",
            b"bytes=a-b",
            b"bytes=1",
            b"0-1",
            b"bytes=+1-2",
            b"bytes=99999999999999999999999-",
            b"bytes=\xff-",
        ] {
            assert!(
                matches!(parse(bad), Err(RangeError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn resolves_against_length() {
        assert_eq!(ByteRange::FromTo(0, 9).resolve(100), Ok((0, 10)));
        assert_eq!(ByteRange::FromTo(90, 500).resolve(100), Ok((90, 100)));
        assert_eq!(ByteRange::From(99).resolve(100), Ok((99, 100)));
        assert_eq!(ByteRange::Suffix(10).resolve(100), Ok((90, 100)));
        assert_eq!(ByteRange::Suffix(1000).resolve(100), Ok((0, 100)));
        assert_eq!(
            ByteRange::FromTo(u64::MAX - 1, u64::MAX).resolve(100),
            Err(Unsatisfiable)
        );
    }

    #[test]
    fn unsatisfiable_ranges() {
        assert_eq!(ByteRange::From(100).resolve(100), Err(Unsatisfiable));
        assert_eq!(ByteRange::FromTo(100, 200).resolve(100), Err(Unsatisfiable));
        assert_eq!(ByteRange::Suffix(0).resolve(100), Err(Unsatisfiable));
        assert_eq!(ByteRange::From(0).resolve(0), Err(Unsatisfiable));
    }
}
