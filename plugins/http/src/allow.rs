//! The allowlist: which URLs the agent may request. Entries are either a
//! host, optionally with a port (`example.com`, `127.0.0.1:8080`), or a URL
//! prefix (`https://api.example.com/v1/`). A prefix matches only at a path
//! boundary, so `http://h/api` admits `http://h/api/x` but not
//! `http://h/apix`, and `http://h:80` does not admit `http://h:8080`.

use reqwest::Url;

/// One parsed allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// Any http or https URL on this host (lower case), on any port unless
    /// one is given.
    Host {
        /// The host name or IP address.
        host: String,
        /// The port, when the entry names one.
        port: Option<u16>,
    },
    /// URLs starting with this normalised prefix.
    Prefix(String),
}

/// The parsed allowlist.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    entries: Vec<AllowEntry>,
}

impl Allowlist {
    /// Parses entries; the error names the entry that is not a host or a
    /// URL.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut parsed = Vec::new();
        for raw in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            parsed.push(parse_entry(raw)?);
        }
        Ok(Self { entries: parsed })
    }

    /// Whether no entry was given (nothing is reachable).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `url` may be requested.
    pub fn allows(&self, url: &Url) -> bool {
        if !matches!(url.scheme(), "http" | "https") {
            return false;
        }
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        self.entries.iter().any(|entry| match entry {
            AllowEntry::Host { host: allowed, port } => {
                *allowed == host && port.is_none_or(|port| Some(port) == url.port_or_known_default())
            }
            AllowEntry::Prefix(prefix) => prefix_matches(prefix, url.as_str()),
        })
    }
}

fn parse_entry(raw: &str) -> Result<AllowEntry, String> {
    if raw.contains("://") {
        let url = Url::parse(raw).map_err(|e| format!("allow: {raw:?} is not a valid URL prefix: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("allow: {raw:?} must be an http or https URL with a host"));
        }
        let mut prefix = url.to_string();
        // `Url` adds a `/` to a bare origin; keep the entry as written so
        // `http://h:80` stays a boundary-checked origin prefix.
        if !raw.ends_with('/') && prefix.ends_with('/') && url.path() == "/" {
            prefix.pop();
        }
        return Ok(AllowEntry::Prefix(prefix));
    }
    let url = Url::parse(&format!("http://{raw}/")).map_err(|e| format!("allow: {raw:?} is not a valid host: {e}"))?;
    let host = url.host_str().ok_or_else(|| format!("allow: {raw:?} names no host"))?.to_ascii_lowercase();
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(format!("allow: {raw:?} must be a host, host:port or a URL prefix"));
    }
    Ok(AllowEntry::Host { host, port: url.port() })
}

fn prefix_matches(prefix: &str, url: &str) -> bool {
    let Some(rest) = url.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Allowlist {
        match Allowlist::parse(&entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>()) {
            Ok(list) => list,
            Err(err) => panic!("{err}"),
        }
    }

    fn allows(list: &Allowlist, url: &str) -> bool {
        match Url::parse(url) {
            Ok(url) => list.allows(&url),
            Err(err) => panic!("{url}: {err}"),
        }
    }

    #[test]
    fn an_empty_allowlist_allows_nothing() {
        let empty = list(&[]);
        assert!(empty.is_empty());
        assert!(!allows(&empty, "http://127.0.0.1/"));
    }

    #[test]
    fn host_entries_match_the_host_and_optional_port() {
        let hosts = list(&["Example.com", "127.0.0.1:8080"]);
        assert!(allows(&hosts, "https://example.com/anything?q=1"));
        assert!(allows(&hosts, "http://example.com:9000/"));
        assert!(allows(&hosts, "http://127.0.0.1:8080/x"));
        assert!(!allows(&hosts, "http://127.0.0.1:8081/x"));
        assert!(!allows(&hosts, "http://example.com.evil.net/"));
        assert!(!allows(&hosts, "ftp://example.com/"));
    }

    #[test]
    fn prefix_entries_match_only_at_a_boundary() {
        let prefixes = list(&["http://h/api", "https://svc:8443/v1/"]);
        assert!(allows(&prefixes, "http://h/api"));
        assert!(allows(&prefixes, "http://h/api/jobs"));
        assert!(allows(&prefixes, "http://h/api?x=1"));
        assert!(!allows(&prefixes, "http://h/apix"));
        assert!(!allows(&prefixes, "http://h/other"));
        assert!(allows(&prefixes, "https://svc:8443/v1/a"));
        assert!(!allows(&prefixes, "https://svc:8443/v2/a"));
        let origin = list(&["http://h:80"]);
        assert!(!allows(&origin, "http://h:8080/"));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in ["http://", "ftp://h/", "h/path", "user@h"] {
            let err = Allowlist::parse(&[bad.to_owned()]).err().unwrap_or_default();
            assert!(err.starts_with("allow: "), "{bad}: {err}");
        }
    }
}
