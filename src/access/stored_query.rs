//! The table a stored query reads. `accounts?savedQuery=<id>` runs a system view and
//! `userQuery=<id>` a personal view; what they read is the view's `returnedtypecode`, not
//! the path's table. It is looked up in the environment with the S2S token
//! (`savedqueries(<id>)?$select=returnedtypecode`) and remembered: a view's table never
//! changes. A view that is not found, or a lookup that fails, names no table, so the
//! request then needs a grant on every table (fail closed); failures are not remembered,
//! so the next request tries again.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use moka::future::Cache;
use serde::Deserialize;
use uuid::Uuid;

use super::odata::OptionName;
use super::target::is_identifier;
use crate::body;
use crate::identity::lookup::s2s_get;
use crate::identity::LookupError;
use crate::upstream::{DataverseClient, TokenSource};

/// Views remembered per environment.
const CACHE_ENTRIES: u64 = 10_000;
/// How long a view's table is remembered: it cannot change, but a view can be deleted and
/// its id is then no longer worth the memory.
const CACHE_TTL: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
struct View {
    returnedtypecode: String,
}

/// Looks up the tables of one environment's stored queries.
pub struct StoredQueryLookup {
    client: DataverseClient,
    tokens: Arc<TokenSource>,
    timeout: Duration,
    /// (userQuery?, id) -> the table's logical name.
    cache: Cache<(bool, Uuid), Arc<str>>,
}

impl StoredQueryLookup {
    pub fn new(client: DataverseClient, tokens: Arc<TokenSource>, timeout: Duration) -> Self {
        Self {
            client,
            tokens,
            timeout,
            cache: Cache::builder()
                .max_capacity(CACHE_ENTRIES)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }

    /// The logical name of the table the stored query `query` names reads (`contact`);
    /// `None` when it cannot be had.
    pub async fn table_of(&self, query: &str) -> Option<Arc<str>> {
        let (kind, id) = super::odata::stored_query(query)?;
        let user_query = kind == OptionName::UserQuery;
        let found = self
            .cache
            .try_get_with((user_query, id), self.fetch(user_query, id))
            .await;
        match found {
            Ok(table) => Some(table),
            Err(e) => {
                tracing::warn!(stored_query = %id, error = %crate::error::chain(&e), "the table of a stored query could not be looked up; the request needs a grant on every table");
                None
            }
        }
    }

    async fn fetch(&self, user_query: bool, id: Uuid) -> Result<Arc<str>, LookupError> {
        let set = if user_query {
            "userqueries"
        } else {
            "savedqueries"
        };
        let path = format!(
            "/api/data/v9.2/{set}({})?$select=returnedtypecode",
            id.hyphenated()
        );
        let response = s2s_get(&self.client, &self.tokens, &path, self.timeout).await?;
        if response.status() != StatusCode::OK {
            return Err(LookupError::Status(response.status().as_u16()));
        }
        let bytes = body::read_capped(response.into_body(), body::MAX_DEPENDENCY_BODY_BYTES)
            .await
            .map_err(|_| LookupError::BadAnswer)?;
        let view: View = serde_json::from_slice(&bytes).map_err(|_| LookupError::BadAnswer)?;
        // A name that is no identifier would be no table anyone could grant.
        if !is_identifier(&view.returnedtypecode) {
            return Err(LookupError::BadAnswer);
        }
        Ok(Arc::from(view.returnedtypecode))
    }
}
