//! `--metrics-addr`: a Prometheus scrape endpoint for the metrics the fenced library emits.
//!
//! The library only speaks to the `metrics` facade; this installs the Prometheus recorder with
//! its own small HTTP listener (any path answers with the text exposition format, `/metrics` by
//! convention). Histograms are exported as real Prometheus histograms (with `_bucket` series),
//! so `histogram_quantile` works across instances; see docs/metrics.md for the series and alert
//! examples.

use std::net::SocketAddr;

use fenced::observe::{ACQUIRE_DURATION, HOLD_DURATION};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Bucket bounds (seconds) of `fenced_acquire_duration_seconds`: from a local grant (about a
/// millisecond) to long waits.
const ACQUIRE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
];

/// Bucket bounds (seconds) of `fenced_hold_duration_seconds`: from short critical sections to
/// jobs that run for a day.
const HOLD_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
    14400.0, 43200.0, 86400.0,
];

/// Installs a global Prometheus recorder and serves it over HTTP on `addr` (for example
/// `127.0.0.1:9464`). Must be called inside the Tokio runtime, which runs the listener; call it
/// once, before the first lock is taken, so that no early event is missed.
///
/// Fails with a message (naming `addr`) when the address cannot be bound or a recorder is
/// already installed.
pub(crate) fn serve(addr: SocketAddr) -> Result<(), String> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(format!(
            "cannot serve metrics on {addr}: no Tokio runtime is running (internal error)"
        ));
    }
    let fail =
        |e: metrics_exporter_prometheus::BuildError| format!("cannot serve metrics on {addr}: {e}");
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(ACQUIRE_DURATION.to_owned()), ACQUIRE_BUCKETS)
        .map_err(fail)?
        .set_buckets_for_metric(Matcher::Full(HOLD_DURATION.to_owned()), HOLD_BUCKETS)
        .map_err(fail)?
        .install()
        .map_err(fail)?;
    // Clients created before this call described their metrics to no recorder; do it again.
    fenced::observe::describe();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    /// A port that was free a moment ago.
    fn free_addr() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap()
    }

    /// `GET /metrics` written by hand; the whole response, headers included.
    fn scrape(addr: SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_the_fenced_series() {
        let addr = free_addr();
        super::serve(addr).unwrap();

        let client = fenced::connect("memory://cli-metrics-test").await.unwrap();
        let guard = client.lock("report:2024-05-01").await.unwrap();
        guard.release().await.unwrap();

        let response = tokio::task::spawn_blocking(move || scrape(addr))
            .await
            .unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        for expected in [
            "# TYPE fenced_acquire_duration_seconds histogram",
            "fenced_acquire_duration_seconds_count{backend=\"memory\",lock=\"report\",outcome=\"acquired\"} 1",
            "fenced_hold_duration_seconds_count{backend=\"memory\",lock=\"report\"} 1",
            "fenced_holders{backend=\"memory\",lock=\"report\"} 0",
            "# HELP fenced_acquire_duration_seconds Time from the acquire call",
        ] {
            assert!(
                response.contains(expected),
                "missing {expected:?} in:\n{response}"
            );
        }
        assert!(!response.contains("2024-05-01"), "the raw key is a label");

        // A second recorder cannot be installed: a clear error, not a panic.
        let again = super::serve(free_addr()).unwrap_err();
        assert!(again.contains("cannot serve metrics on"), "{again}");
    }
}
