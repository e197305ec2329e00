//! Running one `http` task: parse the payload, check the allowlist, make
//! the request with a timeout, and classify the response.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use muster_sdk::{Error, Output, TaskContext, TaskError};
use reqwest::{Method, Url};
use serde::{Deserialize, Serialize};

use crate::HttpAgentConfig;
use crate::allow::Allowlist;

/// The payload as submitted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpPayload {
    #[serde(default)]
    method: Option<String>,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

/// A validated request.
#[derive(Debug)]
struct HttpRequest {
    method: Method,
    url: Url,
    headers: reqwest::header::HeaderMap,
    body: Option<String>,
    timeout: Duration,
}

/// The task output.
#[derive(Debug, Serialize)]
struct HttpOutput {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
    body_truncated: bool,
}

/// Shared by every attempt the agent runs.
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    inner: Arc<RunnerInner>,
}

#[derive(Debug)]
struct RunnerInner {
    client: reqwest::Client,
    allowlist: Allowlist,
    max_body_bytes: usize,
    default_timeout: Duration,
    max_timeout: Duration,
}

fn invalid_payload(message: impl std::fmt::Display) -> TaskError {
    TaskError::fatal(format!("invalid payload: {message}")).with_reason("invalid_payload")
}

impl Runner {
    pub(crate) fn new(allowlist: Allowlist, config: &HttpAgentConfig) -> Result<Self, Error> {
        // Redirects are not followed: the target could be outside the
        // allowlist. The caller sees the 3xx and its `location`.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::InvalidConfig(format!("http client: {e}")))?;
        Ok(Self {
            inner: Arc::new(RunnerInner {
                client,
                allowlist,
                max_body_bytes: config.max_body_bytes,
                default_timeout: config.default_timeout,
                max_timeout: config.max_timeout,
            }),
        })
    }

    /// The `http` handler.
    pub(crate) async fn run(&self, ctx: TaskContext) -> Result<Output, TaskError> {
        let request = self.parse(ctx.payload())?;
        let url = request.url.clone();
        tokio::select! {
            result = self.execute(request) => result,
            () = ctx.cancelled() => Err(TaskError::fatal(format!("request to {url} cancelled")).with_reason("cancelled")),
        }
    }

    /// Parses and validates a payload; every mistake is the submitter's, so
    /// none is retryable.
    fn parse(&self, payload: &[u8]) -> Result<HttpRequest, TaskError> {
        let payload: HttpPayload = serde_json::from_slice(payload).map_err(invalid_payload)?;
        let method = payload.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| invalid_payload(format!("method: {method:?} is not an HTTP method")))?;
        let url = Url::parse(&payload.url).map_err(|e| invalid_payload(format!("url: {:?}: {e}", payload.url)))?;
        if !self.inner.allowlist.allows(&url) {
            return Err(
                TaskError::fatal(format!("url: {url} is not in the agent's allowlist")).with_reason("not_allowed")
            );
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &payload.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid_payload(format!("headers: {name:?} is not a valid header name")))?;
            let value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| invalid_payload(format!("headers: the value of {name} is not a valid header value")))?;
            headers.append(name, value);
        }
        let timeout = payload.timeout.unwrap_or(self.inner.default_timeout);
        if timeout.is_zero() || timeout > self.inner.max_timeout {
            return Err(invalid_payload(format!(
                "timeout: must be between 1ms and {} (max_timeout)",
                humantime::format_duration(self.inner.max_timeout)
            )));
        }
        Ok(HttpRequest { method, url, headers, body: payload.body, timeout })
    }

    async fn execute(&self, request: HttpRequest) -> Result<Output, TaskError> {
        let HttpRequest { method, url, headers, body, timeout } = request;
        let mut builder = self.inner.client.request(method.clone(), url.clone()).headers(headers);
        if let Some(body) = body {
            builder = builder.body(body);
        }
        // One deadline covers connecting, the response head and the body.
        let exchange = async {
            let response = builder.send().await.map_err(|e| request_error(&method, &url, &e))?;
            let status = response.status();
            let mut headers = BTreeMap::new();
            for (name, value) in response.headers() {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                headers
                    .entry(name.as_str().to_owned())
                    .and_modify(|joined: &mut String| {
                        joined.push_str(", ");
                        joined.push_str(&value);
                    })
                    .or_insert(value);
            }
            let (body, body_truncated) =
                self.read_body(response).await.map_err(|e| request_error(&method, &url, &e))?;
            Ok::<_, TaskError>((status, HttpOutput { status: status.as_u16(), headers, body, body_truncated }))
        };
        let (status, output) = tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            TaskError::retryable(format!(
                "{method} {url} timed out after {} (timeout)",
                humantime::format_duration(timeout)
            ))
            .with_reason("timeout")
        })??;
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(TaskError::retryable(format!("{method} {url} answered {status}")).with_reason("http_status"));
        }
        if status.is_client_error() {
            return Err(TaskError::fatal(format!("{method} {url} answered {status}")).with_reason("http_status"));
        }
        Output::json(&output)
    }

    /// Reads at most `max_body_bytes` of the body, then stops reading.
    async fn read_body(&self, response: reqwest::Response) -> Result<(String, bool), reqwest::Error> {
        let cap = self.inner.max_body_bytes;
        let mut body = Vec::new();
        let mut truncated = false;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let room = cap.saturating_sub(body.len());
            if chunk.len() > room {
                body.extend_from_slice(chunk.get(..room).unwrap_or_default());
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        if truncated {
            // Drop a character cut in half at the end rather than show junk.
            let valid = match std::str::from_utf8(&body) {
                Ok(_) => body.len(),
                Err(err) if err.error_len().is_none() => err.valid_up_to(),
                Err(_) => body.len(),
            };
            body.truncate(valid);
        }
        Ok((String::from_utf8_lossy(&body).into_owned(), truncated))
    }
}

