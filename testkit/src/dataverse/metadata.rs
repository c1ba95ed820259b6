//! `GET /api/data/v9.x/$metadata` of the stand-in, as Dataverse serves it: the CSDL
//! fixture the access tests use (`tests/fixtures/csdl.xml`) as `application/xml`, an
//! ETag, 304 to a matching `If-None-Match`, and only with a valid S2S bearer token. Tests
//! can make it fail, slow or serve another document. Its answers are counted here and
//! not recorded with [`DataverseHandle::requests`], so the gateway's own background
//! fetches do not shift the request counts other tests assert on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use aws_lc_rs::digest;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::{DataverseHandle, DvResponse, DvState, API_VERSIONS};
use crate::server::{full, lock, RespBody};

/// The CSDL the stand-in serves unless a test replaces it.
pub const CSDL_FIXTURE: &str = include_str!("../../../tests/fixtures/csdl.xml");

/// How the stand-in's `$metadata` has answered so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetadataAnswers {
    /// 200 with the document.
    pub served: usize,
    /// 304 to a matching `If-None-Match`.
    pub not_modified: usize,
    /// The failure a test switched on.
    pub failed: usize,
    /// 401: no valid S2S token.
    pub unauthorized: usize,
}

pub(super) struct MetadataStandIn {
    document: Mutex<(Bytes, String)>,
    failing: Mutex<Option<StatusCode>>,
    delay: Mutex<Duration>,
    if_none_match: Mutex<Vec<Option<String>>>,
    served: AtomicUsize,
    not_modified: AtomicUsize,
    failed: AtomicUsize,
    unauthorized: AtomicUsize,
}

impl Default for MetadataStandIn {
    fn default() -> Self {
        Self {
            document: Mutex::new(with_etag(Bytes::from_static(CSDL_FIXTURE.as_bytes()))),
            failing: Mutex::new(None),
            delay: Mutex::new(Duration::ZERO),
            if_none_match: Mutex::new(Vec::new()),
            served: AtomicUsize::new(0),
            not_modified: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            unauthorized: AtomicUsize::new(0),
        }
    }
}

/// A document and its strong ETag (a digest of its bytes, as a changed schema changes it).
fn with_etag(document: Bytes) -> (Bytes, String) {
    let hash = digest::digest(&digest::SHA256, &document);
    let hex: String = hash.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (document, format!("\"{hex}\""))
}

/// Whether a request is for `$metadata` (any API version the stand-in serves).
pub(super) fn is_metadata(method: &Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/api/data/") else {
        return false;
    };
    matches!(rest.split_once('/'), Some((version, "$metadata")) if API_VERSIONS.contains(&version))
        && (method == Method::GET || method == Method::HEAD)
}

impl DvState {
    /// Answers `$metadata`.
    pub(super) async fn metadata(&self, headers: &HeaderMap) -> Response<RespBody> {
        let stand_in = &self.metadata;
        let delay = *lock(&stand_in.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Err(denied) = self.authenticate(headers) {
            stand_in.unauthorized.fetch_add(1, Ordering::SeqCst);
            return self.finalize(denied.into_http());
        }
        let presented = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        lock(&stand_in.if_none_match).push(presented.clone());
        if let Some(status) = *lock(&stand_in.failing) {
            stand_in.failed.fetch_add(1, Ordering::SeqCst);
            return self.finalize(
                DvResponse::error(status, "0x80040216", "The metadata could not be built.")
                    .into_http(),
            );
        }
        let (document, etag) = lock(&stand_in.document).clone();
        let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
        let mut response = if presented.is_some_and(|p| p.split(',').any(|t| t.trim() == etag)) {
            stand_in.not_modified.fetch_add(1, Ordering::SeqCst);
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else {
            stand_in.served.fetch_add(1, Ordering::SeqCst);
            let mut r = Response::new(full(document));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/xml"),
            );
            r
        };
        response.headers_mut().insert(header::ETAG, etag_value);
        self.finalize(response)
    }
}

impl DataverseHandle {
    /// `$metadata` answers `status` (with a Dataverse error body) until set back to `None`.
    pub fn set_metadata_failing(&self, status: Option<u16>) {
        *lock(&self.state.metadata.failing) = status.and_then(|s| StatusCode::from_u16(s).ok());
    }

    /// Delays each `$metadata` answer by `d`; zero turns it off.
    pub fn set_metadata_delay(&self, d: Duration) {
        *lock(&self.state.metadata.delay) = d;
    }

    /// Serves `document` as `$metadata` from now on, with a new ETag.
    pub fn set_metadata_document(&self, document: impl Into<Bytes>) {
        *lock(&self.state.metadata.document) = with_etag(document.into());
    }

    /// The ETag `$metadata` is served with now.
    pub fn metadata_etag(&self) -> String {
        lock(&self.state.metadata.document).1.clone()
    }

    /// How `$metadata` has answered so far.
    pub fn metadata_answers(&self) -> MetadataAnswers {
        let m = &self.state.metadata;
        MetadataAnswers {
            served: m.served.load(Ordering::SeqCst),
            not_modified: m.not_modified.load(Ordering::SeqCst),
            failed: m.failed.load(Ordering::SeqCst),
            unauthorized: m.unauthorized.load(Ordering::SeqCst),
        }
    }

    /// The `If-None-Match` of each `$metadata` request with a valid token, in order.
    pub fn metadata_if_none_match(&self) -> Vec<Option<String>> {
        lock(&self.state.metadata.if_none_match).clone()
    }
}
