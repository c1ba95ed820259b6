//! TLS on the app port (`server.tls`): the server certificate, its reloading, optional
//! client certificates (mutual TLS), and the stream each accepted connection becomes.
//!
//! The certificate files are re-read every `reload_interval`; a changed pair that loads
//! replaces the old one for new connections (open ones keep their session), a pair that
//! does not load is logged and the old one stays. The handshake has the same deadline
//! from accept as the first request head (`server.header_read_timeout`), so a client
//! that opens TLS and stalls is closed.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Request;
use hyper::service::Service;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// Protocols offered by ALPN, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate, key or client CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{key}: {} is not PEM (expected -----BEGIN {expected}-----)", path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        expected: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{key}: {} holds no certificate", path.display())]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("server.tls.client_ca: {} holds a certificate that is not a valid CA root", path.display())]
    BadClientCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("server.tls.client_ca: cannot build the client certificate verifier")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
    #[error("server.tls: the private key does not fit the certificate, or is of an unsupported kind; check that both files are from the same pair")]
    KeyPair(#[source] rustls::Error),
    #[error("server.tls: no TLS protocol version is available")]
    Protocols(#[source] rustls::Error),
}

/// The files one TLS configuration is built from, and a digest of what they held when
/// last read, so an unchanged pair is not rebuilt (nor a broken one logged again).
struct Files {
    config: TlsConfig,
    last_digest: Option<Vec<u8>>,
}

impl Files {
    /// Reads the files; `None` when they hold what they held last time.
    fn read_if_changed(&mut self) -> Result<Option<Contents>, TlsError> {
        let contents = Contents::read(&self.config)?;
        let digest = contents.digest();
        if self.last_digest.as_deref() == Some(digest.as_slice()) {
            return Ok(None);
        }
        self.last_digest = Some(digest);
        Ok(Some(contents))
    }
}

/// What the configured files hold.
struct Contents {
    certificate: Vec<u8>,
    private_key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    fn read(config: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            certificate: read("server.tls.certificate", &config.certificate)?,
            private_key: read("server.tls.private_key", &config.private_key)?,
            client_ca: match &config.client_ca {
                Some(path) => Some(read("server.tls.client_ca", path)?),
                None => None,
            },
        })
    }

    /// SHA-256 over all three (the key is not kept around just to compare it).
    fn digest(&self) -> Vec<u8> {
        let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for part in [
            Some(&self.certificate),
            Some(&self.private_key),
            self.client_ca.as_ref(),
        ] {
            let part = part.map_or(&[][..], Vec::as_slice);
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        context.finish().as_ref().to_vec()
    }

    fn server_config(&self, config: &TlsConfig) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain = certificates(
            "server.tls.certificate",
            &config.certificate,
            &self.certificate,
        )?;
        let key =
            PrivateKeyDer::from_pem_slice(&self.private_key).map_err(|source| TlsError::Pem {
                key: "server.tls.private_key",
                path: config.private_key.clone(),
                expected: "PRIVATE KEY",
                source,
            })?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Protocols)?;
        let builder = match (&self.client_ca, &config.client_ca) {
            (Some(pem), Some(path)) => {
                let mut roots = RootCertStore::empty();
                for ca in certificates("server.tls.client_ca", path, pem)? {
                    roots.add(ca).map_err(|source| TlsError::BadClientCa {
                        path: path.clone(),
                        source,
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(TlsError::ClientVerifier)?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        // Checks that the key is the certificate's.
        let mut server = builder
            .with_single_cert(chain, key)
            .map_err(TlsError::KeyPair)?;
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(server)
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            key,
            path: path.to_owned(),
            expected: "CERTIFICATE",
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Accepts TLS on the app port with the certificate currently in force.
#[derive(Clone)]
pub struct TlsAcceptor {
    current: Arc<ArcSwap<rustls::ServerConfig>>,
    handshake_timeout: Duration,
}

impl TlsAcceptor {
    /// Loads the configured files (an error here stops the start) and keeps them
    /// re-read every `reload_interval` until `stop` is cancelled.
    pub fn start(
        config: &TlsConfig,
        handshake_timeout: Duration,
        stop: CancellationToken,
    ) -> Result<Self, TlsError> {
        let mut files = Files {
            config: config.clone(),
            last_digest: None,
        };
        let first = match files.read_if_changed()? {
            Some(contents) => contents.server_config(config)?,
            None => Contents::read(config)?.server_config(config)?,
        };
        let acceptor = Self {
            current: Arc::new(ArcSwap::from_pointee(first)),
            handshake_timeout,
        };
        tokio::spawn(reload(files, acceptor.current.clone(), stop));
        Ok(acceptor)
    }

    /// The connection as a stream that completes the TLS handshake first, and the
    /// place its client certificate's subject will be found once it has.
    fn accept<IO>(&self, io: IO) -> (InboundStream<IO>, ClientCertificateSlot)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let slot = ClientCertificateSlot::default();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        let stream = InboundStream::Handshaking {
            accept: Box::new(acceptor.accept(io)),
            deadline: Box::pin(tokio::time::sleep_until(
                Instant::now() + self.handshake_timeout,
            )),
            slot: slot.clone(),
        };
        (stream, slot)
    }
}

/// Re-reads the files every interval; a pair that loads replaces the current one.
async fn reload(
    mut files: Files,
    current: Arc<ArcSwap<rustls::ServerConfig>>,
    stop: CancellationToken,
) {
    let interval = files.config.reload_interval;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let loaded = files
            .read_if_changed()
            .and_then(|changed| changed.map(|c| c.server_config(&files.config)).transpose());
        match loaded {
            Ok(None) => {}
            Ok(Some(config)) => {
                current.store(Arc::new(config));
                tracing::info!(
                    certificate = %files.config.certificate.display(),
                    "server.tls: new certificate in force for new connections"
                );
            }
            Err(e) => {
                // A missing file is usually a rotation in progress; it is retried at
                // the next interval either way, and logged again only once it changes.
                tracing::error!(
                    error = %crate::error::chain(&e),
                    "server.tls: certificate files changed but do not load; the previous certificate stays in force"
                );
            }
        }
    }
}

/// The subject of a connection's verified client certificate, set when its handshake
/// completes (requests are read only after that).
#[derive(Clone, Default)]
pub struct ClientCertificateSlot(Arc<OnceLock<ClientCertificate>>);

impl ClientCertificateSlot {
    /// `inner` with each request carrying the connection's [`ClientCertificate`], if any.
    pub fn attach<S>(self, inner: S) -> WithClientCertificate<S> {
        WithClientCertificate { inner, slot: self }
    }
}

/// The verified client certificate's subject distinguished name (RFC 4514 text), as a
/// request extension.
#[derive(Clone, Debug)]
pub struct ClientCertificate(pub Arc<str>);

/// A service whose requests carry the connection's client certificate.
#[derive(Clone)]
pub struct WithClientCertificate<S> {
    inner: S,
    slot: ClientCertificateSlot,
}

impl<S, B> Service<Request<B>> for WithClientCertificate<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: Request<B>) -> Self::Future {
        if let Some(certificate) = self.slot.0.get() {
            request.extensions_mut().insert(certificate.clone());
        }
        self.inner.call(request)
    }
}

/// An accepted connection on the app port as hyper reads it: `io` itself on a plain
/// port, a TLS session on a TLS port.
pub fn accept<IO>(tls: Option<&TlsAcceptor>, io: IO) -> (InboundStream<IO>, ClientCertificateSlot)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tls {
        Some(tls) => tls.accept(io),
        None => (InboundStream::Plain(io), ClientCertificateSlot::default()),
    }
}

