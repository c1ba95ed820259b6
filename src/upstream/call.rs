//! One request on its way to Dataverse together with the budget slot it holds. Dataverse
//! works on a request once it has it, whether or not the caller is still there: a caller
//! hanging up before the answer's head must not give the slot to the next request while
//! Dataverse still counts this one against the application user's concurrency limit.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use hyper::body::Incoming;
use hyper_util::client::legacy::{Error as ClientError, ResponseFuture};
use tokio::time::Instant;

use super::budget::Permit;

/// Resolves to Dataverse's answer head and the slot, still held. Dropped while waiting
/// (the caller hung up), the call goes on in the background until the head arrives or the
/// exchange's deadline passes, and only then gives the slot back.
pub(super) struct DataverseCall {
    pending: Option<(ResponseFuture, Permit)>,
    deadline: Instant,
}

impl DataverseCall {
    pub(super) fn new(call: ResponseFuture, permit: Permit, deadline: Instant) -> Self {
        Self {
            pending: Some((call, permit)),
            deadline,
        }
    }

    /// The gateway gives up on the call itself (its own timeouts): the request to
    /// Dataverse is dropped, and the slot with it.
    pub(super) fn abandon(&mut self) {
        self.pending = None;
    }
}

impl Future for DataverseCall {
    type Output = Result<(Response<Incoming>, Permit), ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Neither is reached: a call is not polled after it resolved or was abandoned.
        let Some((call, _)) = self.pending.as_mut() else {
            return Poll::Pending;
        };
        let result = ready!(Pin::new(call).poll(cx));
        let Some((_, permit)) = self.pending.take() else {
            return Poll::Pending;
        };
        Poll::Ready(result.map(|response| (response, permit)))
    }
}

impl Drop for DataverseCall {
    fn drop(&mut self) {
        let Some((call, permit)) = self.pending.take() else {
            return;
        };
        // Outside a runtime (the process ending) there is nothing left to hold a slot for.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let deadline = self.deadline;
            runtime.spawn(async move {
                let _answered = tokio::time::timeout_at(deadline, call).await;
                drop(permit);
            });
        }
    }
}
