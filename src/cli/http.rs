//! The HTTP call the command line makes to a running relay or monitor: one request, plain
//! or HTTPS (verified by the CA the config names), with the bearer token, and the JSON
//! error of a refusal turned into one line for the operator.

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::tls::ClientFiles;

/// One request to a running service.
pub(super) struct Call<'a> {
    pub method: Method,
    pub url: &'a str,
    /// `Authorization: Bearer` token, if any.
    pub token: Option<&'a str>,
    /// A JSON body (empty for none).
    pub body: Vec<u8>,
    /// How `https://` URLs are verified (and the client certificate to show).
    pub tls: Option<&'a ClientFiles>,
    /// "relay" or "monitor", for messages.
    pub what: &'static str,
}

impl Call<'_> {
    /// Sends the request on a fresh runtime; the body of a 2xx answer, or why not.
    pub(super) fn send(self) -> Result<Vec<u8>, String> {
        let url = self.url;
        if url.starts_with("https://") && self.tls.is_none() {
            return Err(format!(
                "{url}: the {} serves HTTPS; name the CA its certificate is signed by in \
                 the config ({})",
                self.what,
                if self.what == "relay" {
                    "[upstream] ca_file"
                } else {
                    "[checks] ca_file"
                }
            ));
        }
        let connector =
            crate::tls::connector(http_connector(), self.tls).map_err(|e| format!("{url}: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        runtime.block_on(async {
            let client = Client::builder(TokioExecutor::new()).build(connector);
            let mut request = Request::builder()
                .method(self.method)
                .uri(url)
                .header("content-type", "application/json");
            if let Some(token) = self.token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            let request = request
                .body(Full::new(Bytes::from(self.body)))
                .map_err(|e| format!("{url}: {e}"))?;
            let response = client.request(request).await.map_err(|e| {
                format!(
                    "{url}: {} not reachable ({}); is it running?",
                    self.what,
                    error_chain(&e)
                )
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{url}: {e}"))?
                .to_bytes()
                .to_vec();
            if !status.is_success() {
                let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let message = error["error"].as_str().unwrap_or("no details");
                return Err(format!("{url}: {status}: {message}"));
            }
            Ok(body)
        })
    }
}

/// An error and its sources, `: `-separated (the client's own message alone says only
/// "client error (Connect)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    http.enforce_http(false);
    http
}
