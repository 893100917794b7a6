//! A caller's gRPC deadline (the `grpc-timeout` header) on streaming calls.
//!
//! tonic enforces `grpc-timeout` only until a handler returns its response, which for a
//! server-streaming call is at once; the stream itself would run on past the deadline. So the
//! streaming handlers here read the deadline ([`of`]), pass what remains of it to the next hop
//! ([`propagate`]), and end their response stream with DEADLINE_EXCEEDED when it passes
//! ([`until`]): dropping the inner stream is what frees the work behind it.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// `grpc-timeout`'s value as a duration: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The deadline a request carries, measured from now (when its handler starts).
pub fn of(metadata: &MetadataMap) -> Option<Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    Some(Instant::now() + timeout)
}

/// Gives `request` to the next hop with what remains of `deadline`.
pub fn propagate<T>(request: &mut tonic::Request<T>, deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// `stream` until `deadline`: then one DEADLINE_EXCEEDED and the end, with `stream` dropped.
pub fn until<T: Send + 'static>(stream: Boxed<T>, deadline: Option<Instant>) -> Boxed<T> {
    let Some(deadline) = deadline else {
        return stream;
    };
    let timer = Box::pin(tokio::time::sleep_until(deadline));
    Box::pin(futures::stream::unfold(
        Some((stream, timer)),
        |state| async move {
            let (mut stream, mut timer) = state?;
            tokio::select! {
                item = stream.next() => item.map(|item| (item, Some((stream, timer)))),
                () = &mut timer => {
                    drop(stream);
                    tracing::info!("the caller's deadline passed; stream ended");
                    Some((Err(Status::deadline_exceeded("the call's deadline (grpc-timeout) passed")), None))
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_past_its_deadline_ends_with_deadline_exceeded() {
        let endless: Boxed<u32> = Box::pin(futures::stream::pending());
        let mut ended = until(endless, Some(Instant::now() + Duration::from_secs(2)));
        let status = ended.next().await.expect("an item").expect_err("an error");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(ended.next().await.is_none());
        let quick: Boxed<u32> = Box::pin(futures::stream::iter([Ok(1), Ok(2)]));
        let items: Vec<_> = until(quick, Some(Instant::now() + Duration::from_secs(2)))
            .collect()
            .await;
        assert_eq!(items.len(), 2);
    }
}
