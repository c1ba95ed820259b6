//! How the gateway proves its own identity to Azure AD when it asks for the S2S token:
//! a client secret, a certificate (a signed client assertion, RFC 7523), Kubernetes
//! workload identity federation (the projected service-account token as the assertion),
//! or the Azure instance metadata service (managed identity).
//!
//! Everything a credential needs is checked when the configuration loads (files exist and
//! parse, the key belongs to the certificate, variables are set), so a mistake is a config
//! error naming its key rather than a failing token refresher. Files are read again on
//! every token request: kubelet rotates the federated token and operators rotate
//! certificates by rewriting files, and neither should need a restart.
//!
//! Key material, secrets and assertions never appear in errors, `Debug` output or logs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use aws_lc_rs::signature::{KeyPair as _, RsaKeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::EncodingKey;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use url::Url;

use crate::config::files::{certificate_paths, LoadedFiles};
use crate::config::{invalid, ConfigError};
use crate::secret::Secret;

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
pub const JWT_BEARER_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The Azure instance metadata service's token endpoint.
pub(crate) const DEFAULT_IMDS_ENDPOINT: &str =
    "http://169.254.169.254/metadata/identity/oauth2/token";
/// The IMDS API version whose token response the token source parses.
pub(crate) const IMDS_API_VERSION: &str = "2018-02-01";
/// Lifetime of a certificate assertion: Azure AD wants 5-10 minutes; MSAL uses 10.
const ASSERTION_LIFETIME_SECS: u64 = 600;
/// IMDS answers 410 while it is being updated and asks to be retried within 70 s.
const IMDS_GONE_RETRY_AFTER_SECS: u64 = 10;

/// `certificate:` in an environment's configuration.
///
/// Either files (`certificate`, `private_key`) or variables holding PEM text
/// (`certificate_pem_env`, `private_key_pem_env`). Files are re-read on every token
/// request, so replacing them rotates the certificate without a restart.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// PEM file holding the certificate registered on the app registration (the first
    /// `CERTIFICATE` block counts). It may hold the private key too.
    pub certificate: Option<PathBuf>,
    /// PEM file holding the RSA private key (PKCS#8 `PRIVATE KEY` or PKCS#1
    /// `RSA PRIVATE KEY`, unencrypted). Default: the certificate file.
    pub private_key: Option<PathBuf>,
    /// Name of an environment variable holding the certificate PEM (instead of `certificate`).
    pub certificate_pem_env: Option<String>,
    /// Name of an environment variable holding the private key PEM (instead of `private_key`).
    pub private_key_pem_env: Option<String>,
    /// Signature algorithm of the client assertion: `PS256` (Azure AD's current
    /// guidance, header `x5t#S256`) or `RS256` (the older form, header `x5t`).
    #[serde(default)]
    pub algorithm: SigningAlgorithm,
}

/// `workload_identity:` in an environment's configuration (Azure AD workload identity
/// federation in Kubernetes). Every key defaults to the variable the workload identity
/// webhook sets, so `workload_identity: {}` is the usual form.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkloadIdentity {
    /// The projected service-account token. Default: `$AZURE_FEDERATED_TOKEN_FILE`.
    pub token_file: Option<PathBuf>,
    /// The app registration (or user-assigned identity) trusting the token. Default:
    /// `$AZURE_CLIENT_ID`.
    pub client_id: Option<String>,
    /// The tenant to ask for the token. Default: `$AZURE_TENANT_ID`.
    pub tenant_id: Option<String>,
    /// Authority host, e.g. `https://login.microsoftonline.com/`. Default:
    /// `$AZURE_AUTHORITY_HOST`.
    pub authority_host: Option<String>,
}

/// `managed_identity:` in an environment's configuration (Azure instance metadata service).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManagedIdentity {
    /// The IMDS token endpoint. Default:
    /// `http://169.254.169.254/metadata/identity/oauth2/token`.
    #[serde(default = "default_imds_endpoint")]
    pub endpoint: String,
    /// Client id of a user-assigned identity; absent: the system-assigned identity.
    pub client_id: Option<String>,
}

impl Default for RawManagedIdentity {
    fn default() -> Self {
        Self {
            endpoint: default_imds_endpoint(),
            client_id: None,
        }
    }
}

fn default_imds_endpoint() -> String {
    DEFAULT_IMDS_ENDPOINT.to_owned()
}

/// The client assertion's signature algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SigningAlgorithm {
    /// RSASSA-PSS with SHA-256; the assertion names the certificate by `x5t#S256`.
    #[default]
    PS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256; the assertion names the certificate by `x5t` (SHA-1).
    RS256,
}

impl SigningAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PS256 => "PS256",
            Self::RS256 => "RS256",
        }
    }
}

/// How the gateway authenticates its token requests.
#[derive(Debug, Clone)]
pub enum Credential {
    /// `client_secret`: the form field, as before.
    ClientSecret(Secret),
    /// `certificate`: a signed client assertion made afresh for every request.
    Certificate(CertificateCredential),
    /// `workload_identity`: the projected service-account token as the client assertion.
    WorkloadIdentity(WorkloadIdentityCredential),
    /// `managed_identity`: a token from the instance metadata service, no Azure AD form.
    ManagedIdentity(ManagedIdentityCredential),
}

