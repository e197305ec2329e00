//! [`Credentials`]: how the SDK proves who it is (a bearer token, a client
//! certificate) and checks whom it talks to (the CA of the server's
//! certificate).

use std::fmt;
use std::path::Path;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{Request, Status};

use crate::Error;

/// The token, CA and client certificate a [`Client`](crate::Client) or an
/// [`Agent`](crate::Agent) connects with. With TLS settings, endpoints
/// without a scheme mean `https://`.
///
/// ```no_run
/// # fn demo() -> Result<(), muster_sdk::Error> {
/// let credentials = muster_sdk::Credentials::new()
///     .token(std::env::var("MUSTER_TOKEN").unwrap_or_default())?
///     .tls_ca_file("ca.pem")?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<AsciiMetadataValue>,
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("Credentials")
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("tls_ca", &self.ca.is_some())
            .field("tls_client_certificate", &self.identity.is_some())
            .finish()
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::InvalidConfig(format!("{what} {}: {e}", path.display())))
}

impl Credentials {
    /// No token, no TLS.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `token` as `authorization: Bearer <token>` on every call; an
    /// empty token sends nothing.
    pub fn token(mut self, token: impl AsRef<str>) -> Result<Self, Error> {
        let token = token.as_ref().trim();
        if token.is_empty() {
            self.authorization = None;
            return Ok(self);
        }
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Error::InvalidConfig("the token must be printable ASCII".to_owned()))?;
        self.authorization = Some(value);
        Ok(self)
    }

    /// Trusts the server certificates this PEM CA bundle signs.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca = Some(pem.into());
        self
    }

    /// Like [`tls_ca_pem`](Self::tls_ca_pem), read from a file.
    pub fn tls_ca_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        Ok(self.tls_ca_pem(read("TLS CA", path.as_ref())?))
    }

    /// Presents this client certificate and key (PEM) to a server that asks
    /// for one (mutual TLS).
    pub fn tls_identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Like [`tls_identity_pem`](Self::tls_identity_pem), read from files.
    pub fn tls_identity_files(self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self, Error> {
        let cert = read("TLS certificate", cert.as_ref())?;
        let key = read("TLS key", key.as_ref())?;
        Ok(self.tls_identity_pem(cert, key))
    }

    /// From the environment: `MUSTER_TOKEN`, `MUSTER_TLS_CA`, and
    /// `MUSTER_TLS_CERT` with `MUSTER_TLS_KEY` (file paths).
    pub fn from_env() -> Result<Self, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self::from_parts(
            var("MUSTER_TOKEN").as_deref(),
            var("MUSTER_TLS_CA").as_deref().map(Path::new),
            var("MUSTER_TLS_CERT").as_deref().map(Path::new),
            var("MUSTER_TLS_KEY").as_deref().map(Path::new),
        )
    }

    /// From optional settings, as command-line tools take them: a token and
    /// the paths of a CA bundle and of a client certificate and key (both or
    /// neither).
    pub fn from_parts(
        token: Option<&str>,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, Error> {
        let mut credentials = Self::new().token(token.unwrap_or_default())?;
        if let Some(ca) = ca {
            credentials = credentials.tls_ca_file(ca)?;
        }
        match (cert, key) {
            (Some(cert), Some(key)) => credentials = credentials.tls_identity_files(cert, key)?,
            (None, None) => {}
            _ => {
                return Err(Error::InvalidConfig(
                    "a TLS client certificate needs both --tls-cert and --tls-key".to_owned(),
                ));
            }
        }
        Ok(credentials)
    }

    /// Whether TLS settings were given.
    pub fn uses_tls(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    pub(crate) fn tls_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_enabled_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }

    pub(crate) fn interceptor(&self) -> Authorize {
        Authorize { authorization: self.authorization.clone() }
    }
}

/// Adds the bearer token to every call.
#[derive(Clone, Debug)]
pub(crate) struct Authorize {
    authorization: Option<AsciiMetadataValue>,
}

impl Interceptor for Authorize {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that carries the caller's token.
pub(crate) type AuthChannel = tonic::codegen::InterceptedService<tonic::transport::Channel, Authorize>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_becomes_a_bearer_header_and_is_never_printed() -> Result<(), Error> {
        let credentials = Credentials::new().token("muster_abc")?;
        let request = credentials.interceptor().call(Request::new(())).map_err(Error::Status)?;
        assert_eq!(request.metadata().get("authorization").and_then(|v| v.to_str().ok()), Some("Bearer muster_abc"));
        assert!(!format!("{credentials:?}").contains("muster_abc"));
        let none = Credentials::new().token("")?.interceptor().call(Request::new(())).map_err(Error::Status)?;
        assert!(none.metadata().get("authorization").is_none());
        assert!(Credentials::new().token("bad\ntoken").is_err());
        Ok(())
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let err = Credentials::from_parts(None, None, Some(Path::new("cert.pem")), None);
        assert!(matches!(err, Err(Error::InvalidConfig(m)) if m.contains("--tls-key")));
    }
}
