//! The machine and the processes under test: /proc readings, a minimal HTTP/1.1 client (for
//! etcd's JSON gateway and the controller's /metrics), Prometheus text parsing, and the
//! controller run as a separate release-built process.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the report says about the machine.
pub fn machine_info() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").map(|r| r.trim().trim_end_matches(" kB").parse::<u64>().ok()))
        })
        .flatten();
    json!({
        "nproc": nproc,
        "cpu_model": model,
        "kernel": kernel,
        "mem_total_mib": mem_kib.map(|k| k / 1024),
        "date": jiff::Timestamp::now().to_string(),
    })
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> [f64; 3] {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap_or(f64::NAN));
    [it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN)]
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: f64 = fields.get(11).ok_or_else(|| anyhow!("no utime"))?.parse()?;
    let stime: f64 = fields.get(12).ok_or_else(|| anyhow!("no stime"))?.parse()?;
    Ok((utime + stime) / clock_ticks())
}

/// `sysconf(_SC_CLK_TCK)`, asked of `getconf` once (100 on every Linux we know).
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A field of /proc/PID/status in KiB (`VmHWM`, `VmRSS`).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|r| r.trim().trim_end_matches(" kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: one connection per request, TCP_NODELAY, `Connection: close`.
// Enough for etcd's gRPC gateway and the controller's admin server; no dependency added.

/// Sends one request to `http://addr` and returns (status, body).
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(timeout, http_inner(addr, method, path, body))
        .await
        .map_err(|_| anyhow!("{method} http://{addr}{path}: no answer within {timeout:?}"))?
}

async fn http_inner(addr: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    // Read until the response is complete, not until the server closes: Go's server lingers
    // before closing a `Connection: close` connection, which would add its delay to every call.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n > 0 {
            raw.extend_from_slice(&buf[..n]);
        }
        if let Some(done) = parse_response(&raw, n == 0)? {
            return Ok(done);
        }
        if n == 0 {
            bail!("connection to {addr} closed before the response was complete");
        }
    }
}

/// `Some((status, body))` once `raw` holds a complete response (or the connection closed).
fn parse_response(raw: &[u8], closed: bool) -> anyhow::Result<Option<(u16, String)>> {
    let text = String::from_utf8_lossy(raw);
    let Some((head, rest)) = text.split_once("\r\n\r\n") else { return Ok(None) };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in HTTP response"))?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return Ok(dechunk(rest).map(|body| (status, body)));
    }
    match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(len) if rest.len() >= len => Ok(Some((status, rest[..len].to_string()))),
        Some(_) => Ok(None),
        None if closed => Ok(Some((status, rest.to_string()))),
        None => Ok(None),
    }
}

/// The body of a chunked response, once its last chunk is in.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

/// Standard base64 (etcd's JSON gateway carries keys that way).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Prometheus text format.

/// Samples of one metric family: label set (as written) → value.
pub fn metric(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, v) = r.split_once('}')?;
                (labels.to_string(), v)
            } else if rest.starts_with(' ') {
                (String::new(), rest)
            } else {
                return None;
            };
            Some((labels, value.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// The value of one label in a label set written as `a="x",b="y"`.
pub fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("{key}=\"");
    let start =
        labels.match_indices(&pattern).find(|(i, _)| *i == 0 || labels.as_bytes()[i - 1] == b',')?.0 + pattern.len();
    let end = labels[start..].find('"')? + start;
    Some(&labels[start..end])
}

/// Sum of a metric's samples.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    metric(text, name).iter().map(|(_, v)| v).sum()
}

/// A histogram: cumulative bucket counts by upper bound, and the total count.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
}

impl Histogram {
    pub fn parse(text: &str, name: &str) -> Histogram {
        let mut buckets: Vec<(f64, f64)> = metric(text, &format!("{name}_bucket"))
            .into_iter()
            .filter_map(|(labels, v)| {
                let le = label(&labels, "le")?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram { buckets, count: metric_sum(text, &format!("{name}_count")) }
    }

    /// `self - earlier` (bucket by bucket).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, v)| (*le, v - earlier.buckets.iter().find(|(l, _)| l == le).map_or(0.0, |(_, e)| *e)))
            .collect();
        Histogram { buckets, count: self.count - earlier.count }
    }

    /// Like PromQL's `histogram_quantile`: linear interpolation inside the bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let mut prev = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let width = cum - prev.1;
                let frac = if width > 0.0 { (rank - prev.1) / width } else { 1.0 };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, cum);
        }
        None
    }
}

// ---------------------------------------------------------------------------------------
// The controller under test: `kubelock controller` as its own process.

/// A running `kubelock controller`.
pub struct Controller {
    child: Child,
    pub admin: String,
    pub log: PathBuf,
    pub started: Instant,
}

