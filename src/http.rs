//! One way to make HTTP(S) requests to the services triage talks to over HTTP (the schema
//! registry: GETs by the worker, a POST to register by `triage produce`):
//! hyper over native TLS (the stack the ClickHouse client already builds), an optional extra CA
//! for a private registry, a deadline per request and a cap on the body read.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use hyper::{Request, Uri};
use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum HttpError {
    /// No answer: refused, reset, DNS, TLS handshake, or past the deadline.
    #[error("{0}")]
    Transport(String),
    #[error("the reply is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Setup(String),
}

/// HTTP and HTTPS over native TLS, trusting the system's CAs and those in `ca_pem`.
pub fn https_connector(ca_pem: Option<&Path>, connect_timeout: Duration) -> Result<HttpsConnector<HttpConnector>, HttpError> {
    let mut tls = native_tls::TlsConnector::builder();
    if let Some(path) = ca_pem {
        let pem = std::fs::read(path).map_err(|e| HttpError::Setup(format!("CA file {}: {e}", path.display())))?;
        let certificate =
            native_tls::Certificate::from_pem(&pem).map_err(|e| HttpError::Setup(format!("CA file {}: {e}", path.display())))?;
        tls.add_root_certificate(certificate);
    }
    let tls = tls.build().map_err(|e| HttpError::Setup(format!("TLS: {e}")))?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    Ok(HttpsConnector::from((http, tokio_native_tls::TlsConnector::from(tls))))
}

/// An HTTP(S) client; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    max_bytes: usize,
}

/// A reply: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl HttpClient {
    /// `ca_pem`: a PEM file of extra CA certificates trusted besides the system's.
    pub fn new(ca_pem: Option<&Path>, timeout: Duration, max_bytes: usize) -> Result<Self, HttpError> {
        let https = https_connector(ca_pem, timeout)?;
        Ok(HttpClient { client: Client::builder(TokioExecutor::new()).build(https), timeout, max_bytes })
    }

    /// GET `uri` with `headers`, within the deadline; the body read up to the cap.
    pub async fn get(&self, uri: &Uri, headers: &[(&str, HeaderValue)]) -> Result<Reply, HttpError> {
        self.send(Request::get(uri.clone()), headers, Bytes::new()).await
    }

    /// POST `body` to `uri` with `headers`, within the deadline.
    pub async fn post(&self, uri: &Uri, headers: &[(&str, HeaderValue)], body: Bytes) -> Result<Reply, HttpError> {
        self.send(Request::post(uri.clone()), headers, body).await
    }

    async fn send(
        &self,
        mut request: hyper::http::request::Builder,
        headers: &[(&str, HeaderValue)],
        body: Bytes,
    ) -> Result<Reply, HttpError> {
        for (name, value) in headers {
            request = request.header(*name, value.clone());
        }
        let request = request.body(Full::new(body)).map_err(|e| HttpError::Setup(e.to_string()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| HttpError::Transport(transport_error(&e)))?;
            let status = response.status().as_u16();
            let body = http_body_util::Limited::new(response.into_body(), self.max_bytes).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    HttpError::TooLarge(self.max_bytes)
                } else {
                    HttpError::Transport(e.to_string())
                }
            })?;
            Ok(Reply { status, body: body.to_bytes() })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(HttpError::Transport(format!("no answer within {} ms", self.timeout.as_millis()))))
    }
}

/// The innermost cause of a client error: "connection refused", not "client error (Connect)".
fn transport_error(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text = inner.to_string();
        source = inner.source();
    }
    text
}