/// Why a token request could not be made. Never carries key material, a secret or an
/// assertion.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file or variable holds something unusable (`origin` names it, `reason` says why).
    #[error("{origin}: {reason}")]
    Invalid { origin: String, reason: String },
    #[error("signing the client assertion failed")]
    Sign,
    #[error("token request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl Credential {
    /// `client_secret:` (already interpolated): refused when empty.
    pub fn client_secret(secret: Secret, key: &str) -> Result<Self, ConfigError> {
        if secret.is_empty() {
            return Err(invalid(key, "must not be empty"));
        }
        Ok(Self::ClientSecret(secret))
    }

    /// `certificate:` under the dotted key `key`: loads and checks the certificate and key
    /// now (readable, PEM, RSA, the key belongs to the certificate, not expired).
    pub fn certificate(raw: RawCertificate, key: &str) -> Result<Self, ConfigError> {
        Self::certificate_with_env(raw, key, &|name| std::env::var(name).ok())
    }

    fn certificate_with_env(
        raw: RawCertificate,
        key: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let files = LoadedFiles::read(certificate_paths(&raw));
        Self::certificate_loaded(raw, key, env, &files)
    }

    /// [`Credential::certificate`] with its files already read into `files`.
    pub(crate) fn certificate_loaded(
        raw: RawCertificate,
        key: &str,
        env: &dyn Fn(&str) -> Option<String>,
        files: &LoadedFiles,
    ) -> Result<Self, ConfigError> {
        let cert_source = match (raw.certificate, raw.certificate_pem_env) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{key}.certificate"),
                    "give either certificate or certificate_pem_env, not both".to_owned(),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    format!("{key}.certificate"),
                    "required (a PEM file), or certificate_pem_env".to_owned(),
                ))
            }
            (Some(path), None) => PemSource::File(path),
            (None, Some(var)) => PemSource::from_env(&var, env)
                .map_err(|m| invalid(format!("{key}.certificate_pem_env"), m))?,
        };
        let key_source = match (raw.private_key, raw.private_key_pem_env) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{key}.private_key"),
                    "give either private_key or private_key_pem_env, not both".to_owned(),
                ))
            }
            (Some(path), None) => PemSource::File(path),
            (None, Some(var)) => PemSource::from_env(&var, env)
                .map_err(|m| invalid(format!("{key}.private_key_pem_env"), m))?,
            // A combined PEM (certificate and key in one file) is how Key Vault exports them.
            (None, None) => cert_source.clone(),
        };
        let credential = CertificateCredential {
            certificate: cert_source,
            private_key: key_source,
            algorithm: raw.algorithm,
            last_seen: Arc::new(Mutex::new(String::new())),
        };
        let material = credential.load_from(files).map_err(|e| {
            let field = match &e {
                MaterialError::Certificate(_) => {
                    credential.certificate.key_name(key, "certificate")
                }
                MaterialError::PrivateKey(_) | MaterialError::Mismatch => {
                    credential.private_key.key_name(key, "private_key")
                }
            };
            invalid(field, e.message())
        })?;
        credential.remember(&material);
        Ok(Self::Certificate(credential))
    }

    /// `workload_identity:` under the dotted key `key`, defaults from the variables the
    /// workload identity webhook sets. The token file must exist now.
    pub fn workload_identity(raw: RawWorkloadIdentity, key: &str) -> Result<Self, ConfigError> {
        Self::workload_identity_with_env(raw, key, &|name| std::env::var(name).ok())
    }

    fn workload_identity_with_env(
        raw: RawWorkloadIdentity,
        key: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let files = LoadedFiles::read(raw.token_file_path(env).as_deref());
        Self::workload_identity_loaded(raw, key, env, &files)
    }

    /// [`Credential::workload_identity`] with the token file already read into `files`.
    pub(crate) fn workload_identity_loaded(
        raw: RawWorkloadIdentity,
        key: &str,
        env: &dyn Fn(&str) -> Option<String>,
        files: &LoadedFiles,
    ) -> Result<Self, ConfigError> {
        let from_env = |value: Option<String>, var: &str| {
            value
                .or_else(|| env(var))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let token_file = raw.token_file_path(env).ok_or_else(|| {
            invalid(
                format!("{key}.token_file"),
                "not set, and AZURE_FEDERATED_TOKEN_FILE is not set either (is the pod labelled azure.workload.identity/use: \"true\"?)".to_owned(),
            )
        })?;
        // Kubelet writes the projected token before the container starts: a missing file
        // is a mounting mistake, not a race.
        let text = files.get(&format!("{key}.token_file"), &token_file)?;
        // Read as text at every request: a file that is not UTF-8 fails here as it would there.
        match std::str::from_utf8(text) {
            Ok(text) if text.trim().is_empty() => {
                return Err(invalid(
                    format!("{key}.token_file"),
                    format!("{} is empty", token_file.display()),
                ))
            }
            Ok(_) => {}
            Err(_) => {
                return Err(invalid(
                    format!("{key}.token_file"),
                    format!(
                        "cannot read {}: stream did not contain valid UTF-8",
                        token_file.display()
                    ),
                ))
            }
        }
        let authority_host = match from_env(raw.authority_host, "AZURE_AUTHORITY_HOST") {
            None => None,
            Some(host) => Some(
                parse_authority_host(&host)
                    .map_err(|m| invalid(format!("{key}.authority_host"), m))?,
            ),
        };
        Ok(Self::WorkloadIdentity(WorkloadIdentityCredential {
            token_file,
            client_id: from_env(raw.client_id, "AZURE_CLIENT_ID"),
            tenant_id: raw
                .tenant_id
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
            env_tenant_id: from_env(None, "AZURE_TENANT_ID"),
            authority_host,
        }))
    }

    /// `managed_identity:` under the dotted key `key`.
    pub fn managed_identity(raw: RawManagedIdentity, key: &str) -> Result<Self, ConfigError> {
        let endpoint = Url::parse(raw.endpoint.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.query().is_none())
            .ok_or_else(|| {
                invalid(
                    format!("{key}.endpoint"),
                    "must be an http(s) URL without a query".to_owned(),
                )
            })?;
        let client_id = raw.client_id.map(|c| c.trim().to_owned());
        if client_id.as_deref() == Some("") {
            return Err(invalid(format!("{key}.client_id"), "must not be empty"));
        }
        // IMDS is link-local plain HTTP with a longer timeout: a client of its own, with the
        // same (absent) proxy policy.
        let http = crate::outbound::http_client()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| invalid(key, format!("cannot build the HTTP client: {e}")))?;
        Ok(Self::ManagedIdentity(ManagedIdentityCredential {
            endpoint,
            client_id,
            http,
        }))
    }

    /// Sends the token request for `scope` (e.g. `https://org.crm.dynamics.com/.default`)
    /// and returns the HTTP response, whatever its status, for the token source to parse.
    ///
    /// Client secret, certificate and workload identity POST the client-credentials form to
    /// `token_url` as `client_id`. Managed identity GETs its IMDS endpoint with the
    /// resource (the scope without `/.default`) and ignores `token_url` and `client_id`;
    /// an IMDS 410 ("being updated") gets a `Retry-After` so the refresher's backoff
    /// retries it within IMDS's 70 s window.
    pub async fn request_token(
        &self,
        http: &reqwest::Client,
        token_url: &Url,
        client_id: &str,
        scope: &str,
    ) -> Result<reqwest::Response, CredentialError> {
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", client_id.to_owned()),
            ("scope", scope.to_owned()),
        ];
        match self {
            Self::ClientSecret(secret) => {
                form.push(("client_secret", secret.expose().to_owned()));
            }
            Self::Certificate(cert) => {
                let assertion = cert.assertion(token_url, client_id).await?;
                form.push((
                    "client_assertion_type",
                    JWT_BEARER_ASSERTION_TYPE.to_owned(),
                ));
                form.push(("client_assertion", assertion));
            }
            Self::WorkloadIdentity(wi) => {
                let assertion = wi.read_token().await?;
                form.push((
                    "client_assertion_type",
                    JWT_BEARER_ASSERTION_TYPE.to_owned(),
                ));
                form.push(("client_assertion", assertion));
            }
            Self::ManagedIdentity(mi) => return mi.request(scope).await,
        }
        http.post(token_url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|source| CredentialError::Http {
                url: token_url.to_string(),
                source: source.without_url(),
            })
    }

    /// The kind, as written in the configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ClientSecret(_) => "client_secret",
            Self::Certificate(_) => "certificate",
            Self::WorkloadIdentity(_) => "workload_identity",
            Self::ManagedIdentity(_) => "managed_identity",
        }
    }

    /// The kind with what an operator needs to match it against Azure AD, for `check`:
    /// e.g. `certificate (PS256, x5t#S256 …, SHA-1 thumbprint …, valid until …)`, the
    /// certificate being the one last loaded.
    pub fn describe(&self) -> String {
        match self {
            Self::ClientSecret(_) => "client_secret".to_owned(),
            Self::Certificate(c) => format!(
                "certificate ({}, {})",
                c.algorithm.as_str(),
                c.last_seen.lock().unwrap_or_else(PoisonError::into_inner)
            ),
            Self::WorkloadIdentity(w) => {
                format!("workload_identity (token file {})", w.token_file.display())
            }
            Self::ManagedIdentity(m) => match &m.client_id {
                Some(id) => format!("managed_identity (user-assigned {id}, {})", m.endpoint),
                None => format!("managed_identity (system-assigned, {})", m.endpoint),
            },
        }
    }

    /// The client id the credential itself names (workload identity's `client_id` or
    /// `$AZURE_CLIENT_ID`, a user-assigned managed identity's `client_id`): the one to
    /// use where the environment gives none.
    pub fn default_client_id(&self) -> Option<&str> {
        match self {
            Self::WorkloadIdentity(w) => w.client_id.as_deref(),
            Self::ManagedIdentity(m) => m.client_id.as_deref(),
            _ => None,
        }
    }

    /// Workload identity's `{authority_host}/{tenant}/oauth2/v2.0/token` when both are
    /// known: the token URL to use where the environment gives none. The tenant is the
    /// block's `tenant_id`, else `tenant_id` (the environment's), else `$AZURE_TENANT_ID`:
    /// a multi-tenant app asks each customer's own tenant, not the webhook's.
    pub fn default_token_url(&self, tenant_id: Option<&str>) -> Option<Url> {
        match self {
            Self::WorkloadIdentity(w) => w.token_url(tenant_id),
            _ => None,
        }
    }
}

