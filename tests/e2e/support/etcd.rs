//! A watch on etcd itself, below the API server: every committed revision of the keys under
//! a prefix, in commit order, with the previous value of deleted keys. Used by the history
//! checker, which needs the exact order of every change across kube-apiserver restarts (an
//! API watch relists after a restart and can skip states; this one resumes at the next
//! revision after the last one it delivered, also across etcd restarts).
//!
//! It speaks etcd's JSON gateway (`POST /v3/watch`, newline-delimited JSON) over plain HTTP/1.0
//! on the loopback endpoint of the local control plane: no gRPC stack.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    sync::mpsc,
};

/// One change of one key.
#[derive(Clone, Debug)]
pub struct KeyEvent {
    /// The etcd revision of the change (the object's resourceVersion).
    pub revision: u64,
    /// The key, e.g. `/registry/kubelock.dev/locks/NS/NAME`.
    pub key: String,
    /// The new value (`None`: deleted).
    pub value: Option<Value>,
    /// The value before the change (for deletions: the object that was deleted).
    pub prev: Option<Value>,
}

/// A batch of changes as one watch response delivered them.
#[derive(Clone, Debug)]
pub struct Batch {
    pub events: Vec<KeyEvent>,
}

/// The current revision of the store (a range read of nothing).
pub async fn current_revision(endpoint: &str) -> Result<u64, String> {
    let body = serde_json::json!({ "key": b64(b"\0") }).to_string();
    let (_, mut lines) = post(endpoint, "/v3/kv/range", &body).await?;
    let mut text = String::new();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        text.push_str(&line);
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    num(&v["header"]["revision"]).ok_or_else(|| format!("no revision in {text}"))
}

/// Writes `value` at `key`; returns the revision of the write.
pub async fn put(endpoint: &str, key: &str, value: &str) -> Result<u64, String> {
    let body = serde_json::json!({ "key": b64(key.as_bytes()), "value": b64(value.as_bytes()) }).to_string();
    let (_, mut lines) = post(endpoint, "/v3/kv/put", &body).await?;
    let mut text = String::new();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        text.push_str(&line);
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    num(&v["header"]["revision"]).ok_or_else(|| format!("no revision in {text}"))
}

/// Watches every key under `prefix` from revision `from` (inclusive) on, forever: the
/// batches go to `tx`. Reconnects (from the revision after the last one delivered) whenever
/// etcd goes away, polling every 100 ms until it is back. Ends when `tx` is closed.
pub async fn watch(endpoint: String, prefix: String, from: u64, tx: mpsc::UnboundedSender<Batch>) {
    let mut next = from;
    loop {
        if tx.is_closed() {
            return;
        }
        match watch_once(&endpoint, &prefix, &mut next, &tx).await {
            Ok(()) => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn watch_once(
    endpoint: &str,
    prefix: &str,
    next: &mut u64,
    tx: &mpsc::UnboundedSender<Batch>,
) -> Result<(), String> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a non-empty prefix") += 1;
    let body = serde_json::json!({
        "create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&end),
            "start_revision": next.to_string(),
            "prev_kv": true,
        }
    })
    .to_string();
    let (_, mut lines) = post(endpoint, "/v3/watch", &body).await?;
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
        let result = &v["result"];
        if let Some(compacted) = num(&result["compact_revision"]).filter(|c| *c > 0) {
            // Never expected (the recorder keeps up); say so loudly rather than skip history.
            panic!("etcd compacted revision {compacted} before the history recorder read it (wanted {next})");
        }
        if result["canceled"].as_bool() == Some(true) {
            return Err(format!("watch cancelled: {line}"));
        }
        let Some(events) = result["events"].as_array() else { continue };
        let mut batch = Vec::new();
        for e in events {
            let kv = &e["kv"];
            let revision = num(&kv["mod_revision"]).ok_or_else(|| format!("no mod_revision in {line}"))?;
            let key = String::from_utf8_lossy(&unb64(kv["key"].as_str().unwrap_or_default())?).into_owned();
            let deleted = e["type"].as_str() == Some("DELETE");
            // Values that are not JSON (a marker) are passed on as null.
            let value = if deleted {
                None
            } else {
                Some(json_value(kv["value"].as_str().unwrap_or_default()).unwrap_or_default())
            };
            let prev = e["prev_kv"]["value"].as_str().map(|v| json_value(v).unwrap_or_default());
            *next = (*next).max(revision + 1);
            batch.push(KeyEvent { revision, key, value, prev });
        }
        if !batch.is_empty() && tx.send(Batch { events: batch }).is_err() {
            return Ok(());
        }
    }
    Err("etcd closed the watch".into())
}

/// POSTs a JSON body with HTTP/1.0 (so that the answer streams without chunking) and returns
/// the status line and the body's lines.
async fn post(
    endpoint: &str,
    path: &str,
    body: &str,
) -> Result<(String, tokio::io::Lines<BufReader<TcpStream>>), String> {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).await.map_err(|e| e.to_string())?;
    if !status.contains(" 200 ") {
        return Err(format!("{path}: {}", status.trim()));
    }
    // Headers, up to the empty line.
    loop {
        let mut header = String::new();
        let n = reader.read_line(&mut header).await.map_err(|e| e.to_string())?;
        if n == 0 || header.trim().is_empty() {
            break;
        }
    }
    Ok((status, reader.lines()))
}

fn num(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn json_value(b64_text: &str) -> Result<Value, String> {
    let bytes = unb64(b64_text)?;
    serde_json::from_slice(&bytes).map_err(|e| format!("a stored value is not JSON ({e})"))
}

/// Standard base64 with padding: how etcd's JSON gateway carries keys and values.
fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>, String> {
    STANDARD.decode(text).map_err(|e| format!("not base64: {e}"))
}

#[test]
fn base64_round_trips() {
    for s in ["", "a", "ab", "abc", "abcd", "/registry/kubelock.dev/", "/registry0"] {
        assert_eq!(unb64(&b64(s.as_bytes())).unwrap(), s.as_bytes(), "{s}");
    }
    assert_eq!(b64(b"/registry/"), "L3JlZ2lzdHJ5Lw==");
}
