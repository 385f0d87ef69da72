//! The HTTP/1.1 side of `edge-client serve`: routes, limits and the JSON the engine's answers
//! become.
//!
//! | method, path | |
//! |---|---|
//! | `POST /predict` | one image (`image/png`, `image/jpeg`, `application/octet-stream`), one text (`text/plain`), or JSON `{"text": ..}`, `{"texts": [..]}`, `{"image": base64}`, `{"images": [base64, ..]}`; `?top_k=N` or `"top_k"` |
//! | `GET /model` | the backbone, method, classes, the round in use and the server's counters |
//! | `GET /healthz` | `ok` once a global adapter is loaded, 503 before |
//!
//! Refusals: 400 (unreadable JSON, an image that does not decode, no input), 401 (a token is
//! set and the request lacks it), 404, 405 (with `Allow`), 413 (a body over the limit, refused
//! from its `Content-Length` before it is read, or as it streams past the limit), 415 (a
//! content type the model cannot read), 503 (queue full, with `Retry-After`, or no adapter
//! yet). Every refusal is a JSON `{"error": ..}` naming what was wrong.

use std::sync::Arc;

use base64::Engine as _;
use fedpeft_http::hyper::body::Incoming;
use fedpeft_http::hyper::header::{self, HeaderValue};
use fedpeft_http::hyper::{Method, Request, StatusCode};
use fedpeft_http::{Reply, error, json};
use serde::Deserialize;

use super::engine::{Engine, EngineError, Payload};

/// Limits and the token of one server.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Largest number of inputs in one request.
    pub max_inputs: usize,
    /// `Authorization: Bearer <token>` required on every path when set.
    pub token: Option<String>,
}

pub(super) struct App {
    pub engine: Engine,
    pub limits: HttpLimits,
}

/// Answers one request.
pub(super) async fn handle(app: Arc<App>, req: Request<Incoming>) -> Reply {
    if let Err(r) = fedpeft_http::check_token(&req, app.limits.token.as_deref()) {
        return *r;
    }
    let allowed = match req.uri().path() {
        "/predict" => Method::POST,
        "/model" | "/healthz" => Method::GET,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no `{other}` here: POST /predict, GET /model, GET /healthz"),
            );
        }
    };
    if let Err(r) = fedpeft_http::check_method(&req, &[allowed]) {
        return *r;
    }
    match req.uri().path() {
        "/healthz" => {
            if app.engine.status().round.is_some() {
                json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            } else {
                error(StatusCode::SERVICE_UNAVAILABLE, EngineError::NotReady)
            }
        }
        "/model" => json(
            StatusCode::OK,
            &serde_json::json!({
                "model": &*app.engine.info,
                "status": app.engine.status(),
                "max_body_bytes": app.limits.max_body_bytes,
                "max_inputs": app.limits.max_inputs,
            }),
        ),
        _ => predict(&app, req).await,
    }
}

/// The JSON body `POST /predict` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictBody {
    text: Option<String>,
    texts: Option<Vec<String>>,
    image: Option<String>,
    images: Option<Vec<String>>,
    top_k: Option<usize>,
}

/// What a request body holds, before images are decoded.
enum Inputs {
    Texts(Vec<String>),
    Encoded(Vec<Vec<u8>>),
}

async fn predict(app: &App, req: Request<Incoming>) -> Reply {
    let mut top_k = match query_top_k(req.uri().query()) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let body = match fedpeft_http::body(req, app.limits.max_body_bytes).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let info = &app.engine.info;
    let inputs = match content_type.as_str() {
        "application/json" => {
            let b: PredictBody = match serde_json::from_slice(&body) {
                Ok(b) => b,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "the JSON body: {e} (expected {{\"text\": ..}}, {{\"texts\": [..]}}, \
                             {{\"image\": base64}} or {{\"images\": [..]}}, and optionally \"top_k\")"
                        ),
                    );
                }
            };
            top_k = b.top_k.or(top_k);
            match json_inputs(b) {
                Ok(i) => i,
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            }
        }
        "text/plain" => match String::from_utf8(body.to_vec()) {
            Ok(t) => Inputs::Texts(vec![t]),
            Err(_) => return error(StatusCode::BAD_REQUEST, "the text is not UTF-8"),
        },
        "image/png" | "image/jpeg" | "application/octet-stream" => {
            Inputs::Encoded(vec![body.to_vec()])
        }
        other => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "content type `{other}`: send image/png, image/jpeg, \
                     application/octet-stream, text/plain or application/json"
                ),
            );
        }
    };
    let n = match &inputs {
        Inputs::Texts(t) => t.len(),
        Inputs::Encoded(i) => i.len(),
    };
    if n == 0 {
        return error(StatusCode::BAD_REQUEST, "no input in the request");
    }
    if n > app.limits.max_inputs {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{n} inputs in one request; at most {}",
                app.limits.max_inputs
            ),
        );
    }
    let payload = match (inputs, info.image_size) {
        (Inputs::Texts(t), None) => Payload::Texts(t),
        (Inputs::Encoded(images), Some(side)) => {
            // Decoding a camera photo takes a while: off the runtime's threads.
            let decoded = tokio::task::spawn_blocking(move || {
                images
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        fedpeft_backbone::data::decode_image_bytes(
                            b,
                            side as u32,
                            &format!("image {i} of the request"),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await;
            match decoded {
                Ok(Ok(pixels)) => Payload::Images(pixels),
                Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Inputs::Texts(_), Some(_)) => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("backbone `{}` reads images, not texts", info.backbone),
            );
        }
        (Inputs::Encoded(_), None) => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("backbone `{}` reads texts, not images", info.backbone),
            );
        }
    };
    match app.engine.predict(payload).await {
        Ok(answer) => {
            let k = top_k.unwrap_or(3).clamp(1, info.classes.len());
            let predictions: Vec<serde_json::Value> = answer
                .probabilities
                .rows()
                .into_iter()
                .map(|row| crate::predict::prediction_json(&info.classes, row, k))
                .collect();
            json(
                StatusCode::OK,
                &serde_json::json!({"round": answer.round, "predictions": predictions}),
            )
        }
        Err(e @ EngineError::Busy(_)) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, e);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Err(e @ (EngineError::NotReady | EngineError::Stopped)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e)
        }
        Err(e @ EngineError::Failed(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn query_top_k(query: Option<&str>) -> Result<Option<usize>, String> {
    let mut top_k = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("top_k", v)) => {
                top_k = Some(
                    v.parse()
                        .map_err(|_| format!("top_k `{v}` is not a count"))?,
                );
            }
            _ => return Err(format!("unknown query parameter `{pair}` (only top_k)")),
        }
    }
    Ok(top_k)
}

fn json_inputs(b: PredictBody) -> Result<Inputs, String> {
    let b64 = |i: usize, s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| format!("image {i} is not base64: {e}"))
    };
    match (b.text, b.texts, b.image, b.images) {
        (Some(t), None, None, None) => Ok(Inputs::Texts(vec![t])),
        (None, Some(t), None, None) => Ok(Inputs::Texts(t)),
        (None, None, Some(i), None) => Ok(Inputs::Encoded(vec![b64(0, &i)?])),
        (None, None, None, Some(v)) => Ok(Inputs::Encoded(
            v.iter()
                .enumerate()
                .map(|(i, s)| b64(i, s))
                .collect::<Result<_, _>>()?,
        )),
        (None, None, None, None) => Err("no input: give text, texts, image or images".into()),
        _ => Err("give one of text, texts, image or images".into()),
    }
}