/// Where a PEM comes from.
#[derive(Clone)]
enum PemSource {
    File(PathBuf),
    /// Read from the named variable at load (a process's environment does not change).
    Env {
        var: String,
        pem: Secret,
    },
}

impl fmt::Debug for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "File({})", p.display()),
            Self::Env { var, .. } => write!(f, "Env({var})"),
        }
    }
}

impl PemSource {
    fn from_env(var: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        match env(var) {
            Some(pem) if !pem.trim().is_empty() => Ok(Self::Env {
                var: var.to_owned(),
                pem: Secret::new(pem),
            }),
            Some(_) => Err(format!("variable {var} is empty")),
            None => Err(format!("variable {var} is not set")),
        }
    }

    fn origin(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::Env { var, .. } => format!("${var}"),
        }
    }

    /// The configuration key a problem with this source belongs to.
    fn key_name(&self, key: &str, file_key: &str) -> String {
        match self {
            Self::File(_) => format!("{key}.{file_key}"),
            Self::Env { .. } => format!("{key}.{file_key}_pem_env"),
        }
    }

    /// The PEM as loaded with the configuration.
    fn loaded<'a>(&'a self, files: &'a LoadedFiles) -> Result<&'a [u8], String> {
        match self {
            Self::File(p) => files.contents(p),
            Self::Env { pem, .. } => Ok(pem.expose().as_bytes()),
        }
    }

    async fn read(&self) -> Result<Vec<u8>, CredentialError> {
        match self {
            Self::File(p) => tokio::fs::read(p)
                .await
                .map_err(|source| CredentialError::Read {
                    path: p.clone(),
                    source,
                }),
            Self::Env { pem, .. } => Ok(pem.expose().as_bytes().to_vec()),
        }
    }
}

