//! How the fake's Transcribe request streams end, seen on the HTTP/2 body: tonic's server
//! maps a client's RST_STREAM(CANCEL) on a request stream to a clean end (`Ok(None)`), so only
//! the body tells END_STREAM from a cancel.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;
use tonic::Status;

use super::fake_model::{Ending, Seen};

/// Records how Transcribe request bodies end (END_STREAM or reset), before tonic sees them.
#[derive(Clone)]
pub struct WireWatch<S> {
    inner: S,
    seen: Arc<Mutex<Seen>>,
}

impl<S> WireWatch<S> {
    pub fn new(inner: S, seen: Arc<Mutex<Seen>>) -> Self {
        Self { inner, seen }
    }
}

impl<S> tower::Service<http::Request<Body>> for WireWatch<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != "/asr.v1.ModelService/Transcribe" {
            return self.inner.call(request);
        }
        let (parts, body) = request.into_parts();
        let body = Body::new(WatchedBody {
            inner: body,
            seen: self.seen.clone(),
        });
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

struct WatchedBody {
    inner: Body,
    seen: Arc<Mutex<Seen>>,
}

impl http_body::Body for WatchedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ending = match &polled {
            Poll::Ready(None) => Some(Ending::Complete),
            Poll::Ready(Some(Err(status))) => Some(Ending::Failed(status.code())),
            _ => None,
        };
        if let Some(ending) = ending {
            self.seen.lock().expect("lock").ending.get_or_insert(ending);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
