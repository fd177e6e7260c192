//! The fixtures the test files share: loopback ports, plain HTTP GETs and the readiness of a
//! controller's admin server. A helper that only one test file uses stays in that file.

use std::{
    collections::BTreeSet,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

// ---------------------------------------------------------------------------------------
// Controller processes.

/// Whether the admin server on 127.0.0.1:`port` answers `/readyz` with 200 within a second.
pub async fn readyz(port: u16) -> bool {
    let probe = tokio::time::timeout(Duration::from_secs(1), http_get(port, "/readyz")).await;
    matches!(probe, Ok(Ok(response)) if response.status == 200)
}

/// Waits until a controller's admin server on `port` answers `/readyz` with 200 (its caches
/// are synced), polling every 50 ms; false if `timeout` passed first.
pub async fn wait_ready(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if readyz(port).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // polling /readyz
    }
    false
}

// ---------------------------------------------------------------------------------------
// Ports and HTTP.

/// A loopback port nothing listens on, for a process under test to bind. It lies outside the
/// kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999 if
/// unreadable), so the kernel does not hand it out as the local port of a connection before
/// the process binds it; and it is never handed out twice in one test binary.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|text| {
        let mut bounds = text.split_whitespace().map(|n| n.parse::<u32>().ok());
        Some((bounds.next()??, bounds.next()??))
    });
    let (low, high) = range.filter(|(low, high)| low <= high && *high <= 65535).unwrap_or((32768, 60999));
    // The candidates: 1024..low, then high+1..=65535.
    let below = low.saturating_sub(1024);
    let count = below + (65535 - high);
    let nth = |i: u32| if i < below { 1024 + i } else { high + 1 + (i - below) };
    assert!(count > 0, "every unprivileged port is in the ephemeral range {low}-{high}");
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let start = rand::random::<u32>() % count;
    for i in 0..count {
        let port = u16::try_from(nth((start + i) % count)).expect("a port number");
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port outside the ephemeral range {low}-{high}");
}

/// An HTTP response as received.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The status line and the headers (`HTTP/1.0 200 OK\r\n...`).
    pub head: String,
    pub body: String,
}

/// GET `path` from 127.0.0.1:`port` with HTTP/1.0: the server closes the connection after
/// its answer, so the answer is everything read until then.
pub async fn http_get(port: u16, path: &str) -> Result<Response, String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(format!("bad response {text:?}"))?;
    Ok(Response { status, head: head.to_string(), body: body.to_string() })
}
