//! The inference worker behind the HTTP server: one thread owns the model (trunk + tail) and
//! answers queued requests in batches; a newer global adapter is swapped in between batches.
//!
//! - **Batching**: the worker takes the oldest request, then every request already waiting of
//!   the same kind (images or texts) while the batch holds at most `batch` inputs, and runs
//!   them through the trunk together. An idle server answers one request at once; a loaded one
//!   amortises the trunk over many.
//! - **Back-pressure**: at most `queue` requests wait; the next is refused at once
//!   ([`EngineError::Busy`], HTTP 503) rather than queued without bound.
//! - **Swaps**: a global adapter travels through the same queue as the requests, so every
//!   answer names the round of the adapter that produced all of it, and no request sees a
//!   half-loaded tail. An adapter that does not fit the tail is refused (counted, logged, shown
//!   by `GET /model`) and the adapter in use stays.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use fedpeft_backbone::data::{ImageDataset, TextDataset};
use ndarray::Array2;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::model::{Model, probabilities};
use crate::types::SharedAdapter;

/// What one request asks about.
#[derive(Debug)]
pub enum Payload {
    /// Images already decoded to the model's `side × side` RGB, one `Vec` each.
    Images(Vec<Vec<u8>>),
    Texts(Vec<String>),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Images(v) => v.len(),
            Payload::Texts(v) => v.len(),
        }
    }

    fn is_text(&self) -> bool {
        matches!(self, Payload::Texts(_))
    }
}

/// Class probabilities for each input of a request, and the round of the adapter that gave
/// them.
#[derive(Debug)]
pub struct Answer {
    pub round: u32,
    pub probabilities: Array2<f64>,
}

/// Why a request got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("{0} requests are waiting already; try again shortly")]
    Busy(usize),
    #[error("no global adapter yet: the fleet has not published one since this client started")]
    NotReady,
    #[error("the model failed on this request: {0}")]
    Failed(String),
    #[error("the server is shutting down")]
    Stopped,
}

/// What the model is, for `GET /model` and for reading requests.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub backbone: String,
    pub peft: String,
    pub classes: Vec<String>,
    /// Images are resized to this side; `None`: the model reads texts.
    pub image_size: Option<usize>,
}

/// The worker's state, as `GET /model` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The round of the adapter in use (`None` until the first arrives).
    pub round: Option<u32>,
    /// Where it came from.
    pub adapter: Option<String>,
    pub swaps: u64,
    pub refused_adapters: u64,
    /// The reason the last refused adapter was refused.
    pub last_refusal: Option<String>,
    pub requests: u64,
    pub inputs: u64,
    pub batches: u64,
    pub failures: u64,
}

struct Job {
    payload: Payload,
    reply: oneshot::Sender<Result<Answer, EngineError>>,
}

enum Msg {
    Job(Job),
    Swap(SharedAdapter, String),
}

/// A handle on the worker (cheap to clone; the worker stops when the last handle is dropped).
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::Sender<Msg>,
    waiting: Arc<AtomicUsize>,
    queue: usize,
    status: Arc<Mutex<Status>>,
    pub info: Arc<ModelInfo>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Job(j) => write!(f, "Job({} inputs)", j.payload.len()),
            Msg::Swap(a, from) => write!(f, "Swap(round {} from {from})", a.round),
        }
    }
}

impl Engine {
    /// Starts the worker thread with `model`; `loaded`: whether `model` already holds a
    /// global adapter (else requests get [`EngineError::NotReady`] until one is swapped in).
    pub fn start(
        model: Model,
        loaded: Option<String>,
        batch: usize,
        queue: usize,
    ) -> std::io::Result<Engine> {
        let info = Arc::new(ModelInfo {
            backbone: model.backbone.manifest.id.clone(),
            peft: model.peft().to_string(),
            classes: model.classes.clone(),
            image_size: model.image_size(),
        });
        let status = Arc::new(Mutex::new(Status {
            round: loaded.as_ref().map(|_| model.round),
            adapter: loaded,
            ..Status::default()
        }));
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            model,
            rx,
            backlog: VecDeque::new(),
            batch: batch.max(1),
            waiting: waiting.clone(),
            status: status.clone(),
        };
        std::thread::Builder::new()
            .name("predict".into())
            .spawn(move || worker.run())?;
        Ok(Engine {
            tx,
            waiting,
            queue: queue.max(1),
            status,
            info,
        })
    }

    /// Queues `payload` and waits for its answer.
    pub async fn predict(&self, payload: Payload) -> Result<Answer, EngineError> {
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= self.queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Busy(before));
        }
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Msg::Job(Job { payload, reply })).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        answer.await.unwrap_or(Err(EngineError::Stopped))
    }

    /// Hands a newer global adapter to the worker (`from`: where it came from, for logs and
    /// refusals); it is checked and swapped in before the next batch.
    pub fn swap(&self, adapter: SharedAdapter, from: impl Into<String>) {
        let _ = self.tx.send(Msg::Swap(adapter, from.into()));
    }

    /// Counts an adapter refused before it reached the worker (unreadable, unsigned).
    pub fn refused(&self, reason: String) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.refused_adapters += 1;
        s.last_refusal = Some(reason);
    }

    /// The worker's state now.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

