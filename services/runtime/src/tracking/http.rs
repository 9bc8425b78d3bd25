//! A small blocking HTTP/1.1 client for the trackers' REST calls (JSON requests, file uploads): one
//! connection per request (`Connection: close`), connect and I/O timeouts, chunked responses decoded. Plain
//! `http://` only.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

/// Where a tracker lives: `http://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// Port (80 when not given).
    pub port: u16,
    /// Path prefix (no trailing slash; empty for the root).
    pub prefix: String,
}

impl Endpoint {
    /// Parses a tracking URI.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = match uri.strip_prefix("http://") {
            Some(r) => r,
            None if uri.starts_with("https://") => {
                return Err(format!("{uri}: https tracking URIs are not supported yet (use http:// or a local proxy)"))
            }
            None => return Err(format!("{uri}: a tracking URI starts with http://")),
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("{uri}: bad port `{p}`"))?)
            }
            _ => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("{uri}: no host"));
        }
        Ok(Self { host: host.trim_matches(['[', ']']).to_owned(), port, prefix: prefix.to_owned() })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.prefix)
    }
}

/// A request body.
pub enum Body<'a> {
    /// None.
    Empty,
    /// JSON bytes.
    Json(&'a [u8]),
    /// A file's content, streamed.
    File(&'a Path),
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (Null when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request to `ep` (`path` after the prefix, with its query) and reads the whole response.
pub fn request(ep: &Endpoint, method: &str, path: &str, token: Option<&str>, body: Body) -> std::io::Result<Response> {
    let addr = (ep.host.as_str(), ep.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{}: no address", ep.host)))?;
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let (ctype, len) = match &body {
        Body::Empty => ("application/json", 0),
        Body::Json(b) => ("application/json", b.len() as u64),
        Body::File(p) => ("application/octet-stream", ferrotune_core::fsx::metadata(p)?.len()),
    };
    let mut head = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: ferrotune/{}\r\nAccept: application/json\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\n",
        ep.prefix,
        ep.host,
        ep.port,
        env!("CARGO_PKG_VERSION")
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    match body {
        Body::Empty => {}
        Body::Json(b) => s.write_all(b)?,
        Body::File(p) => {
            std::io::copy(&mut ferrotune_core::fsx::open(p)?, &mut s)?;
        }
    }
    s.flush()?;
    // Read until the response is complete (by its length or last chunk): some servers keep the connection
    // open after answering, `Connection: close` notwithstanding.
    let mut raw = vec![];
    let mut buf = [0u8; 16384];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return parse_response(&raw);
        }
        raw.extend_from_slice(&buf[..n]);
        if complete(&raw) {
            return parse_response(&raw);
        }
    }
}

/// Whether `raw` holds a whole response whose end is known without the connection closing.
fn complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    for l in head.split("\r\n") {
        if let Some(v) = l.strip_prefix("content-length:") {
            return v.trim().parse::<usize>().is_ok_and(|n| raw.len() >= end + 4 + n);
        }
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            return parse_response(raw).is_ok();
        }
    }
    false
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("malformed HTTP response: {what}"))
}

/// Parses a whole HTTP/1.1 response (status line, headers, body by Content-Length, chunks or close).
pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()).ok_or_else(|| bad(status_line))?;
    let (mut chunked, mut length) = (false, None);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let v = v.trim();
        if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        let mut out = vec![];
        let mut at = 0;
        loop {
            let nl = rest[at..].windows(2).position(|w| w == b"\r\n").ok_or_else(|| bad("chunk size"))?;
            let size_txt = std::str::from_utf8(&rest[at..at + nl]).map_err(|_| bad("chunk size"))?;
            let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("chunk size"))?;
            at += nl + 2;
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(at..at + size).ok_or_else(|| bad("truncated chunk"))?);
            at += size + 2;
        }
        out
    } else {
        match length {
            Some(n) => rest.get(..n).ok_or_else(|| bad("truncated body"))?.to_vec(),
            None => rest.to_vec(),
        }
    };
    Ok(Response { status, body })
}

/// `s` percent-encoded for a query value.
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `s` percent-encoded as a URL path (slashes kept).
pub fn path_escape(s: &str) -> String {
    s.split('/').map(query_escape).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.prefix.as_str()), ("127.0.0.1", 5000, ""));
        let e = Endpoint::parse("http://mlflow.internal/tracking/").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.prefix.as_str()), ("mlflow.internal", 80, "/tracking"));
        assert!(Endpoint::parse("https://x").unwrap_err().contains("https"));
        assert!(Endpoint::parse("ftp://x").unwrap_err().contains("http://"));
        assert!(Endpoint::parse("http://h:99999").unwrap_err().contains("bad port"));
    }

    #[test]
    fn responses_parse() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(complete(b"HTTP/1.1 200 OK\r\nContent-Length:2\r\n\r\n{}"));
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}"));
        assert!(!complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"));
        assert!(complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"));
        assert!(!complete(b"HTTP/1.1 200 OK\r\n\r\nuntil close"));
        assert!(parse_response(b"garbage").is_err());
        assert_eq!(query_escape("a b/é"), "a%20b%2F%C3%A9");
        assert_eq!(path_escape("adapter/x y.json"), "adapter/x%20y.json");
    }
}
