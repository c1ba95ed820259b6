//! File columns of the stand-in (`accounts.new_document`), as Dataverse serves them: a
//! whole upload in one `PATCH` with `x-ms-file-name`, or a chunked one (`PATCH` with
//! `x-ms-transfer-mode: chunked` answers a `Location` carrying a session token and the
//! chunk size, then `Content-Range` pieces to that `Location`: 206 until the last, 204),
//! download with `GET .../{column}/$value`, and `DELETE` of the column's file.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};

use super::{query_pairs, query_param, DvRequest, DvResponse, DvState, Store};

/// (entity set, file column) pairs the stand-in knows.
pub(super) const FILE_COLUMNS: &[(&str, &str)] = &[("accounts", "new_document")];

/// The chunk size an upload session recommends (Dataverse's is 4 MiB).
const CHUNK_SIZE: usize = 4 * 1024 * 1024;

/// (entity set, record id, column).
type Cell = (String, String, String);

#[derive(Clone, Default)]
pub(super) struct Files {
    stored: HashMap<Cell, StoredFile>,
    sessions: HashMap<String, Upload>,
}

#[derive(Clone)]
struct StoredFile {
    name: String,
    bytes: Bytes,
}

#[derive(Clone)]
struct Upload {
    cell: Cell,
    name: String,
    received: BytesMut,
}

pub(super) fn is_file_column(set_name: &str, column: &str) -> bool {
    FILE_COLUMNS
        .iter()
        .any(|(s, c)| *s == set_name && c.eq_ignore_ascii_case(column))
}

impl DvState {
    /// `{set}({id})/{column}` and `{set}({id})/{column}/$value` for a file column.
    pub(super) fn file_column(
        &self,
        req: &DvRequest,
        store: &mut Store,
        set_name: &str,
        id: &str,
        column: &str,
        value: bool,
    ) -> DvResponse {
        if !store
            .sets
            .get(set_name)
            .is_some_and(|set| set.rows.iter().any(|r| r.id == id))
        {
            return DvResponse::error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                &format!("Entity With Id = {id} Does Not Exist"),
            );
        }
        let cell = (
            set_name.to_owned(),
            id.to_owned(),
            column.to_ascii_lowercase(),
        );
        match (&req.method, value) {
            (&Method::GET, true) => match store.files.stored.get(&cell) {
                Some(file) => DvResponse::empty(StatusCode::OK)
                    .header("Content-Type", "application/octet-stream")
                    .header("x-ms-file-name", file.name.clone())
                    .header("x-ms-file-size", file.bytes.len().to_string())
                    .with_body(file.bytes.clone()),
                None => no_file(column, id),
            },
            (&Method::DELETE, false) => match store.files.stored.remove(&cell) {
                Some(_) => DvResponse::empty(StatusCode::NO_CONTENT),
                None => no_file(column, id),
            },
            (&Method::PATCH, false) => self.upload(req, store, cell),
            _ => DvResponse::method_not_allowed(&req.method),
        }
    }

    fn upload(&self, req: &DvRequest, store: &mut Store, cell: Cell) -> DvResponse {
        let pairs = query_pairs(req.raw_query.as_deref());
        if let Some(session) = query_param(&pairs, "sessiontoken") {
            return continue_upload(req, store, &session);
        }
        if req.header("if-none-match") == Some("null") && store.files.stored.contains_key(&cell) {
            return DvResponse::error(
                StatusCode::PRECONDITION_FAILED,
                "0x80060882",
                "The column already holds a file (If-None-Match: null).",
            );
        }
        let chunked = req
            .header("x-ms-transfer-mode")
            .is_some_and(|m| m.eq_ignore_ascii_case("chunked"));
        let name = query_param(&pairs, "x-ms-file-name")
            .or_else(|| req.header("x-ms-file-name").map(str::to_owned));
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                "x-ms-file-name is required to upload a file.",
            );
        };
        if !chunked {
            store.files.stored.insert(
                cell,
                StoredFile {
                    name,
                    bytes: req.body.clone(),
                },
            );
            return DvResponse::empty(StatusCode::NO_CONTENT);
        }
        let token = format!("{:032x}", rand::random::<u128>());
        let location = format!(
            "{}/{}({})/{}?sessiontoken={token}",
            req.base(&self.link_origin()),
            cell.0,
            cell.1,
            cell.2
        );
        store.files.sessions.insert(
            token,
            Upload {
                cell,
                name,
                received: BytesMut::new(),
            },
        );
        DvResponse::empty(StatusCode::OK)
            .header("Location", location)
            .header("x-ms-chunk-size", CHUNK_SIZE.to_string())
    }
}

fn continue_upload(req: &DvRequest, store: &mut Store, session: &str) -> DvResponse {
    let Some(upload) = store.files.sessions.get_mut(session) else {
        return DvResponse::error(
            StatusCode::BAD_REQUEST,
            "0x80090001",
            "The upload session token is not valid (was the Location modified?).",
        );
    };
    let range = req.header("content-range").and_then(content_range);
    let Some((start, end, total)) = range else {
        return DvResponse::error(
            StatusCode::BAD_REQUEST,
            "0x80090001",
            "A chunk needs Content-Range: bytes <start>-<end>/<total>.",
        );
    };
    if start != upload.received.len() || end + 1 - start != req.body.len() || end >= total {
        return DvResponse::error(
            StatusCode::BAD_REQUEST,
            "0x80090001",
            &format!(
                "Content-Range bytes {start}-{end}/{total} does not continue the {} bytes received with a body of {}.",
                upload.received.len(),
                req.body.len()
            ),
        );
    }
    upload.received.extend_from_slice(&req.body);
    if upload.received.len() < total {
        return DvResponse::empty(StatusCode::PARTIAL_CONTENT);
    }
    if let Some(done) = store.files.sessions.remove(session) {
        store.files.stored.insert(
            done.cell,
            StoredFile {
                name: done.name,
                bytes: done.received.freeze(),
            },
        );
    }
    DvResponse::empty(StatusCode::NO_CONTENT)
}

/// `bytes <start>-<end>/<total>`.
fn content_range(value: &str) -> Option<(usize, usize, usize)> {
    let (range, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (start.parse().ok()?, end.parse().ok()?, total.parse().ok()?);
    (start <= end).then_some((start, end, total))
}

fn no_file(column: &str, id: &str) -> DvResponse {
    DvResponse::error(
        StatusCode::NOT_FOUND,
        "0x80060891",
        &format!("No file attachment found for attribute: {column} EntityId: {id}."),
    )
}