/// Connection trouble may pass; a request that cannot be built will not.
fn request_error(method: &Method, url: &Url, err: &reqwest::Error) -> TaskError {
    if err.is_builder() {
        return TaskError::fatal(format!("{method} {url}: {err}")).with_reason("invalid_payload");
    }
    let reason = if err.is_connect() { "connect_failed" } else { "request_failed" };
    TaskError::retryable(format!("{method} {url} failed: {err}")).with_reason(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_runner() -> Runner {
        let allowlist = match Allowlist::parse(&["127.0.0.1".to_owned()]) {
            Ok(list) => list,
            Err(err) => panic!("{err}"),
        };
        match Runner::new(allowlist, &HttpAgentConfig::default()) {
            Ok(runner) => runner,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn a_full_payload_parses() {
        let runner = make_runner();
        let json = r#"{"method":"post","url":"http://127.0.0.1:9/x","headers":{"X-A":"1"},"body":"hi","timeout":"2s"}"#;
        match runner.parse(json.as_bytes()) {
            Ok(request) => {
                assert_eq!(request.method, Method::POST);
                assert_eq!(request.timeout, Duration::from_secs(2));
                assert_eq!(request.headers.get("x-a").map(|v| v.as_bytes()), Some(&b"1"[..]));
                assert_eq!(request.body.as_deref(), Some("hi"));
            }
            Err(err) => panic!("{err:?}"),
        }
    }

    #[test]
    fn bad_payloads_fail_for_good_naming_the_field() {
        let runner = make_runner();
        for (json, field) in [
            ("nope", ""),
            (r#"{"url":"not a url"}"#, "url"),
            (r#"{"url":"http://127.0.0.1/","method":"GE T"}"#, "method"),
            (r#"{"url":"http://127.0.0.1/","headers":{"bad header":"v"}}"#, "headers"),
            (r#"{"url":"http://127.0.0.1/","timeout":"1h"}"#, "timeout"),
            (r#"{"url":"http://127.0.0.1/","extra":1}"#, ""),
        ] {
            match runner.parse(json.as_bytes()) {
                Err(err) => {
                    assert!(!err.retryable, "{json}");
                    assert_eq!(err.reason, "invalid_payload", "{json}");
                    assert!(err.message.contains(field), "{json}: {}", err.message);
                }
                Ok(request) => panic!("{json} parsed as {request:?}"),
            }
        }
    }

    #[test]
    fn a_url_outside_the_allowlist_is_refused_for_good() {
        let runner = make_runner();
        match runner.parse(br#"{"url":"http://example.com/"}"#) {
            Err(err) => {
                assert!(!err.retryable);
                assert_eq!(err.reason, "not_allowed");
            }
            Ok(request) => panic!("allowed {request:?}"),
        }
    }
}
