//! onnxruntime through `ort` (load-dynamic): the fast CPU path, and CUDA / TensorRT on a Jetson.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ndarray::ArrayD;
use ort::environment::Environment;
use ort::ep::ExecutionProviderDispatch;
use ort::session::Session;
use ort::value::TensorRef;

use super::{
    ExecutionProvider, RuntimeKind, Trunk, TrunkConfig, TrunkInput, check_input, image_side,
};
use crate::error::{BackboneError, Result};
use crate::manifest::Backbone;

/// onnxruntime allows one environment per process, and its library is loaded once: the first
/// trunk that loads it decides which library file is used. A failed attempt (missing file, not
/// a library, too old) is not remembered, so a later trunk with a good path still works.
static ENV: Mutex<Option<(Environment, PathBuf)>> = Mutex::new(None);

/// The library file to load and where that choice came from (for error messages).
fn library_path(cfg: &TrunkConfig) -> (PathBuf, &'static str) {
    if let Some(p) = &cfg.ort_library {
        return (p.clone(), "TrunkConfig::ort_library");
    }
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), "ORT_DYLIB_PATH"),
        _ => (
            super::default_ort_library(),
            "the default, as ORT_DYLIB_PATH is not set",
        ),
    }
}

fn unavailable(reason: String) -> BackboneError {
    BackboneError::RuntimeUnavailable {
        runtime: "ort",
        reason,
    }
}

fn environment(cfg: &TrunkConfig) -> Result<Environment> {
    let (lib, source) = library_path(cfg);
    if !lib.is_file() {
        return Err(unavailable(format!(
            "onnxruntime library {} ({source}) not found; set ORT_DYLIB_PATH to \
             libonnxruntime.so or run `make models`",
            lib.display()
        )));
    }
    let mut env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((env, loaded)) = env.as_ref() {
        if loaded != &lib {
            tracing::warn!(requested = %lib.display(), loaded = %loaded.display(),
                "onnxruntime is already loaded from another file; using that one");
        }
        return Ok(env.clone());
    }
    let builder = ort::init_from(&lib).map_err(|e| {
        unavailable(format!(
            "loading onnxruntime library {} ({source}): {e}",
            lib.display()
        ))
    })?;
    let built = builder.with_name("fedpeft").build().map_err(|e| {
        unavailable(format!(
            "creating the onnxruntime environment from {}: {e}",
            lib.display()
        ))
    })?;
    *env = Some((built.clone(), lib));
    Ok(built)
}

fn providers(list: &[ExecutionProvider]) -> Vec<ExecutionProviderDispatch> {
    list.iter()
        .filter_map(|p| match p {
            #[cfg(feature = "cuda")]
            ExecutionProvider::Cuda => Some(ort::ep::CUDA::default().build()),
            #[cfg(feature = "tensorrt")]
            ExecutionProvider::TensorRt => Some(ort::ep::TensorRT::default().build()),
            #[allow(unreachable_patterns)]
            other => {
                tracing::warn!(provider = ?other, "execution provider not built in; using CPU");
                None
            }
        })
        .collect()
}

/// A trunk run by onnxruntime. `Session::run` needs `&mut`, hence the mutex.
pub struct OrtTrunk {
    session: Mutex<Session>,
    backbone: Backbone,
    side: Option<usize>,
    path: PathBuf,
}

impl std::fmt::Debug for OrtTrunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtTrunk")
            .field("path", &self.path)
            .finish()
    }
}

fn err(path: &Path, e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Trunk {
        path: path.to_path_buf(),
        runtime: "ort",
        reason: e.to_string(),
    }
}

impl OrtTrunk {
    pub fn open(backbone: &Backbone, cfg: &TrunkConfig) -> Result<Self> {
        let env = environment(cfg)?;
        let path = backbone.trunk_path();
        // `Error<SessionBuilder>` carries the builder (not Send): keep only its message.
        let mut builder = Session::builder(&env).map_err(|e| err(&path, e))?;
        if cfg.threads > 0 {
            builder = builder
                .with_intra_threads(cfg.threads)
                .map_err(|e| err(&path, e))?;
        }
        let eps = providers(&cfg.providers);
        if !eps.is_empty() {
            // Registration failures are logged by ort and fall back to CPU (fail_silently).
            builder = builder
                .with_execution_providers(eps)
                .map_err(|e| err(&path, e))?;
        }
        let session = builder.commit_from_file(&path).map_err(|e| err(&path, e))?;
        Ok(Self {
            session: Mutex::new(session),
            backbone: backbone.clone(),
            side: image_side(backbone, cfg),
            path,
        })
    }
}

impl Trunk for OrtTrunk {
    fn runtime(&self) -> RuntimeKind {
        RuntimeKind::Ort
    }

    fn run(&self, input: &TrunkInput) -> Result<ArrayD<f32>> {
        check_input(input, &self.backbone, self.side)?;
        let p = &self.path;
        let mut session = self
            .session
            .lock()
            .map_err(|_| err(p, "session mutex poisoned"))?;
        let outputs = match input {
            TrunkInput::Image(x) => {
                let x = x.as_standard_layout();
                let t = TensorRef::from_array_view(x.view()).map_err(|e| err(p, e))?;
                session.run(ort::inputs![t]).map_err(|e| err(p, e))?
            }
            TrunkInput::Tokens { ids, mask } => {
                let ids = ids.as_standard_layout();
                let mask = mask.as_standard_layout();
                let ids = TensorRef::from_array_view(ids.view()).map_err(|e| err(p, e))?;
                let mask = TensorRef::from_array_view(mask.view()).map_err(|e| err(p, e))?;
                session
                    .run(ort::inputs![ids, mask])
                    .map_err(|e| err(p, e))?
            }
        };
        let out = outputs[0]
            .try_extract_array::<f32>()
            .map_err(|e| err(p, e))?;
        Ok(out.to_owned())
    }
}
