//! fedpeft's small HTTP/1.1 servers — `edge-client serve` and the aggregator's monitor — on
//! hyper: binding (loopback unless told otherwise, and a warning when not), the accept loop
//! with a header timeout, bearer tokens compared in constant time, request bodies read up to a
//! limit, and JSON replies. Routes are the servers' own.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

pub use hyper;

/// Every reply's body: a whole one ([`full`]) or a stream (server-sent events).
pub type Body = BoxBody<Bytes, Infallible>;
/// A reply.
pub type Reply = Response<Body>;
/// A request handler: the request in, the reply out.
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// A request's headers must arrive within this (a stalled client cannot hold a connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` for `what` (logged); warns when it is not a loopback address, more loudly
/// without a token.
pub async fn bind(addr: SocketAddr, token: bool, what: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} for {what}"))?;
    if !addr.ip().is_loopback() {
        if token {
            tracing::warn!(%addr, "{what} beyond this machine (a bearer token is required)");
        } else {
            tracing::warn!(%addr, "{what} beyond this machine with no token: anyone who can reach it can use it");
        }
    }
    Ok(listener)
}

/// Answers requests on `listener` with `handler`, each connection on a task of its own, until
/// `shutdown` resolves.
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let reply = handler(req);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A reply with `body` and `content_type`.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A JSON reply.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    reply(status, "application/json", value.to_string() + "\n")
}

/// A JSON `{"error": message}` reply.
pub fn error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    json(status, &serde_json::json!({ "error": message.to_string() }))
}

/// 401 unless the request carries `Authorization: Bearer <token>` (compared in constant time).
pub fn check_token<B>(req: &Request<B>, token: Option<&str>) -> Result<(), Box<Reply>> {
    use subtle::ConstantTimeEq;
    let Some(token) = token else { return Ok(()) };
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes())));
    if ok {
        return Ok(());
    }
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "this server needs `Authorization: Bearer <token>`",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Err(Box::new(r))
}

/// 405 naming the methods `path` takes (`Allow` header), unless the request's is one of them
/// (HEAD counts as GET).
pub fn check_method<B>(req: &Request<B>, allowed: &[Method]) -> Result<(), Box<Reply>> {
    let m = req.method();
    if allowed.contains(m) || (*m == Method::HEAD && allowed.contains(&Method::GET)) {
        return Ok(());
    }
    let mut names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    if allowed.contains(&Method::GET) {
        names.push("HEAD");
    }
    let list = names.join(", ");
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} takes {list} only", req.uri().path()),
    );
    if let Ok(v) = HeaderValue::from_str(&list) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    Err(Box::new(r))
}

/// The request's body, at most `limit` bytes: a larger one is refused with 413, from its
/// `Content-Length` before it is read or as it streams past the limit.
pub async fn body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Box<Reply>> {
    let too_large = || {
        Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the {limit}-byte limit"),
        ))
    };
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > limit as u64)
    {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("reading the body: {e}"),
        ))),
    }
}

/// The bearer token in `path`'s first line (at least 16 characters).
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 {
        anyhow::bail!(
            "{}: the token's first line must hold at least 16 characters",
            path.display()
        );
    }
    Ok(token)
}