/// A certificate credential: the PEM sources, re-read for every assertion.
#[derive(Clone)]
pub struct CertificateCredential {
    certificate: PemSource,
    private_key: PemSource,
    algorithm: SigningAlgorithm,
    /// Description of the certificate last loaded (thumbprints, expiry), for `describe`.
    last_seen: Arc<Mutex<String>>,
}

impl fmt::Debug for CertificateCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateCredential")
            .field("certificate", &self.certificate)
            .field("private_key", &self.private_key)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

/// A loaded certificate and its key.
struct Material {
    cert_der: Vec<u8>,
    signing_key: EncodingKey,
    not_after: u64,
}

enum MaterialError {
    Certificate(String),
    PrivateKey(String),
    Mismatch,
}

impl MaterialError {
    fn message(&self) -> String {
        match self {
            Self::Certificate(m) | Self::PrivateKey(m) => m.clone(),
            Self::Mismatch => "the private key does not belong to the certificate".to_owned(),
        }
    }
}

impl CertificateCredential {
    /// The material from the files read with the configuration (no disk access).
    fn load_from(&self, files: &LoadedFiles) -> Result<Material, MaterialError> {
        let cert = self
            .certificate
            .loaded(files)
            .map_err(MaterialError::Certificate)?;
        let key = self
            .private_key
            .loaded(files)
            .map_err(MaterialError::PrivateKey)?;
        self.parse(cert, key)
    }

    async fn load(&self) -> Result<Material, CredentialError> {
        let cert = self.certificate.read().await?;
        let key = self.private_key.read().await?;
        self.parse(&cert, &key).map_err(|e| {
            let origin = match e {
                MaterialError::Certificate(_) => self.certificate.origin(),
                MaterialError::PrivateKey(_) | MaterialError::Mismatch => self.private_key.origin(),
            };
            CredentialError::Invalid {
                origin,
                reason: e.message(),
            }
        })
    }

    fn parse(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<Material, MaterialError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|_| MaterialError::Certificate("no PEM CERTIFICATE block".to_owned()))?
            .to_vec();
        let info = parse_certificate(&cert_der).ok_or_else(|| {
            MaterialError::Certificate("the certificate is not valid X.509 DER".to_owned())
        })?;
        let now = unix_now();
        if info.not_after <= now {
            return Err(MaterialError::Certificate(format!(
                "the certificate expired at {}",
                civil_time(info.not_after)
            )));
        }
        let (key, signing_key) = parse_private_key(key_pem).map_err(MaterialError::PrivateKey)?;
        let cert_key = aws_lc_rs::rsa::PublicKey::from_der(info.spki).map_err(|_| {
            MaterialError::Certificate("the certificate's key is not RSA".to_owned())
        })?;
        if cert_key.as_ref() != key.public_key().as_ref() {
            return Err(MaterialError::Mismatch);
        }
        Ok(Material {
            not_after: info.not_after,
            signing_key,
            cert_der,
        })
    }

    fn remember(&self, material: &Material) {
        let text = format!(
            "x5t#S256 {}, SHA-1 thumbprint {}, valid until {}",
            x5t_s256(&material.cert_der),
            sha1_hex(&material.cert_der),
            civil_time(material.not_after)
        );
        *self
            .last_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = text;
    }

    /// A fresh client assertion for `client_id` at `token_url`, from the files as they
    /// are now.
    async fn assertion(&self, token_url: &Url, client_id: &str) -> Result<String, CredentialError> {
        let material = self.load().await?;
        self.remember(&material);
        sign_assertion(
            &material,
            self.algorithm,
            token_url.as_str(),
            client_id,
            unix_now(),
        )
    }
}

