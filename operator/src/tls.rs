//! The process-wide TLS crypto provider: rustls is built with both `ring`
//! (kube) and `aws-lc-rs` (object_store's HTTP client), and then cannot pick
//! one itself; the first https connection (the Kubernetes API, an S3
//! endpoint) would panic. Each binary installs `ring` at start.

/// Installs rustls' `ring` provider for this process (a no-op when one is
/// installed already).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_provider_is_installed() {
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        super::install_crypto_provider();
    }
}
