//! A stand-in Schema Registry for the demo and the tests (`triage registry`): the REST subset of
//! Confluent's API that Confluent's serializers and triage use, written from Confluent's API
//! reference, in memory. NOT a registry to run in production: no compatibility checks, no
//! persistence, no cluster. No Confluent-compatible registry installs from the registries this
//! project may use (Karapace is not on PyPI and keeps its schemas in Kafka), hence this.
//!
//! - `POST /subjects/{subject}/versions` registers `{"schema", "schemaType", "references"}`
//!   (the same schema under the same subject keeps its version; the same schema anywhere keeps
//!   its id) -> `{"id"}`;
//! - `POST /subjects/{subject}` looks a schema up under a subject;
//! - `GET /schemas/ids/{id}`, `GET /subjects`, `GET /subjects/{subject}/versions`,
//!   `GET /subjects/{subject}/versions/{version|latest}`;
//! - `DELETE /subjects/{subject}[/versions/{version}]` (soft: ids stay readable, as in
//!   Confluent's), `?permanent=true` (the ids go too);
//! - errors as Confluent's: `{"error_code": 40401, "message": ...}` with the HTTP status;
//! - optional basic auth (`user:password`) or a bearer token: 401 without it;
//! - optionally kept in a JSON file, written after every change, so a restarted (or killed)
//!   registry still knows its ids, as a real one does.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Stored {
    schema: String,
    kind: String,
    references: Value,
    /// Removed for good (`permanent=true`): the id reads as unknown.
    gone: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Version {
    version: u32,
    id: u32,
    deleted: bool,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct State {
    ids: BTreeMap<u32, Stored>,
    subjects: BTreeMap<String, Vec<Version>>,
}

/// Who may call it.
#[derive(Debug, Clone, Default)]
pub enum Access {
    #[default]
    Open,
    /// `user:password`.
    Basic(String),
    Bearer(String),
}

/// A running stand-in registry; stops when dropped.
pub struct LocalSchemaRegistry {
    pub address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl LocalSchemaRegistry {
    /// Serve on `address` (`127.0.0.1:0`: any free port), keeping the schemas in `data` (a
    /// JSON file, read at start if it exists) when given, else in memory only.
    pub async fn start(address: &str, access: Access, data: Option<PathBuf>) -> std::io::Result<Self> {
        let initial = match &data {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)?;
                serde_json::from_str(&text)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?
            }
            _ => State::default(),
        };
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let state = Arc::new(Mutex::new(initial));
        let access = Arc::new(access);
        let data = Arc::new(data);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (state, access, data) = (state.clone(), access.clone(), data.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (state, access, data) = (state.clone(), access.clone(), data.clone());
                        async move {
                            // Registering and deleting change the state; look-ups (POST /subjects/{s}) do not.
                            let changes = (request.method() == Method::POST
                                && request.uri().path().trim_end_matches('/').ends_with("/versions"))
                                || request.method() == Method::DELETE;
                            let mut response = handle(request, &state, &access).await;
                            if changes && response.status().is_success() {
                                if let Some(path) = data.as_ref() {
                                    if let Err(e) = save(&state, path) {
                                        response = error(StatusCode::INTERNAL_SERVER_ERROR, 50001, &format!("cannot keep the change: {e}"));
                                    }
                                }
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Ok(LocalSchemaRegistry { address, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

/// Write the state to `path` whole (a temporary file renamed over it: a kill mid-write leaves
/// the previous state, never half of one).
fn save(state: &Mutex<State>, path: &std::path::Path) -> std::io::Result<()> {
    let text = {
        let state = state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        serde_json::to_string(&*state).map_err(std::io::Error::other)?
    };
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

impl Drop for LocalSchemaRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/vnd.schemaregistry.v1+json"));
    response
}

fn error(status: StatusCode, code: u32, message: &str) -> Response<Full<Bytes>> {
    reply(status, json!({"error_code": code, "message": message}))
}

fn allowed(request: &Request<Incoming>, access: &Access) -> bool {
    let given = request.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    match access {
        Access::Open => true,
        Access::Basic(pair) => given == format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)),
        Access::Bearer(token) => given == format!("Bearer {token}"),
    }
}

fn decode_segment(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(request: Request<Incoming>, state: &Mutex<State>, access: &Access) -> Response<Full<Bytes>> {
    if !allowed(&request, access) {
        return error(StatusCode::UNAUTHORIZED, 40101, "Unauthorized");
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let permanent = query.split('&').any(|kv| kv == "permanent=true");
    let body: Value = match request.into_body().collect().await {
        Ok(collected) => serde_json::from_slice(&collected.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let segments: Vec<String> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).map(decode_segment).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let Ok(mut state) = state.lock() else { return error(StatusCode::INTERNAL_SERVER_ERROR, 50001, "state lost") };
    match (&method, segments.as_slice()) {
        (&Method::GET, ["schemas", "ids", id]) => match id.parse::<u32>().ok().and_then(|id| state.ids.get(&id).filter(|s| !s.gone)) {
            Some(s) => reply(StatusCode::OK, schema_body(s, None)),
            None => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
        },
        (&Method::GET, ["subjects"]) => {
            let live: Vec<&String> = state.subjects.iter().filter(|(_, v)| v.iter().any(|v| !v.deleted)).map(|(s, _)| s).collect();
            reply(StatusCode::OK, json!(live))
        }
        (&Method::GET, ["subjects", subject, "versions"]) => match state.subjects.get(*subject) {
            Some(versions) => reply(StatusCode::OK, json!(versions.iter().filter(|v| !v.deleted).map(|v| v.version).collect::<Vec<_>>())),
            None => error(StatusCode::NOT_FOUND, 40401, "Subject not found"),
        },
        (&Method::GET, ["subjects", subject, "versions", version]) => {
            let Some(versions) = state.subjects.get(*subject) else { return error(StatusCode::NOT_FOUND, 40401, "Subject not found") };
            let live: Vec<&Version> = versions.iter().filter(|v| !v.deleted).collect();
            let found = if *version == "latest" || *version == "-1" {
                live.last().copied()
            } else {
                version.parse::<u32>().ok().and_then(|n| live.iter().copied().find(|v| v.version == n))
            };
            match found.and_then(|v| state.ids.get(&v.id).map(|s| (v, s))) {
                Some((v, s)) => {
                    let mut body = schema_body(s, Some(v.id));
                    body["subject"] = json!(subject);
                    body["version"] = json!(v.version);
                    reply(StatusCode::OK, body)
                }
                None => error(StatusCode::NOT_FOUND, 40402, "Version not found"),
            }
        }
        (&Method::POST, ["subjects", subject, "versions"]) => {
            let Some(stored) = stored_of(&body) else { return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema") };
            let id = match state.ids.iter().find(|(_, s)| !s.gone && **s == stored) {
                Some((&id, _)) => id,
                None => {
                    let id = state.ids.keys().last().map_or(1, |k| k + 1);
                    state.ids.insert(id, stored);
                    id
                }
            };
            let versions = state.subjects.entry(subject.to_string()).or_default();
            if !versions.iter().any(|v| v.id == id && !v.deleted) {
                let version = versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
                versions.push(Version { version, id, deleted: false });
            }
            reply(StatusCode::OK, json!({"id": id}))
        }
        (&Method::POST, ["subjects", subject]) => {
            let Some(stored) = stored_of(&body) else { return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema") };
            let Some(versions) = state.subjects.get(*subject) else { return error(StatusCode::NOT_FOUND, 40401, "Subject not found") };
            let found = versions.iter().filter(|v| !v.deleted).find(|v| state.ids.get(&v.id) == Some(&stored));
            match found {
                Some(v) => {
                    let mut body = schema_body(&stored, Some(v.id));
                    body["subject"] = json!(subject);
                    body["version"] = json!(v.version);
                    reply(StatusCode::OK, body)
                }
                None => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
            }
        }
        (&Method::DELETE, ["subjects", subject]) => delete(&mut state, subject, None, permanent),
        (&Method::DELETE, ["subjects", subject, "versions", version]) => delete(&mut state, subject, Some(version), permanent),
        (&Method::GET, ["config"]) | (&Method::GET, ["config", _]) => reply(StatusCode::OK, json!({"compatibilityLevel": "NONE"})),
        _ => error(StatusCode::NOT_FOUND, 404, "Not found"),
    }
}

fn stored_of(body: &Value) -> Option<Stored> {
    let schema = body["schema"].as_str()?.to_string();
    let kind = body["schemaType"].as_str().unwrap_or("AVRO").to_string();
    let references = match &body["references"] {
        Value::Array(a) if !a.is_empty() => Value::Array(a.clone()),
        _ => Value::Array(Vec::new()),
    };
    Some(Stored { schema, kind, references, gone: false })
}

fn schema_body(s: &Stored, id: Option<u32>) -> Value {
    let mut body = json!({"schema": s.schema});
    if s.kind != "AVRO" {
        body["schemaType"] = json!(s.kind);
    }
    if s.references.as_array().is_some_and(|a| !a.is_empty()) {
        body["references"] = s.references.clone();
    }
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    body
}

fn delete(state: &mut State, subject: &str, version: Option<&str>, permanent: bool) -> Response<Full<Bytes>> {
    let Some(versions) = state.subjects.get_mut(subject) else { return error(StatusCode::NOT_FOUND, 40401, "Subject not found") };
    let mut removed = Vec::new();
    for v in versions.iter_mut() {
        let hit = match version {
            None => true,
            Some("latest") => false,
            Some(n) => n.parse::<u32>().ok() == Some(v.version),
        };
        if hit {
            v.deleted = true;
            removed.push((v.version, v.id));
        }
    }
    if version == Some("latest") {
        if let Some(v) = versions.iter_mut().rev().find(|v| !v.deleted) {
            v.deleted = true;
            removed.push((v.version, v.id));
        }
    }
    if permanent {
        for (_, id) in &removed {
            if let Some(s) = state.ids.get_mut(id) {
                s.gone = true;
            }
        }
    }
    if removed.is_empty() {
        return error(StatusCode::NOT_FOUND, 40402, "Version not found");
    }
    let numbers: Vec<u32> = removed.iter().map(|(v, _)| *v).collect();
    reply(StatusCode::OK, if version.is_some() { json!(numbers[0]) } else { json!(numbers) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_in_subjects_are_decoded() {
        assert_eq!(decode_segment("a%2Fb.proto"), "a/b.proto");
        assert_eq!(decode_segment("plain-value"), "plain-value");
        assert_eq!(decode_segment("bad%zz"), "bad%zz");
        assert_eq!(decode_segment("end%2"), "end%2");
    }
}