/// The RFC 7523 client assertion Azure AD expects of a certificate credential.
fn sign_assertion(
    material: &Material,
    algorithm: SigningAlgorithm,
    audience: &str,
    client_id: &str,
    now: u64,
) -> Result<String, CredentialError> {
    let mut header = jsonwebtoken::Header::new(match algorithm {
        SigningAlgorithm::PS256 => jsonwebtoken::Algorithm::PS256,
        SigningAlgorithm::RS256 => jsonwebtoken::Algorithm::RS256,
    });
    header.typ = Some("JWT".to_owned());
    match algorithm {
        SigningAlgorithm::PS256 => header.x5t_s256 = Some(x5t_s256(&material.cert_der)),
        SigningAlgorithm::RS256 => header.x5t = Some(x5t_sha1(&material.cert_der)),
    }
    let claims = serde_json::json!({
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": uuid::Uuid::new_v4().to_string(),
        "nbf": now,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    jsonwebtoken::encode(&header, &claims, &material.signing_key).map_err(|_| CredentialError::Sign)
}

/// The key pair (to match against the certificate) and the same key for signing.
fn parse_private_key(pem: &[u8]) -> Result<(RsaKeyPair, EncodingKey), String> {
    let der = match PrivateKeyDer::from_pem_slice(pem) {
        Ok(der) => der,
        Err(_) => {
            // Named apart because it is a common mistake with an easy fix.
            let text = String::from_utf8_lossy(pem);
            return Err(
                if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED")
                {
                    "the private key is encrypted; give it unencrypted (e.g. `openssl pkcs8 -nocrypt`)".to_owned()
                } else {
                    "no PEM PRIVATE KEY or RSA PRIVATE KEY block".to_owned()
                },
            );
        }
    };
    let (pair, pkcs1) = match der {
        PrivateKeyDer::Pkcs8(k) => (
            RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            pkcs1_of_pkcs8(k.secret_pkcs8_der()),
        ),
        PrivateKeyDer::Pkcs1(k) => (
            RsaKeyPair::from_der(k.secret_pkcs1_der()),
            Some(k.secret_pkcs1_der().to_vec()),
        ),
        _ => {
            return Err(
                "the private key is not RSA (Azure AD certificate credentials are RSA)".to_owned(),
            )
        }
    };
    // KeyRejected's text names the reason (e.g. "TooSmall"), never key bytes.
    let pair = pair.map_err(|e| format!("the private key is not a usable RSA key ({e})"))?;
    let pkcs1 = pkcs1.ok_or_else(|| "the private key is not a usable RSA key".to_owned())?;
    Ok((pair, EncodingKey::from_rsa_der(&pkcs1)))
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (RFC 5208): the form
/// `jsonwebtoken` signs with.
fn pkcs1_of_pkcs8(pkcs8: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::asn1_rs::{Any, FromDer, Integer, OctetString, ParseResult, Sequence};
    let parsed: ParseResult<'_, Vec<u8>> = Sequence::from_der_and_then(pkcs8, |i| {
        let (i, _version) = Integer::from_der(i)?;
        let (i, _algorithm) = Any::from_der(i)?;
        let (i, key) = OctetString::from_der(i)?;
        Ok((i, key.as_cow().to_vec()))
    });
    parsed.ok().map(|(_, key)| key)
}

/// A workload identity credential: the projected token file, read for every request.
#[derive(Debug, Clone)]
pub struct WorkloadIdentityCredential {
    token_file: PathBuf,
    client_id: Option<String>,
    /// `tenant_id` as configured in the block.
    tenant_id: Option<String>,
    /// `$AZURE_TENANT_ID`: the webhook's, the weakest default.
    env_tenant_id: Option<String>,
    authority_host: Option<Url>,
}

impl WorkloadIdentityCredential {
    async fn read_token(&self) -> Result<String, CredentialError> {
        read_federated_token(&self.token_file).await
    }

    fn token_url(&self, tenant_id: Option<&str>) -> Option<Url> {
        let tenant = self
            .tenant_id
            .as_deref()
            .or(tenant_id)
            .or(self.env_tenant_id.as_deref())?;
        self.authority_host
            .as_ref()?
            .join(&format!("{tenant}/oauth2/v2.0/token"))
            .ok()
    }
}

impl RawWorkloadIdentity {
    /// `token_file`, else `$AZURE_FEDERATED_TOKEN_FILE` (trimmed, not empty).
    pub(crate) fn token_file_path(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
        self.token_file.clone().or_else(|| {
            env("AZURE_FEDERATED_TOKEN_FILE")
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
    }
}

async fn read_federated_token(path: &Path) -> Result<String, CredentialError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| CredentialError::Read {
            path: path.to_owned(),
            source,
        })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CredentialError::Invalid {
            origin: path.display().to_string(),
            reason: "the federated token file is empty".to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// `https://login.microsoftonline.com` → `https://login.microsoftonline.com/` (a base to
/// join the tenant path onto).
fn parse_authority_host(host: &str) -> Result<Url, String> {
    let mut url = Url::parse(host)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.query().is_none())
        .ok_or_else(|| format!("{host:?} is not an http(s) URL"))?;
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// A managed identity credential: the instance metadata service.
#[derive(Debug, Clone)]
pub struct ManagedIdentityCredential {
    endpoint: Url,
    client_id: Option<String>,
    http: reqwest::Client,
}

impl ManagedIdentityCredential {
    async fn request(&self, scope: &str) -> Result<reqwest::Response, CredentialError> {
        // IMDS speaks the v1 dialect: a resource, not a scope.
        let resource = scope.strip_suffix("/.default").unwrap_or(scope);
        let mut url = self.endpoint.clone();
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("api-version", IMDS_API_VERSION);
            query.append_pair("resource", resource);
            if let Some(id) = &self.client_id {
                query.append_pair("client_id", id);
            }
        }
        let mut response = self
            .http
            .get(url)
            .header("Metadata", "true")
            .send()
            .await
            .map_err(|source| CredentialError::Http {
                url: self.endpoint.to_string(),
                source: source.without_url(),
            })?;
        if response.status() == reqwest::StatusCode::GONE
            && !response
                .headers()
                .contains_key(reqwest::header::RETRY_AFTER)
        {
            response.headers_mut().insert(
                reqwest::header::RETRY_AFTER,
                reqwest::header::HeaderValue::from(IMDS_GONE_RETRY_AFTER_SECS),
            );
        }
        Ok(response)
    }
}

// ---- Certificates ----------------------------------------------------------------------

/// `x5t#S256`: base64url SHA-256 of the certificate DER.
pub fn x5t_s256(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, cert_der))
}

/// `x5t`: base64url SHA-1 of the certificate DER (the older header).
pub(crate) fn x5t_sha1(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der))
}

/// The thumbprint Azure's portal shows: uppercase hex SHA-1.
fn sha1_hex(cert_der: &[u8]) -> String {
    digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// What the gateway needs from an X.509 certificate.
pub(crate) struct CertificateInfo<'a> {
    /// The DER SubjectPublicKeyInfo (tag and length included).
    pub(crate) spki: &'a [u8],
    pub(crate) not_after: u64,
}

