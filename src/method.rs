//! The HTTP methods the Dataverse Web API uses, decided at the edge: any other method is
//! answered 405 before authentication and never forwarded, and metrics label requests
//! only with these names, so a caller cannot grow a label set by inventing methods.

use http::Method;

/// A method the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebApiMethod {
    Get,
    Head,
    Post,
    Patch,
    Put,
    Delete,
}

/// The `Allow` header of a 405.
pub const ALLOW: &str = "GET, HEAD, POST, PATCH, PUT, DELETE";

/// The metric label for requests whose method the gateway does not forward.
pub const OTHER_LABEL: &str = "other";

/// A method outside the Web API's (TRACE, CONNECT, PROPFIND, MERGE, invented ones).
#[derive(Debug, thiserror::Error)]
#[error("the Dataverse Web API does not use this method; use one of {ALLOW}")]
pub struct MethodNotAllowed;

impl WebApiMethod {
    /// Parses the request's method; methods are case-sensitive (RFC 9110), so `get` is
    /// not `GET`.
    pub fn from_http(method: &Method) -> Result<Self, MethodNotAllowed> {
        Ok(match *method {
            Method::GET => Self::Get,
            Method::HEAD => Self::Head,
            Method::POST => Self::Post,
            Method::PATCH => Self::Patch,
            Method::PUT => Self::Put,
            Method::DELETE => Self::Delete,
            _ => return Err(MethodNotAllowed),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Patch => "PATCH",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
        }
    }

    /// The metric label of any method: its name when forwarded, else [`OTHER_LABEL`].
    pub fn label(method: &Method) -> &'static str {
        Self::from_http(method).map_or(OTHER_LABEL, Self::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_web_api_methods_are_forwarded_and_every_other_label_is_one_value() {
        for name in ["GET", "HEAD", "POST", "PATCH", "PUT", "DELETE"] {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(WebApiMethod::from_http(&method).unwrap().as_str(), name);
            assert_eq!(WebApiMethod::label(&method), name);
        }
        for name in [
            "TRACE", "CONNECT", "OPTIONS", "PROPFIND", "MERGE", "get", "X9aQ7z",
        ] {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            assert!(WebApiMethod::from_http(&method).is_err(), "{name}");
            assert_eq!(WebApiMethod::label(&method), OTHER_LABEL);
        }
    }
}
