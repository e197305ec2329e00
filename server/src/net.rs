//! The listeners: accepting connections within limits, TLS with
//! certificates reloaded in place, and a deadline for each connection's
//! first bytes.
//!
//! An accept loop per listener takes a permit (at most `max_connections`
//! open at once), accepts, and hands the socket to its own task for the TLS
//! handshake and the protocol's first bytes, both within
//! `handshake_timeout`: an idle or slow connection costs one permit for
//! that long, never the accept loop's time. Accept errors (such as running
//! out of file descriptors) are logged at warn and retried with backoff, not
//! in a hot loop. Established connections reach tonic and the HTTP server
//! through a channel.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::auth::{CertIdentities, Identity};
use crate::config::{Limits, TlsConfig};

/// What the handlers can learn about a connection.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    /// The client's address.
    pub(crate) remote: SocketAddr,
    /// The identity of a verified, mapped client certificate.
    pub(crate) peer: Option<Arc<Identity>>,
}

/// Which protocol a listener speaks: it decides the ALPN offer and how many
/// bytes a client must send before the connection is handed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// gRPC: HTTP/2, whose 24-byte connection preface must arrive in time.
    Grpc,
    /// The HTTP port: HTTP/1.1; the first byte of a request must arrive in
    /// time.
    Http,
}

impl Protocol {
    fn first_bytes(self) -> usize {
        match self {
            Protocol::Grpc => 24,
            Protocol::Http => 1,
        }
    }

    fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            Protocol::Grpc => vec![b"h2".to_vec()],
            Protocol::Http => vec![b"http/1.1".to_vec()],
        }
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("{0}")]
    Rustls(String),
}

fn file_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File { path: path.to_path_buf(), message: message.to_string() }
}

/// The modification times of the certificate files, to notice a change.
type Stamps = Vec<Option<SystemTime>>;

/// The server's TLS settings, rebuilt from the files when they change.
#[derive(Debug)]
pub(crate) struct TlsReloader {
    config: TlsConfig,
    /// One rustls configuration per protocol (they differ in ALPN).
    current: RwLock<(Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>)>,
    stamps: std::sync::Mutex<Stamps>,
}

impl TlsReloader {
    pub(crate) fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        let stamps = stamps(config);
        let current = RwLock::new(build_pair(config)?);
        Ok(Self { config: config.clone(), current, stamps: std::sync::Mutex::new(stamps) })
    }

    fn acceptor(&self, protocol: Protocol) -> tokio_rustls::TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        let config = match protocol {
            Protocol::Grpc => current.0.clone(),
            Protocol::Http => current.1.clone(),
        };
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Rebuilds from the files when they changed (or always, when `force`).
    /// A broken new file is logged and the previous certificate stays.
    pub(crate) fn reload(&self, force: bool) -> bool {
        let now = stamps(&self.config);
        let mut last = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        if !force && *last == now {
            return false;
        }
        *last = now;
        match build_pair(&self.config) {
            Ok(pair) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = pair;
                info!(cert = %self.config.cert.display(), "reloaded the TLS certificate");
                true
            }
            Err(error) => {
                warn!(%error, "kept the previous TLS certificate: the new files do not load");
                false
            }
        }
    }

    /// Reloads on change (polled every `reload_interval`) and on SIGHUP
    /// until shutdown.
    pub(crate) async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        #[cfg(unix)]
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut poll = tokio::time::interval(self.config.reload_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = poll.tick() => { self.reload(false); }
                _ = sighup => { self.reload(true); }
            }
        }
    }
}

fn stamps(config: &TlsConfig) -> Stamps {
    [Some(&config.cert), Some(&config.key), config.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .collect()
}

fn build_pair(config: &TlsConfig) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>), TlsError> {
    Ok((Arc::new(build(config, Protocol::Grpc)?), Arc::new(build(config, Protocol::Http)?)))
}

fn build(config: &TlsConfig, protocol: Protocol) -> Result<rustls::ServerConfig, TlsError> {
    let certs = CertificateDer::pem_file_iter(&config.cert)
        .map_err(|e| file_error(&config.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&config.cert, e))?;
    if certs.is_empty() {
        return Err(file_error(&config.cert, "no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| file_error(&config.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &config.client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_error(path, e))? {
                roots.add(cert.map_err(|e| file_error(path, e))?).map_err(|e| file_error(path, e))?;
            }
            if roots.is_empty() {
                return Err(file_error(path, "no CA certificate found"));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error(path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| TlsError::Rustls(e.to_string()))?;
    server.alpn_protocols = protocol.alpn();
    Ok(server)
}

/// Accepts connections on `listener` until shutdown and sends the
/// established ones down the returned channel.
pub(crate) fn accept(
    listener: TcpListener,
    protocol: Protocol,
    tls: Option<Arc<TlsReloader>>,
    certs: Arc<CertIdentities>,
    limits: &Limits,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let handshake_timeout = limits.handshake_timeout;
    tokio::spawn(async move {
        let mut backoff = MIN_BACKOFF;
        loop {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(accepted) => {
                    backoff = MIN_BACKOFF;
                    accepted
                }
                Err(error) => {
                    warn!(%error, retry_in = ?backoff, "accepting a connection failed");
                    drop(permit);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tx, tls, certs) = (tx.clone(), tls.clone(), certs.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, establish(tcp, protocol, tls, &certs)).await {
                    Ok(Ok((io, peer))) => {
                        let conn = Conn { io, info: ConnInfo { remote, peer }, _permit: permit };
                        let _ = tx.send(conn).await;
                    }
                    Ok(Err(error)) => debug!(%remote, %error, "connection closed before it was established"),
                    Err(_) => {
                        debug!(%remote, timeout = ?handshake_timeout, "closed a connection that sent nothing in time")
                    }
                }
            });
        }
    });
    rx
}

const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The TLS handshake (when configured) and the protocol's first bytes.
async fn establish(
    tcp: TcpStream,
    protocol: Protocol,
    tls: Option<Arc<TlsReloader>>,
    certs: &CertIdentities,
) -> io::Result<(Rewind<Stream>, Option<Arc<Identity>>)> {
    let (mut stream, peer) = match tls {
        None => (Stream::Plain(tcp), None),
        Some(tls) => {
            let stream = tls.acceptor(protocol).accept(tcp).await?;
            let peer = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| certs.identify(c));
            (Stream::Tls(Box::new(stream)), peer)
        }
    };
    let mut prefix = vec![0; protocol.first_bytes()];
    stream.read_exact(&mut prefix).await?;
    Ok((Rewind { prefix, read: 0, inner: stream }, peer))
}

/// A plaintext or TLS socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A stream whose first bytes were read early and are replayed first.
#[derive(Debug)]
pub(crate) struct Rewind<S> {
    prefix: Vec<u8>,
    read: usize,
    inner: S,
}

/// An established connection; its permit returns when it is dropped.
#[derive(Debug)]
pub(crate) struct Conn {
    io: Rewind<Stream>,
    pub(crate) info: ConnInfo,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.prefix.len() {
            let rest = &this.prefix[this.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read += n;
            if this.read == this.prefix.len() {
                this.prefix = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}
