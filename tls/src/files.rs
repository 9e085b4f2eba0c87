//! Writing and reading PEM files. Writes never replace an existing file, and private keys are
//! created readable by their owner only, from the first byte on.

use std::io::{self, Write as _};
use std::path::Path;

use fs_err::os::unix::fs::OpenOptionsExt as _;

use crate::error::CertError;

/// Mode of private key files: the owner may read and write, nobody else may do anything.
pub(crate) const KEY_MODE: u32 = 0o600;

/// Mode of certificate files: they are public, anyone may read them.
pub(crate) const CERT_MODE: u32 = 0o644;

/// Reads a whole PEM file.
pub(crate) fn read(path: &Path) -> Result<String, CertError> {
    fs_err::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes a certificate and its key as a pair: neither is written if either exists, and the key is
/// removed again if the certificate cannot be written, so no half pair is left behind.
pub(crate) fn write_pair(
    cert_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key_pem: &str,
) -> Result<(), CertError> {
    for path in [cert_path, key_path] {
        refuse_existing(path)?;
    }
    write_new(key_path, key_pem, KEY_MODE)?;
    if let Err(error) = write_new(cert_path, cert_pem, CERT_MODE) {
        // Best effort: the certificate's error is the one worth reporting.
        let _ = fs_err::remove_file(key_path);
        return Err(error);
    }
    Ok(())
}

/// Fails with [`CertError::AlreadyExists`] if anything (even a dangling symlink) is at `path`.
fn refuse_existing(path: &Path) -> Result<(), CertError> {
    match fs_err::symlink_metadata(path) {
        Ok(_) => Err(CertError::AlreadyExists(path.to_owned())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CertError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates `path` with `mode` (the mode is applied at creation, so a key is never briefly
/// world-readable), writes `contents` and syncs it to disk.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let write_error = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                CertError::AlreadyExists(path.to_owned())
            } else {
                write_error(source)
            }
        })?;
    file.write_all(contents.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs_err::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn pair_is_written_with_modes_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("x.pem");
        let key = dir.path().join("x.key");
        write_pair(&cert, "cert", &key, "key").unwrap();
        assert_eq!(fs_err::read_to_string(&cert).unwrap(), "cert");
        assert_eq!(fs_err::read_to_string(&key).unwrap(), "key");
        assert_eq!(mode(&key), KEY_MODE);
        assert_eq!(mode(&cert) & 0o600, 0o600);

        assert!(matches!(
            write_pair(&cert, "other", &key, "other"),
            Err(CertError::AlreadyExists(path)) if path == cert
        ));
        assert_eq!(fs_err::read_to_string(&key).unwrap(), "key");
    }

    #[test]
    fn an_existing_certificate_blocks_the_key_too() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("x.pem");
        let key = dir.path().join("x.key");
        fs_err::write(&cert, "old").unwrap();
        assert!(matches!(
            write_pair(&cert, "new", &key, "new"),
            Err(CertError::AlreadyExists(path)) if path == cert
        ));
        assert!(!key.exists());
        assert_eq!(fs_err::read_to_string(&cert).unwrap(), "old");
    }

    #[test]
    fn a_missing_directory_is_a_typed_write_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(matches!(
            write_pair(&missing.join("x.pem"), "c", &missing.join("x.key"), "k"),
            Err(CertError::Write { path, .. }) if path == missing.join("x.key")
        ));
        assert!(matches!(
            read(&missing.join("x.pem")),
            Err(CertError::Read { .. })
        ));
    }
}