/// Reads the public key and validity of a DER certificate. Only the structure is read
/// (Azure AD, not the gateway, decides whether it trusts the certificate).
pub(crate) fn parse_certificate(der: &[u8]) -> Option<CertificateInfo<'_>> {
    let (rest, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    Some(CertificateInfo {
        spki: certificate.tbs_certificate.subject_pki.raw,
        // Before 1970 is long expired.
        not_after: u64::try_from(certificate.validity().not_after.timestamp()).unwrap_or(0),
    })
}

/// `2030-01-31T12:00:00Z`.
fn civil_time(secs: u64) -> String {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| format!("{secs} seconds after 1970"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{
        UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256,
    };
    use serde_json::Value;
    use testkit::Scratch;

    /// A self-signed RSA-2048 certificate: (certificate PEM, PKCS#8 key PEM, certificate DER).
    fn test_certificate(expired: bool) -> (String, String, Vec<u8>) {
        let key =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["dynamics-gateway".to_owned()]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn decode(segment: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
    }

    fn certificate_credential(raw: RawCertificate) -> CertificateCredential {
        match Credential::certificate_with_env(raw, "dynamics.certificate", &|_| None).unwrap() {
            Credential::Certificate(c) => c,
            other => panic!("not a certificate credential: {other:?}"),
        }
    }

    fn files(scratch: &Scratch, cert: &str, key: &str) -> RawCertificate {
        RawCertificate {
            certificate: Some(scratch.write("cert.pem", cert).unwrap()),
            private_key: Some(scratch.write("key.pem", key).unwrap()),
            ..RawCertificate::default()
        }
    }

    fn token_url() -> Url {
        Url::parse("https://login.microsoftonline.com/tenant-a/oauth2/v2.0/token").unwrap()
    }

    #[tokio::test]
    async fn ps256_assertion_has_the_azure_ad_shape_and_verifies() {
        let scratch = Scratch::new("dg-cred").unwrap();
        let (cert, key, der) = test_certificate(false);
        let credential = certificate_credential(files(&scratch, &cert, &key));
        let before = unix_now();
        let assertion = credential.assertion(&token_url(), "app-1").await.unwrap();
        let parts: Vec<&str> = assertion.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode(parts[0]);
        assert_eq!(header["alg"], "PS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["x5t#S256"], x5t_s256(&der));
        assert!(header.get("x5t").is_none());
        let claims = decode(parts[1]);
        assert_eq!(claims["aud"], token_url().as_str());
        assert_eq!(claims["iss"], "app-1");
        assert_eq!(claims["sub"], "app-1");
        assert!(uuid::Uuid::parse_str(claims["jti"].as_str().unwrap()).is_ok());
        let nbf = claims["nbf"].as_u64().unwrap();
        let exp = claims["exp"].as_u64().unwrap();
        assert!(nbf >= before && nbf <= unix_now());
        assert_eq!(claims["iat"].as_u64(), Some(nbf));
        assert!((300..=600).contains(&(exp - nbf)));

        let spki = parse_certificate(&der).unwrap().spki;
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let input = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, spki)
            .verify(input.as_bytes(), &signature)
            .unwrap();

        // Every assertion is new: a fresh jti each time.
        let again = credential.assertion(&token_url(), "app-1").await.unwrap();
        let again = decode(again.split('.').nth(1).unwrap());
        assert_ne!(again["jti"], claims["jti"]);
    }

    #[tokio::test]
    async fn rs256_uses_the_sha1_x5t_and_pkcs1_signature() {
        let scratch = Scratch::new("dg-cred").unwrap();
        let (cert, key, der) = test_certificate(false);
        let mut raw = files(&scratch, &cert, &key);
        raw.algorithm = SigningAlgorithm::RS256;
        let credential = certificate_credential(raw);
        let assertion = credential.assertion(&token_url(), "app-1").await.unwrap();
        let (input, signature) = assertion.rsplit_once('.').unwrap();
        let header = decode(input.split('.').next().unwrap());
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["x5t"], x5t_sha1(&der));
        assert_eq!(URL_SAFE_NO_PAD.decode(x5t_sha1(&der)).unwrap().len(), 20);
        let spki = parse_certificate(&der).unwrap().spki;
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, spki)
            .verify(
                input.as_bytes(),
                &URL_SAFE_NO_PAD.decode(signature).unwrap(),
            )
            .unwrap();
    }

    #[tokio::test]
    async fn rewriting_the_files_rotates_the_certificate_without_a_reload() {
        let scratch = Scratch::new("dg-cred").unwrap();
        let (cert1, key1, der1) = test_certificate(false);
        let (cert2, key2, der2) = test_certificate(false);
        let credential =
            Credential::certificate_with_env(files(&scratch, &cert1, &key1), "c", &|_| None)
                .unwrap();
        let Credential::Certificate(inner) = &credential else {
            panic!("not a certificate credential")
        };
        let thumb = |a: &str| decode(a.split('.').next().unwrap())["x5t#S256"].clone();
        let first = inner.assertion(&token_url(), "app").await.unwrap();
        assert_eq!(thumb(&first), x5t_s256(&der1));
        assert!(credential.describe().contains(&x5t_s256(&der1)));

        scratch.write("cert.pem", &cert2).unwrap();
        scratch.write("key.pem", &key2).unwrap();
        let second = inner.assertion(&token_url(), "app").await.unwrap();
        assert_eq!(thumb(&second), x5t_s256(&der2));
        assert!(credential.describe().contains(&x5t_s256(&der2)));

        // Halfway through a rotation (new certificate, old key) the fetch fails cleanly and
        // names the file, without any key material.
        scratch.write("key.pem", &key1).unwrap();
        let err = inner
            .assertion(&token_url(), "app")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key.pem") && err.contains("does not belong"),
            "{err}"
        );
        assert!(!err.contains("PRIVATE KEY"));
    }

    #[tokio::test]
    async fn a_combined_pem_and_pem_from_variables_work() {
        let scratch = Scratch::new("dg-cred").unwrap();
        let (cert, key, der) = test_certificate(false);
        let combined = certificate_credential(RawCertificate {
            certificate: Some(scratch.write("both.pem", format!("{key}{cert}")).unwrap()),
            ..RawCertificate::default()
        });
        let a = combined.assertion(&token_url(), "app").await.unwrap();
        assert_eq!(
            decode(a.split('.').next().unwrap())["x5t#S256"],
            x5t_s256(&der)
        );

        let env = |name: &str| match name {
            "CERT_PEM" => Some(cert.clone()),
            "KEY_PEM" => Some(key.clone()),
            _ => None,
        };
        let raw = RawCertificate {
            certificate_pem_env: Some("CERT_PEM".into()),
            private_key_pem_env: Some("KEY_PEM".into()),
            ..RawCertificate::default()
        };
        let credential = Credential::certificate_with_env(raw, "c", &env).unwrap();
        // The key read from the variable never shows in debug output.
        let debug = format!("{credential:?}");
        assert!(
            debug.contains("KEY_PEM") && !debug.contains("PRIVATE"),
            "{debug}"
        );
        let Credential::Certificate(inner) = credential else {
            panic!("not a certificate credential")
        };
        assert!(inner.assertion(&token_url(), "app").await.is_ok());
    }

    #[test]
    fn certificate_config_errors_name_the_key() {
        let scratch = Scratch::new("dg-cred").unwrap();
        let (cert, key, _) = test_certificate(false);
        let (other_cert, _, _) = test_certificate(false);
        let (expired_cert, expired_key, _) = test_certificate(true);
        let err = |raw: RawCertificate| {
            Credential::certificate_with_env(raw, "dynamics.certificate", &|_| None)
                .unwrap_err()
                .into_parts()
        };

        let (k, m) = err(files(&scratch, &other_cert, &key));
        assert_eq!(k, "dynamics.certificate.private_key");
        assert!(m.contains("does not belong"), "{m}");

        let (k, m) = err(RawCertificate {
            certificate: Some(scratch.join("missing.pem")),
            private_key: Some(scratch.write("k.pem", &key).unwrap()),
            ..RawCertificate::default()
        });
        assert_eq!(k, "dynamics.certificate.certificate");
        assert!(m.contains("missing.pem"), "{m}");

        let (k, _) = err(RawCertificate::default());
        assert_eq!(k, "dynamics.certificate.certificate");

        let (k, m) = err(RawCertificate {
            certificate_pem_env: Some("NOT_SET_ANYWHERE".into()),
            ..RawCertificate::default()
        });
        assert_eq!(k, "dynamics.certificate.certificate_pem_env");
        assert!(m.contains("NOT_SET_ANYWHERE"));

        let (k, m) = err(files(
            &scratch,
            &cert,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        ));
        assert_eq!(k, "dynamics.certificate.private_key");
        assert!(m.contains("encrypted"), "{m}");

        let (k, m) = err(files(&scratch, "not a pem", &key));
        assert_eq!(k, "dynamics.certificate.certificate");
        assert!(m.contains("CERTIFICATE"), "{m}");

        let (k, m) = err(files(&scratch, &expired_cert, &expired_key));
        assert_eq!(k, "dynamics.certificate.certificate");
        assert!(m.contains("expired at 2002-01-01T00:00:00Z"), "{m}");

        // Whatever the error, no key material in it.
        let (_, m) = err(files(&scratch, &key, &cert));
        assert!(!m.contains(key.lines().nth(1).unwrap()), "{m}");
    }

    #[tokio::test]
    async fn the_certificate_is_checked_from_the_loaded_files_and_rotated_from_disk() {
        let (cert, key, der) = test_certificate(false);
        let absent = PathBuf::from("/nonexistent/dynamics-gateway-test/combined.pem");
        let mut files = LoadedFiles::default();
        files.insert(absent.clone(), format!("{cert}{key}"));
        let raw = RawCertificate {
            certificate: Some(absent.clone()),
            ..RawCertificate::default()
        };
        let credential =
            Credential::certificate_loaded(raw.clone(), "c", &|_| None, &files).unwrap();
        assert!(
            credential.describe().contains(&x5t_s256(&der)),
            "{}",
            credential.describe()
        );
        // Each assertion reads the file again (rotation), and it is not on disk.
        let Credential::Certificate(inner) = &credential else {
            panic!("not a certificate credential")
        };
        let err = inner.assertion(&token_url(), "app-1").await.unwrap_err();
        assert!(matches!(err, CredentialError::Read { .. }), "{err}");

        let (k, m) = Credential::certificate_loaded(raw, "c", &|_| None, &LoadedFiles::default())
            .unwrap_err()
            .into_parts();
        assert_eq!(k, "c.certificate");
        assert!(m.contains("combined.pem"), "{m}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let yaml = "certificate: a.pem\nprivate_key: b.pem\nalgoritm: RS256\n";
        assert!(serde_norway::from_str::<RawCertificate>(yaml).is_err());
        let raw: RawCertificate =
            serde_norway::from_str("certificate: a.pem\nalgorithm: RS256\n").unwrap();
        assert_eq!(raw.algorithm, SigningAlgorithm::RS256);
        let raw: RawManagedIdentity = serde_norway::from_str("{}").unwrap();
        assert_eq!(raw.endpoint, DEFAULT_IMDS_ENDPOINT);
        assert!(serde_norway::from_str::<RawWorkloadIdentity>("{}").is_ok());
        assert!(serde_norway::from_str::<RawWorkloadIdentity>("tokenfile: x").is_err());
    }

    #[tokio::test]
    async fn workload_identity_reads_the_token_file_for_every_request() {
        let scratch = Scratch::new("dg-cred").unwrap();
        let file = scratch.write("token", "first.jwt.sig\n").unwrap();
        let env = |name: &str| match name {
            "AZURE_FEDERATED_TOKEN_FILE" => Some(file.display().to_string()),
            "AZURE_CLIENT_ID" => Some("wi-client".to_owned()),
            "AZURE_TENANT_ID" => Some("webhook-tenant".to_owned()),
            "AZURE_AUTHORITY_HOST" => Some("https://login.microsoftonline.com/".to_owned()),
            _ => None,
        };
        let credential =
            Credential::workload_identity_with_env(RawWorkloadIdentity::default(), "wi", &env)
                .unwrap();
        let Credential::WorkloadIdentity(inner) = &credential else {
            panic!("not workload identity")
        };
        assert_eq!(inner.read_token().await.unwrap(), "first.jwt.sig");
        scratch.write("token", "second.jwt.sig").unwrap();
        assert_eq!(inner.read_token().await.unwrap(), "second.jwt.sig");

        assert_eq!(credential.default_client_id(), Some("wi-client"));
        assert_eq!(
            credential.default_token_url(None).unwrap().as_str(),
            "https://login.microsoftonline.com/webhook-tenant/oauth2/v2.0/token"
        );
        // The environment's tenant beats the webhook's; the block's beats both.
        assert_eq!(
            credential
                .default_token_url(Some("customer"))
                .unwrap()
                .as_str(),
            "https://login.microsoftonline.com/customer/oauth2/v2.0/token"
        );
        let raw = RawWorkloadIdentity {
            tenant_id: Some("pinned".into()),
            authority_host: Some("https://login.microsoftonline.us".into()),
            ..RawWorkloadIdentity::default()
        };
        let pinned = Credential::workload_identity_with_env(raw, "wi", &env).unwrap();
        assert_eq!(
            pinned.default_token_url(Some("customer")).unwrap().as_str(),
            "https://login.microsoftonline.us/pinned/oauth2/v2.0/token"
        );

        std::fs::remove_file(&file).unwrap();
        let err = inner.read_token().await.unwrap_err();
        assert!(matches!(err, CredentialError::Read { .. }), "{err}");
    }

    #[test]
    fn workload_identity_config_errors_name_the_key() {
        let scratch = Scratch::new("dg-cred").unwrap();
        let (k, m) = Credential::workload_identity_with_env(
            RawWorkloadIdentity::default(),
            "envs.a.workload_identity",
            &|_| None,
        )
        .unwrap_err()
        .into_parts();
        assert_eq!(k, "envs.a.workload_identity.token_file");
        assert!(m.contains("AZURE_FEDERATED_TOKEN_FILE"), "{m}");

        let raw = RawWorkloadIdentity {
            token_file: Some(scratch.join("absent")),
            ..RawWorkloadIdentity::default()
        };
        let (k, _) = Credential::workload_identity_with_env(raw, "wi", &|_| None)
            .unwrap_err()
            .into_parts();
        assert_eq!(k, "wi.token_file");

        let raw = RawWorkloadIdentity {
            token_file: Some(scratch.write("t", "jwt").unwrap()),
            authority_host: Some("login.microsoftonline.com".into()),
            ..RawWorkloadIdentity::default()
        };
        let (k, _) = Credential::workload_identity_with_env(raw, "wi", &|_| None)
            .unwrap_err()
            .into_parts();
        assert_eq!(k, "wi.authority_host");
    }

    #[test]
    fn managed_identity_config() {
        let (k, _) = Credential::managed_identity(
            RawManagedIdentity {
                endpoint: "169.254.169.254/metadata".into(),
                client_id: None,
            },
            "mi",
        )
        .unwrap_err()
        .into_parts();
        assert_eq!(k, "mi.endpoint");
        let (k, _) = Credential::managed_identity(
            RawManagedIdentity {
                client_id: Some(" ".into()),
                ..RawManagedIdentity::default()
            },
            "mi",
        )
        .unwrap_err()
        .into_parts();
        assert_eq!(k, "mi.client_id");
        let mi = Credential::managed_identity(RawManagedIdentity::default(), "mi").unwrap();
        assert_eq!(mi.kind(), "managed_identity");
        assert!(mi.describe().contains("system-assigned"));
        assert_eq!(mi.default_client_id(), None);
    }

    #[test]
    fn client_secret_is_never_shown() {
        let c =
            Credential::client_secret(Secret::new("hunter2"), "dynamics.client_secret").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.describe(), "client_secret");
        let (k, _) = Credential::client_secret(Secret::new(" "), "dynamics.client_secret")
            .unwrap_err()
            .into_parts();
        assert_eq!(k, "dynamics.client_secret");
    }

    #[test]
    fn certificates_are_read_for_their_key_and_expiry_and_nothing_else_passes() {
        let (_, _, der) = test_certificate(false);
        let info = parse_certificate(&der).unwrap();
        assert!(info.not_after > unix_now());
        let (_, _, expired) = test_certificate(true);
        assert_eq!(
            civil_time(parse_certificate(&expired).unwrap().not_after),
            "2002-01-01T00:00:00Z"
        );
        assert!(aws_lc_rs::rsa::PublicKey::from_der(info.spki).is_ok());
        assert!(parse_certificate(b"\x30\x03\x02\x01\x00").is_none());
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(
            parse_certificate(&trailing).is_none(),
            "bytes after the certificate"
        );
        assert_eq!(civil_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(civil_time(2_524_607_999), "2049-12-31T23:59:59Z");
        assert!(civil_time(u64::MAX).contains("seconds after 1970"));
    }
}
