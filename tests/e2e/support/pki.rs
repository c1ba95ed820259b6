//! A throwaway PKI for the TLS tests: a CA, server certificates for 127.0.0.1 and
//! localhost, and client certificates, written as PEM files in a temp dir.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use testkit::Scratch;

pub struct Pki {
    /// The PEM files; removed with the `Pki`.
    dir: Scratch,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Pair {
    pub certificate: String,
    pub private_key: String,
}

impl Pair {
    /// Certificate then key, as reqwest's `Identity::from_pem` wants them.
    pub fn identity_pem(&self) -> String {
        format!("{}{}", self.certificate, self.private_key)
    }
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let dir = Scratch::new(&format!("dgw-{name}")).unwrap();
        let ca = Self::authority(&format!("{name} test CA"));
        dir.write("ca.pem", ca.pem()).unwrap();
        Self { dir, ca }
    }

    fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A server certificate for 127.0.0.1 and localhost, `name` as its common name.
    pub fn server(&self, name: &str) -> Pair {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate with this common name and organisation.
    pub fn client(&self, common_name: &str, organisation: &str) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, organisation);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.ca).unwrap();
        Pair {
            certificate: certificate.pem(),
            private_key: key.serialize_pem(),
        }
    }

    /// Writes the pair as `server.pem` / `server-key.pem`, where the gateway reads them.
    pub fn install(&self, pair: &Pair) {
        // Key first, then certificate, each by rename: the gateway never reads half a file.
        for (file, text) in [
            ("server-key.pem", &pair.private_key),
            ("server.pem", &pair.certificate),
        ] {
            let temp = self.dir.write(&format!("{file}.new"), text).unwrap();
            std::fs::rename(&temp, self.path(file)).unwrap();
        }
    }

    /// The `server.tls` lines (two-space indented, under `server:`).
    pub fn server_yaml(&self, client_ca: bool, reload_interval: &str) -> String {
        let mut yaml = format!(
            "  tls:\n    certificate: {}\n    private_key: {}\n    reload_interval: {reload_interval}\n",
            self.path("server.pem").display(),
            self.path("server-key.pem").display(),
        );
        if client_ca {
            yaml.push_str(&format!(
                "    client_ca: {}\n",
                self.path("ca.pem").display()
            ));
        }
        yaml
    }
}

/// A second, unrelated CA's client certificate (not trusted by the gateway).
pub fn foreign_client(common_name: &str) -> Pair {
    let other = Pki::new("foreign");
    other.client(common_name, "Elsewhere")
}
