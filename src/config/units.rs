//! Values written as text with a unit, and keywords from a fixed set: each type reads
//! itself, so a wrong value is reported under its own dotted key (serde_path_to_error
//! knows the path) with what was expected.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer};

/// A duration that must carry a unit (`60s`, `15m`, `1h30m`): a bare number is refused
/// rather than guessed at (seconds? milliseconds?).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    pub const fn millis(millis: u64) -> Self {
        Self(std::time::Duration::from_millis(millis))
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("\"{t}\" has no unit; use e.g. \"{t}s\""));
        }
        humantime::parse_duration(t)
            .map(Self)
            .map_err(|e| format!("\"{t}\" is not a duration ({e}); use e.g. \"30s\", \"15m\""))
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

/// A size in bytes that must carry a unit (`512KiB`, `128MiB`, `1GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    pub const fn gib(n: u64) -> Self {
        Self(n << 30)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("\"{t}\" is not a size; use e.g. \"128MiB\""))?;
        let factor: u64 = match unit.trim() {
            "B" => 1,
            "KB" | "kB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            "" => return Err(format!("\"{t}\" has no unit; use e.g. \"{t}MiB\"")),
            other => {
                return Err(format!(
                    "unknown size unit \"{other}\"; use B, KiB, MiB, GiB, KB, MB or GB"
                ))
            }
        };
        number
            .checked_mul(factor)
            .map(Self)
            .ok_or_else(|| format!("\"{t}\" is too large"))
    }
}

/// Reads a string and parses it with `FromStr`, the parser's message becoming serde's
/// (a value that is not a string is refused as serde refuses it for a `String` field).
pub(crate) fn from_text<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(de::Error::custom)
}

/// `impl Deserialize` through [`from_text`] for types that parse themselves.
macro_rules! deserialize_from_str {
    ($($ty:ty),+ $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::config::units::from_text(d)
            }
        }
    )+};
}
pub(crate) use deserialize_from_str;

deserialize_from_str!(Duration, ByteSize);

/// An asymmetric JWS algorithm an issuer's tokens may be signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithm(pub jsonwebtoken::Algorithm);

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        use jsonwebtoken::Algorithm::*;
        // Only asymmetric algorithms: an issuer's keys are public, so an HMAC algorithm
        // would let anyone holding the public key forge tokens.
        Ok(Self(match text.trim() {
            "RS256" => RS256,
            "RS384" => RS384,
            "RS512" => RS512,
            "PS256" => PS256,
            "PS384" => PS384,
            "PS512" => PS512,
            "ES256" => ES256,
            "ES384" => ES384,
            "EdDSA" => EdDSA,
            other => return Err(format!(
                "algorithm \"{other}\" is not allowed; use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
            )),
        }))
    }
}

deserialize_from_str!(Algorithm);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!("1h30m".parse(), Ok(Duration::secs(5400)));
        assert_eq!(" 250ms ".parse(), Ok(Duration::millis(250)));
        assert_eq!(
            "30".parse::<Duration>(),
            Err("\"30\" has no unit; use e.g. \"30s\"".to_string())
        );
        let err = "soon".parse::<Duration>().unwrap_err();
        assert!(err.starts_with("\"soon\" is not a duration ("), "{err}");
    }

    #[test]
    fn sizes_need_units() {
        assert_eq!("128MiB".parse(), Ok(ByteSize::mib(128)));
        assert_eq!("1KB".parse(), Ok(ByteSize(1000)));
        assert_eq!(
            "128".parse::<ByteSize>(),
            Err("\"128\" has no unit; use e.g. \"128MiB\"".to_string())
        );
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(
            "99999999999999GiB".parse::<ByteSize>(),
            Err("\"99999999999999GiB\" is too large".to_string())
        );
    }
}
