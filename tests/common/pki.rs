//! Certificates made for a test (rcgen), as PEM files in a temp dir: a CA
//! (`ca.pem`), a server certificate it signed for 127.0.0.1 (`server.pem`,
//! `server.key`), a client certificate (`client.pem`, `client.key`), and
//! another CA that signed nothing (`other-ca.pem`).

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

pub struct Pki {
    pub dir: tempfile::TempDir,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, text: String| {
            std::fs::write(dir.path().join(name), text).expect("write a PEM file")
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = ca_params("ferry test CA")
            .self_signed(&ca_key)
            .expect("CA certificate");
        write("ca.pem", ca.pem());
        for (name, usage) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &ca, &ca_key).expect("certificate");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        let other_key = KeyPair::generate().expect("CA key");
        let other = ca_params("another CA")
            .self_signed(&other_key)
            .expect("CA certificate");
        write("other-ca.pem", other.pem());
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn file(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8 path").to_string()
    }
}
