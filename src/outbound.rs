//! How the gateway reaches what it depends on: identity providers' discovery documents and
//! keys, token endpoints, the instance metadata service, Dataverse. One TLS configuration
//! for all of them, rustls with the bundled web PKI roots (a container needs no CA bundle
//! and trusts the same authorities for every dependency), and one proxy policy: none. A
//! proxy named by `HTTPS_PROXY` or `ALL_PROXY` in the environment would see the request
//! that carries the client secret, and the sidecar reaches its dependencies directly.

use std::sync::{Arc, OnceLock};

/// The TLS client configuration every outbound connection uses.
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|builder| {
                    builder
                        .with_root_certificates(roots.clone())
                        .with_no_client_auth()
                })
                // The provider's defaults are always consistent; this arm is not reached.
                .unwrap_or_else(|_| {
                    rustls::ClientConfig::builder()
                        .with_root_certificates(roots)
                        .with_no_client_auth()
                });
            Arc::new(config)
        })
        .clone()
}

/// A client builder for the identity side (discovery, keys, tokens, IMDS) with the shared
/// TLS configuration and no proxy; callers add their timeouts.
pub fn http_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_backend_preconfigured((*tls_config()).clone())
        .no_proxy()
}
