//! The files a configuration names (client-certificate PEMs, the workload identity token
//! file, `access.metadata_file`), read in one place before validation. Validation then
//! works on bytes and never touches the disk, so it is the same code whether the bytes
//! came from a file or a test, and a reload does its blocking reads in one step.
//!
//! A file that cannot be read is not an error yet: its error is kept, and becomes one,
//! naming the key that asked for it, only if validation needs the file. A config that is
//! wrong in some other way then reports that, as it did when each section read its own.
//!
//! Files the gateway re-reads while running on purpose (a rotated certificate, the
//! projected token kubelet refreshes, `server.tls`'s reloading pair) are read where they
//! are used, not here.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use super::raw::RawConfig;
use super::{invalid, ConfigError};
use crate::access::RawAccess;
use crate::upstream::credential::RawCertificate;

/// What each named file held when it was read, or why it could not be read.
#[derive(Debug, Default)]
pub(crate) struct LoadedFiles {
    files: HashMap<PathBuf, Result<Vec<u8>, io::Error>>,
}

impl LoadedFiles {
    /// Reads each path once (a combined certificate and key PEM is named twice).
    pub(crate) fn read<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Self {
        let mut loaded = Self::default();
        for path in paths {
            if !loaded.files.contains_key(path) {
                loaded.files.insert(path.to_owned(), std::fs::read(path));
            }
        }
        loaded
    }

    /// Reads every file `raw` names; `env` resolves the variables a credential falls back
    /// on (`$AZURE_FEDERATED_TOKEN_FILE`), as validation will.
    pub(super) fn of_config(raw: &RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Self {
        let mut paths: Vec<PathBuf> = Vec::new();
        let d = &raw.dynamics;
        let organisations = std::iter::once((&d.certificate, &d.workload_identity)).chain(
            d.environments
                .iter()
                .flatten()
                .map(|e| (&e.certificate, &e.workload_identity)),
        );
        for (certificate, workload_identity) in organisations {
            if let Some(c) = certificate {
                paths.extend(certificate_paths(c).map(Path::to_owned));
            }
            if let Some(w) = workload_identity {
                paths.extend(w.token_file_path(env));
            }
        }
        if let Some(access) = &raw.access {
            paths.extend(access_paths(access).map(Path::to_owned));
        }
        Self::read(paths.iter().map(PathBuf::as_path))
    }

    /// Gives `path` these contents without reading it (tests of validation).
    #[cfg(test)]
    pub(crate) fn insert(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) {
        self.files.insert(path.into(), Ok(contents.into()));
    }

    /// What `path` held, or the sentence saying why it cannot be had (`cannot read …`).
    pub(crate) fn contents(&self, path: &Path) -> Result<&[u8], String> {
        match self.files.get(path) {
            Some(Ok(bytes)) => Ok(bytes),
            Some(Err(e)) => Err(format!("cannot read {}: {e}", path.display())),
            // Every path validation asks for is collected above; one that is not is a
            // bug here, reported like an unreadable file rather than read behind its back.
            None => Err(format!(
                "cannot read {}: it was not read with the configuration",
                path.display()
            )),
        }
    }

    /// What `path` held, or an error naming `key`, the path and why.
    pub(crate) fn get(&self, key: &str, path: &Path) -> Result<&[u8], ConfigError> {
        self.contents(path).map_err(|message| invalid(key, message))
    }
}

/// The files a `certificate:` block names (a combined PEM may name only one).
pub(crate) fn certificate_paths(raw: &RawCertificate) -> impl Iterator<Item = &Path> {
    [&raw.certificate, &raw.private_key]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
}

/// The file an `access` section names.
pub(crate) fn access_paths(raw: &RawAccess) -> impl Iterator<Item = &Path> {
    raw.metadata_file.as_deref().into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn every_file_the_config_names_is_read_and_only_those() {
        let yaml = r#"
inbound:
  issuers:
    - issuer: https://login.microsoftonline.com/t/v2.0
      audiences: [api://dynamics-gateway]
      tenants: [t]
dynamics:
  routing: { by: path_prefix }
  environments:
    - name: a
      url: https://a.crm.dynamics.com
      tenant_id: t
      client_id: c
      certificate: { certificate: /absent/a.pem, private_key: /absent/a.key }
    - name: b
      url: https://b.crm.dynamics.com
      tenant_id: t
      client_id: c
      certificate: { certificate: /absent/a.pem }
    - name: c
      url: https://c.crm.dynamics.com
      tenant_id: t
      workload_identity: {}
    - name: d
      url: https://d.crm.dynamics.com
      tenant_id: t
      client_id: c
      certificate: { certificate_pem_env: PEM }
access:
  metadata_file: /absent/csdl.xml
  default: allow
"#;
        let raw = Config::parse(yaml, &|_| None).unwrap();
        let env = |name: &str| {
            (name == "AZURE_FEDERATED_TOKEN_FILE").then(|| " /absent/token ".to_owned())
        };
        let files = LoadedFiles::of_config(&raw, &env);
        let mut read: Vec<_> = files
            .files
            .keys()
            .map(|p| p.display().to_string())
            .collect();
        read.sort();
        assert_eq!(
            read,
            [
                "/absent/a.key",
                "/absent/a.pem",
                "/absent/csdl.xml",
                "/absent/token"
            ]
        );
        assert!(files.files.values().all(Result::is_err));
    }

    #[test]
    fn a_path_not_read_with_the_config_is_an_error_and_not_a_read() {
        let here = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        let (key, message) = LoadedFiles::default()
            .get("k.file", here)
            .unwrap_err()
            .into_parts();
        assert_eq!(key, "k.file");
        assert!(
            message.contains("not read with the configuration"),
            "{message}"
        );
        assert!(LoadedFiles::read([here]).get("k.file", here).is_ok());
    }
}