struct Worker {
    model: Model,
    rx: mpsc::Receiver<Msg>,
    /// Messages read ahead while gathering a batch, in arrival order.
    backlog: VecDeque<Msg>,
    batch: usize,
    waiting: Arc<AtomicUsize>,
    status: Arc<Mutex<Status>>,
}

impl Worker {
    fn next(&mut self) -> Option<Msg> {
        self.backlog.pop_front().or_else(|| self.rx.recv().ok())
    }

    fn run(mut self) {
        while let Some(msg) = self.next() {
            match msg {
                Msg::Swap(adapter, from) => self.swap(&adapter, from),
                Msg::Job(first) => {
                    let jobs = self.gather(first);
                    self.answer(jobs);
                }
            }
        }
    }

    /// `first` and the requests already waiting behind it of its kind, up to `batch` inputs;
    /// a swap or a request of the other kind ends the batch (it stays first in the backlog).
    fn gather(&mut self, first: Job) -> Vec<Job> {
        let text = first.payload.is_text();
        let mut total = first.payload.len();
        let mut jobs = vec![first];
        while total < self.batch {
            let msg = match self.backlog.pop_front() {
                Some(m) => m,
                None => match self.rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match msg {
                Msg::Job(j)
                    if j.payload.is_text() == text && total + j.payload.len() <= self.batch =>
                {
                    total += j.payload.len();
                    jobs.push(j);
                }
                other => {
                    self.backlog.push_front(other);
                    break;
                }
            }
        }
        jobs
    }

    fn swap(&mut self, adapter: &SharedAdapter, from: String) {
        let origin = PathBuf::from(&from);
        let result = self
            .model
            .load_tensors(adapter.round, &adapter.tensors, &origin);
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                tracing::info!(round = adapter.round, from = %from, "serving the new global adapter");
                s.round = Some(adapter.round);
                s.adapter = Some(from);
                s.swaps += 1;
            }
            Err(e) => {
                tracing::error!(error = %e, round = adapter.round, "global adapter refused; serving the previous one");
                s.refused_adapters += 1;
                s.last_refusal = Some(e.to_string());
            }
        }
    }

    fn answer(&mut self, jobs: Vec<Job>) {
        self.waiting.fetch_sub(jobs.len(), Ordering::SeqCst);
        let ready = self
            .status
            .lock()
            .map(|s| s.round.is_some())
            .unwrap_or(false);
        if !ready {
            for j in jobs {
                let _ = j.reply.send(Err(EngineError::NotReady));
            }
            return;
        }
        let sizes: Vec<usize> = jobs.iter().map(|j| j.payload.len()).collect();
        let total: usize = sizes.iter().sum();
        let (payloads, replies): (Vec<Payload>, Vec<_>) =
            jobs.into_iter().map(|j| (j.payload, j.reply)).unzip();
        let result = self.logits(payloads, total);
        {
            let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            s.requests += replies.len() as u64;
            s.inputs += total as u64;
            s.batches += 1;
            s.failures += u64::from(result.is_err());
        }
        match result {
            Ok(logits) => {
                let probs = probabilities(&logits);
                let mut row = 0;
                for (reply, n) in replies.into_iter().zip(sizes) {
                    let part = probs.slice(ndarray::s![row..row + n, ..]).to_owned();
                    row += n;
                    let _ = reply.send(Ok(Answer {
                        round: self.model.round,
                        probabilities: part,
                    }));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "prediction failed");
                for reply in replies {
                    let _ = reply.send(Err(EngineError::Failed(e.clone())));
                }
            }
        }
    }

    /// Logits of every input of `payloads` (all of one kind), `batch` at a time.
    fn logits(&self, payloads: Vec<Payload>, total: usize) -> Result<Array2<f32>, String> {
        let mut out = Array2::<f32>::zeros((total, self.model.classes.len()));
        let source = PathBuf::from("request");
        let idx: Vec<usize> = (0..total).collect();
        let text = payloads.first().is_some_and(Payload::is_text);
        if text {
            let texts: Vec<String> = payloads
                .into_iter()
                .flat_map(|p| match p {
                    Payload::Texts(t) => t,
                    Payload::Images(_) => Vec::new(),
                })
                .collect();
            let ds = TextDataset {
                labels: vec![0; texts.len()],
                keys: vec![None; texts.len()],
                texts,
                classes: self.model.classes.clone(),
                source,
            };
            for chunk in idx.chunks(self.batch) {
                let l = self
                    .model
                    .text_logits(&ds, chunk)
                    .map_err(|e| e.to_string())?;
                out.slice_mut(ndarray::s![chunk[0]..chunk[0] + chunk.len(), ..])
                    .assign(&l);
            }
        } else {
            let side = self.model.image_size().unwrap_or(0);
            let mut pixels = Vec::with_capacity(total * side * side * 3);
            for p in payloads {
                if let Payload::Images(images) = p {
                    for i in images {
                        pixels.extend_from_slice(&i);
                    }
                }
            }
            let ds = ImageDataset {
                height: side,
                width: side,
                channels: 3,
                pixels,
                labels: vec![0; total],
                classes: self.model.classes.clone(),
                source,
            };
            for chunk in idx.chunks(self.batch) {
                let l = self
                    .model
                    .image_logits(&ds, chunk)
                    .map_err(|e| e.to_string())?;
                out.slice_mut(ndarray::s![chunk[0]..chunk[0] + chunk.len(), ..])
                    .assign(&l);
            }
        }
        Ok(out)
    }
}
