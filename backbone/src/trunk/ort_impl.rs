//! onnxruntime through `ort` (load-dynamic): the fast CPU path, and CUDA / TensorRT on a Jetson.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

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
/// trunk decides which library file is used.
static ENV: OnceLock<std::result::Result<(Environment, PathBuf), String>> = OnceLock::new();

fn library_path(cfg: &TrunkConfig) -> PathBuf {
    cfg.ort_library
        .clone()
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .unwrap_or_else(super::default_ort_library)
}

fn environment(cfg: &TrunkConfig) -> Result<Environment> {
    let lib = library_path(cfg);
    let res = ENV.get_or_init(|| {
        if !lib.is_file() {
            return Err(format!(
                "onnxruntime library {} not found (set ORT_DYLIB_PATH or run `make models`)",
                lib.display()
            ));
        }
        let builder =
            ort::init_from(&lib).map_err(|e| format!("loading {}: {e}", lib.display()))?;
        let env = builder
            .with_name("fedpeft")
            .build()
            .map_err(|e| format!("creating the environment from {}: {e}", lib.display()))?;
        Ok((env, lib.clone()))
    });
    match res {
        Ok((env, loaded)) => {
            if loaded != &lib {
                tracing::warn!(requested = %lib.display(), loaded = %loaded.display(),
                    "onnxruntime is already loaded from another file; using that one");
            }
            Ok(env.clone())
        }
        Err(reason) => Err(BackboneError::RuntimeUnavailable {
            runtime: "ort",
            reason: reason.clone(),
        }),
    }
}

fn providers(list: &[ExecutionProvider]) -> Vec<ExecutionProviderDispatch> {
    let mut out = Vec::new();
    for p in list {
        match p {
            #[cfg(feature = "cuda")]
            ExecutionProvider::Cuda => out.push(ort::ep::CUDA::default().build()),
            #[cfg(feature = "tensorrt")]
            ExecutionProvider::TensorRt => out.push(ort::ep::TensorRT::default().build()),
            #[allow(unreachable_patterns)]
            other => {
                tracing::warn!(provider = ?other, "execution provider not built in; using CPU")
            }
        }
    }
    out
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