impl Controller {
    /// Starts the release-built controller with the admin kubeconfig, watching one namespace.
    pub fn start(
        binary: &Path,
        kubeconfig: &Path,
        namespace: &str,
        log_dir: &Path,
        tag: &str,
        extra: &[String],
    ) -> anyhow::Result<Controller> {
        let admin = format!("127.0.0.1:{}", free_port()?);
        let log = log_dir.join(format!("controller-{tag}.log"));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = kubelock::devenv::guarded_command(binary);
        cmd.arg("controller")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--watch-namespace", namespace, "--admin-addr", &admin])
            .args(extra)
            .env_remove("KUBELOCK_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = kubelock::devenv::spawn_guarded(cmd).with_context(|| format!("starting {}", binary.display()))?;
        Ok(Controller { child, admin, log, started: Instant::now() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until /readyz answers 200 (its watches are synced), polling every 50 ms.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "controller exited ({status}); see {}:\n{}",
                    self.log.display(),
                    kubelock::devenv::log_tail(&self.log, 20)
                );
            }
            if let Ok((200, _)) = http(&self.admin, "GET", "/readyz", None, Duration::from_secs(2)).await {
                return Ok(self.started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!("controller not ready after {timeout:?}; see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = http(&self.admin, "GET", "/metrics", None, Duration::from_secs(10)).await?;
        if status != 200 {
            bail!("controller /metrics answered {status}");
        }
        Ok(body)
    }

    /// A snapshot of the process and its counters.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let text = self.metrics().await?;
        Ok(Snapshot {
            at: Instant::now(),
            cpu: cpu_seconds(self.pid())?,
            hwm_kib: status_kib(self.pid(), "VmHWM")?,
            rss_kib: status_kib(self.pid(), "VmRSS")?,
            reconcile: Histogram::parse(&text, "kubelock_reconcile_duration_seconds"),
            writes: metric(&text, "kubelock_api_writes_total").into_iter().collect(),
            grants: metric_sum(&text, "kubelock_grants_total"),
            reconciles: metric_sum(&text, "kubelock_reconciles_total"),
            expirations: metric_sum(&text, "kubelock_expirations_total"),
            events_dropped: metric_sum(&text, "kubelock_events_dropped_total"),
            conflicts: metric_sum(&text, "kubelock_cas_conflicts_total"),
        })
    }

    /// SIGTERM, then SIGKILL if it does not stop within 10 s.
    pub async fn stop(mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The controller at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    pub cpu: f64,
    pub hwm_kib: u64,
    pub rss_kib: u64,
    pub reconcile: Histogram,
    pub writes: BTreeMap<String, f64>,
    pub grants: f64,
    pub reconciles: f64,
    pub expirations: f64,
    pub events_dropped: f64,
    pub conflicts: f64,
}

impl Snapshot {
    /// API writes made since `earlier`, by `kind/outcome`.
    pub fn writes_since(&self, earlier: &Snapshot) -> BTreeMap<String, f64> {
        self.writes
            .iter()
            .map(|(labels, v)| {
                let key =
                    format!("{}/{}", label(labels, "kind").unwrap_or("?"), label(labels, "outcome").unwrap_or("?"));
                (key, v - earlier.writes.get(labels).copied().unwrap_or(0.0))
            })
            .filter(|(_, v)| *v > 0.0)
            .collect()
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Mutating API requests the API server has served, by `resource[/subresource] VERB`
/// (from its own `apiserver_request_total`).
pub async fn apiserver_writes(client: &kube::Client) -> anyhow::Result<BTreeMap<String, f64>> {
    // kube's request builder makes `GET /metrics` out of an empty path and the name "metrics".
    let request = kube::core::Request::new("").get("metrics", &Default::default())?;
    let text = client.request_text(request).await.context("GET /metrics from kube-apiserver")?;
    let mut out = BTreeMap::new();
    for (labels, v) in metric(&text, "apiserver_request_total") {
        let verb = label(&labels, "verb").unwrap_or("");
        if !matches!(verb, "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY") {
            continue;
        }
        let resource = label(&labels, "resource").unwrap_or("");
        let sub = label(&labels, "subresource").unwrap_or("");
        let key = if sub.is_empty() { format!("{resource} {verb}") } else { format!("{resource}/{sub} {verb}") };
        *out.entry(key).or_insert(0.0) += v;
    }
    Ok(out)
}

/// `later - earlier`, keeping non-zero entries.
pub fn delta(later: &BTreeMap<String, f64>, earlier: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    later
        .iter()
        .map(|(k, v)| (k.clone(), v - earlier.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn histogram_quantile() {
        let text = "x_bucket{le=\"0.1\"} 50\nx_bucket{le=\"0.2\"} 100\nx_bucket{le=\"+Inf\"} 100\nx_count 100\n";
        let h = Histogram::parse(text, "x");
        assert!((h.quantile(0.5).unwrap() - 0.1).abs() < 1e-9);
        assert!((h.quantile(0.99).unwrap() - 0.198).abs() < 1e-9);
    }
}
