//! OpenTelemetry context across the gRPC hops, as W3C `traceparent` / `tracestate` metadata:
//! a request's span adopts the caller's trace, and calls to the model service carry the
//! current span's. Without an OpenTelemetry layer (no `--otlp-endpoint`) spans have no
//! OpenTelemetry context and both functions do nothing.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// A request's span, child of the trace the caller sent in `metadata` if any. It must not have
/// been entered yet: entering starts its OpenTelemetry span, whose parent is then fixed.
pub fn request_span(span: tracing::Span, metadata: &MetadataMap) -> tracing::Span {
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    if parent.span().span_context().is_valid() {
        if let Err(err) = span.set_parent(parent) {
            tracing::debug!(%err, "cannot adopt the caller's trace context");
        }
    }
    span
}

/// Writes the current span's trace context into the metadata of an outgoing request.
pub fn inject_current(metadata: &mut MetadataMap) {
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_through_metadata() {
        let mut metadata = MetadataMap::new();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        metadata.insert("traceparent", traceparent.parse().expect("ascii"));
        let context = TraceContextPropagator::new().extract(&MetadataExtractor(&metadata));
        let span = context.span();
        assert!(span.span_context().is_valid());
        assert_eq!(
            span.span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut out = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(&mut out));
        assert_eq!(
            out.get("traceparent").and_then(|v| v.to_str().ok()),
            Some(traceparent)
        );
    }
}