/// An accepted connection: plain, or on a TLS port handshaking until it is done or the
/// deadline passes, then the TLS session.
pub enum InboundStream<IO> {
    Plain(IO),
    Handshaking {
        // Boxed: a handshake in progress is much larger than the session it becomes.
        accept: Box<tokio_rustls::Accept<IO>>,
        deadline: Pin<Box<Sleep>>,
        slot: ClientCertificateSlot,
    },
    Established(Box<TlsStream<IO>>),
    /// The handshake failed or timed out; the connection is being closed.
    Failed,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> InboundStream<IO> {
    /// Drives the handshake; `Ready(Ok)` once the session is established.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Self::Handshaking {
            accept,
            deadline,
            slot,
        } = self
        else {
            return match self {
                Self::Failed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
                _ => Poll::Ready(Ok(())),
            };
        };
        match Pin::new(accept.as_mut()).poll(cx) {
            Poll::Ready(Ok(stream)) => {
                if let Some(subject) = client_subject(stream.get_ref().1) {
                    let _ = slot.0.set(ClientCertificate(subject.into()));
                }
                *self = Self::Established(Box::new(stream));
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                *self = Self::Failed;
                Poll::Ready(Err(e))
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    tracing::debug!(
                        "TLS handshake not finished by server.header_read_timeout; closing"
                    );
                    *self = Self::Failed;
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "TLS handshake not finished within server.header_read_timeout",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// The end-entity certificate's subject, when the client presented one (the verifier
/// has checked it against `client_ca` by then).
fn client_subject(session: &rustls::ServerConnection) -> Option<String> {
    let der = session.peer_certificates()?.first()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(certificate.subject().to_string())
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for InboundStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_handshake(cx))?;
        match this {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Established(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            _ => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for InboundStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_handshake(cx))?;
        match this {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Established(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
            _ => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_handshake(cx))?;
        match this {
            Self::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Established(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
            _ => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Established(stream) => stream.is_write_vectored(),
            _ => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Established(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Established(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            // Nothing to close politely; dropping the socket closes it.
            _ => Poll::Ready(Ok(())),
        }
    }
}
