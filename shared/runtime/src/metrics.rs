//! Prometheus metrics: counters, gauges and histograms kept in atomics, rendered in the text
//! exposition format, and served on `GET /metrics` by a minimal HTTP/1.1 listener (no other
//! path is served). Label sets are fixed when a series is first used.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Labels as `(name, value)` pairs, in a fixed order.
pub type Labels = Vec<(&'static str, String)>;

fn render_labels(labels: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// A float stored in an `AtomicU64`.
#[derive(Debug, Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn add(&self, v: f64) {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + v).to_bits();
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

#[derive(Debug)]
struct Histogram {
    bounds: Vec<f64>,
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum: AtomicF64,
}

#[derive(Debug)]
enum Series {
    Counter(AtomicF64),
    Gauge(AtomicF64),
    Histogram(Histogram),
}

#[derive(Debug)]
struct Family {
    help: &'static str,
    kind: &'static str,
    series: BTreeMap<String, (Labels, Arc<Series>)>,
}

/// A set of metric families; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<&'static str, Family>>>,
}

impl Registry {
    fn series(
        &self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        labels: Labels,
        make: impl FnOnce() -> Series,
    ) -> Option<Arc<Series>> {
        let mut families = self.families.lock().ok()?;
        let family = families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            series: BTreeMap::new(),
        });
        let key = render_labels(&labels, None);
        Some(
            family
                .series
                .entry(key)
                .or_insert_with(|| (labels, Arc::new(make())))
                .1
                .clone(),
        )
    }

    /// Adds `value` to a counter.
    pub fn add(&self, name: &'static str, help: &'static str, labels: Labels, value: f64) {
        if let Some(series) = self.series(name, help, "counter", labels, || {
            Series::Counter(AtomicF64::default())
        }) {
            if let Series::Counter(c) = &*series {
                c.add(value);
            }
        }
    }

    /// Counts one RPC in counter `name`, by method and status code (`Ok` on success).
    pub fn count_rpc<T>(
        &self,
        name: &'static str,
        rpc: &'static str,
        result: &Result<T, tonic::Status>,
    ) {
        let code = match result {
            Ok(_) => "Ok".to_string(),
            Err(status) => format!("{:?}", status.code()),
        };
        self.add(
            name,
            "RPCs started, by method and status code.",
            vec![("rpc", rpc.into()), ("code", code)],
            1.0,
        );
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, help: &'static str, labels: Labels, value: f64) {
        if let Some(series) = self.series(name, help, "gauge", labels, || {
            Series::Gauge(AtomicF64::default())
        }) {
            if let Series::Gauge(g) = &*series {
                g.set(value);
            }
        }
    }

    /// Records one observation in a histogram with upper bucket `bounds`.
    pub fn observe(
        &self,
        name: &'static str,
        help: &'static str,
        labels: Labels,
        bounds: &[f64],
        value: f64,
    ) {
        let make = || {
            Series::Histogram(Histogram {
                bounds: bounds.to_vec(),
                buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
                count: AtomicU64::new(0),
                sum: AtomicF64::default(),
            })
        };
        if let Some(series) = self.series(name, help, "histogram", labels, make) {
            if let Series::Histogram(h) = &*series {
                for (bound, bucket) in h.bounds.iter().zip(&h.buckets) {
                    if value <= *bound {
                        bucket.fetch_add(1, Ordering::Relaxed);
                    }
                }
                h.count.fetch_add(1, Ordering::Relaxed);
                h.sum.add(value);
            }
        }
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(families) = self.families.lock() else {
            return out;
        };
        for (name, family) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} {}", family.kind);
            for (labels, series) in family.series.values() {
                match &**series {
                    Series::Counter(v) | Series::Gauge(v) => {
                        let _ = writeln!(out, "{name}{} {}", render_labels(labels, None), v.get());
                    }
                    Series::Histogram(h) => {
                        for (bound, bucket) in h.bounds.iter().zip(&h.buckets) {
                            let le = Some(("le", bound.to_string()));
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {}",
                                render_labels(labels, le),
                                bucket.load(Ordering::Relaxed)
                            );
                        }
                        let count = h.count.load(Ordering::Relaxed);
                        let inf = Some(("le", "+Inf".to_string()));
                        let _ =
                            writeln!(out, "{name}_bucket{} {count}", render_labels(labels, inf));
                        let _ = writeln!(
                            out,
                            "{name}_sum{} {}",
                            render_labels(labels, None),
                            h.sum.get()
                        );
                        let _ =
                            writeln!(out, "{name}_count{} {count}", render_labels(labels, None));
                    }
                }
            }
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until the process ends; `before_render` refreshes
/// gauges that are sampled rather than pushed (queue depth, ...).
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    before_render: Arc<dyn Fn(&Registry) + Send + Sync>,
) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        let before_render = before_render.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let n = match socket.read(&mut request).await {
                Ok(n) => n,
                Err(_) => return,
            };
            let head = String::from_utf8_lossy(&request[..n]);
            let response = if head.starts_with("GET /metrics") {
                before_render(&registry);
                let body = registry.render();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let r = Registry::default();
        r.add(
            "asr_requests_total",
            "Requests.",
            vec![("rpc", "Transcribe".into()), ("code", "OK".into())],
            2.0,
        );
        r.set("asr_queue_depth", "Queue.", vec![], 3.0);
        r.observe("asr_batch_size", "Batch.", vec![], &[1.0, 4.0], 2.0);
        let text = r.render();
        assert!(
            text.contains("asr_requests_total{rpc=\"Transcribe\",code=\"OK\"} 2"),
            "{text}"
        );
        assert!(text.contains("asr_queue_depth 3"));
        assert!(text.contains("asr_batch_size_bucket{le=\"1\"} 0"));
        assert!(text.contains("asr_batch_size_bucket{le=\"4\"} 1"));
        assert!(text.contains("asr_batch_size_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains("asr_batch_size_sum 2"));
    }
}
