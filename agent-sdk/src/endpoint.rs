//! Turning what a user types (`127.0.0.1:7070`) into a tonic endpoint with
//! the settings every Muster connection wants.

use std::time::Duration;

use tonic::transport::Endpoint;

use crate::{Credentials, Error};

/// How long a TCP (and TLS) connect may take before the attempt fails; short,
/// because the agent and `wait` retry with backoff anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 pings find a dead peer on an idle connection long before the
/// kernel's TCP keepalive would.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest message the SDK accepts: listings of many tasks with outputs
/// exceed tonic's 4 MiB default. What it sends is not capped here: the
/// server's own limit (`max_message_bytes`) answers an oversized request
/// with RESOURCE_EXHAUSTED naming it, which a local cap would hide.
pub(crate) const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Adds `http://` (`https://` when `tls` is set) when the endpoint has no
/// scheme and checks that the result is an `http` or `https` URI with a
/// host; with `tls`, plain `http://` is refused.
pub(crate) fn normalize_endpoint(raw: &str, tls: bool) -> Result<String, Error> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(Error::InvalidEndpoint("endpoint is empty".to_owned()));
    }
    let url = match trimmed.split_once("://") {
        Some(("http", _)) if tls => {
            return Err(Error::InvalidEndpoint(format!(
                "{trimmed}: TLS settings are given, so the endpoint must be https:// (or have no scheme)"
            )));
        }
        Some((scheme, _)) if scheme == "http" || scheme == "https" => trimmed.to_owned(),
        Some((scheme, _)) => {
            return Err(Error::InvalidEndpoint(format!(
                "{trimmed}: scheme {scheme} is not supported, use http or https"
            )));
        }
        None if tls => format!("https://{trimmed}"),
        None => format!("http://{trimmed}"),
    };
    let uri: tonic::codegen::http::Uri =
        url.parse().map_err(|err| Error::InvalidEndpoint(format!("{trimmed}: {err}")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(Error::InvalidEndpoint(format!("{trimmed}: no host")));
    }
    Ok(url)
}

/// Builds (without connecting) the endpoint for an already normalised URL.
pub(crate) fn make_endpoint(url: &str, credentials: &Credentials) -> Result<Endpoint, Error> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|err| Error::InvalidEndpoint(format!("{url}: {err}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        return endpoint
            .tls_config(credentials.tls_config())
            .map_err(|err| Error::InvalidEndpoint(format!("{url}: {err}")));
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_adds_http_scheme_when_missing() {
        assert_eq!(normalize_endpoint("127.0.0.1:7070", false).ok().as_deref(), Some("http://127.0.0.1:7070"));
        assert_eq!(normalize_endpoint("  localhost:7070 ", false).ok().as_deref(), Some("http://localhost:7070"));
    }

    #[test]
    fn normalize_keeps_http_and_https_endpoints() {
        assert_eq!(normalize_endpoint("http://127.0.0.1:7070", false).ok().as_deref(), Some("http://127.0.0.1:7070"));
        assert_eq!(
            normalize_endpoint("https://muster.example:443", false).ok().as_deref(),
            Some("https://muster.example:443")
        );
    }

    #[test]
    fn normalize_rejects_empty_unknown_scheme_and_missing_host() {
        for bad in ["", "   ", "ftp://host:21", "http://", "http:// :7070"] {
            assert!(
                matches!(normalize_endpoint(bad, false), Err(Error::InvalidEndpoint(_))),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn with_tls_a_bare_endpoint_means_https_and_plain_http_is_refused() {
        assert_eq!(normalize_endpoint("127.0.0.1:7070", true).ok().as_deref(), Some("https://127.0.0.1:7070"));
        assert!(matches!(normalize_endpoint("http://127.0.0.1:7070", true), Err(Error::InvalidEndpoint(_))));
    }

    #[test]
    fn make_endpoint_accepts_normalised_urls() {
        assert!(make_endpoint("http://127.0.0.1:7070", &Credentials::new()).is_ok());
    }
}
