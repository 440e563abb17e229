//! The one outbound HTTP client setup, shared by webhooks and the API client: https through
//! rustls with ring (the crypto libp2p already links), and never a proxy, since meshbus talks
//! to its own peers and to the webhooks it was told about.

/// A fresh HTTP client.
pub fn build() -> reqwest::Client {
    // Fails only when a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match reqwest::Client::builder().no_proxy().build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot configure the HTTP client; using the defaults");
            reqwest::Client::new()
        }
    }
}

/// The innermost cause of a request error: "Connection refused (os error 111)" says more
/// than reqwest's "error sending request".
pub fn innermost(e: &reqwest::Error) -> String {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason = s.to_string();
        source = s.source();
    }
    reason
}
