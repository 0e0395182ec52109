//! Certificates for the TLS tests, made by the test: a CA of its own and a server
//! certificate it signed for `localhost` and `127.0.0.1`, written as PEM files for
//! `redis-server`.

use std::path::PathBuf;

use deadpool_redis::redis::{Client, TlsCertificates};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use super::redis_server::TlsFiles;

/// A CA and the server certificate it signed, on disk while this lives.
pub struct Certificates {
    pub files: TlsFiles,
    /// The CA certificate, PEM: what a client must trust.
    pub ca_pem: String,
    dir: PathBuf,
}

impl Certificates {
    pub fn new() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server certificate");

        let dir = std::env::temp_dir().join(format!(
            "trl-tls-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).expect("certificate directory");
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write PEM");
            path
        };
        let ca_pem = ca_cert.pem();
        let files = TlsFiles {
            cert: write("server.crt", &server_cert.pem()),
            key: write("server.key", &server_key.serialize_pem()),
            ca: write("ca.crt", &ca_pem),
        };
        Self { files, ca_pem, dir }
    }

    /// A client for `url` (`rediss://…`) that trusts this CA alone.
    pub fn client(&self, url: &str) -> Client {
        client_trusting(url, &self.ca_pem)
    }
}

/// A client for `url` that trusts the CA certificate `ca_pem` alone.
pub fn client_trusting(url: &str, ca_pem: &str) -> Client {
    Client::build_with_tls(
        url,
        TlsCertificates {
            client_tls: None,
            root_cert: Some(ca_pem.as_bytes().to_vec()),
        },
    )
    .expect("TLS client")
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
