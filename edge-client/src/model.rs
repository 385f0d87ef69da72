//! The federation's model, ready to answer: the frozen trunk, the PEFT tail, and a global
//! adapter the aggregator kept (`globals/round-NNNN.bin` with `globals/index.json`, see the
//! aggregator's `globals` module). Used by `edge-client predict`.
//!
//! Everything an adapter needs to be used is checked before it is: the file is a global
//! adapter envelope of the index's run (and carries the aggregator's signature when a key is
//! given), the backbone folder's trunk is the one the run trained on, and the adapter's tensors
//! are exactly the tail's trainable ones, by name and shape. Each refusal names the file and
//! what disagreed.

use std::path::{Path, PathBuf};

use fedpeft_backbone::data::{ImageDataset, TextDataset};
use fedpeft_backbone::{
    Backbone, ImagePreprocess, Runtime, TextPreprocess, Trunk, TrunkConfig, TrunkInput, open_trunk,
};
use fedpeft_config::report::{AdapterModel, GLOBALS_SCHEMA, GlobalIndex};
use fedpeft_peft::{Batch, NamedTensor, PeftConfig, Tail};
use fedpeft_protocol::{Envelope, FleetName, Message, PeftMethod, VerifyingKey};
use ndarray::Array2;

/// Why the model could not be put together, or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Adapter { path: PathBuf, reason: String },
    #[error("backbone in {dir}: {reason}")]
    Backbone { dir: PathBuf, reason: String },
    #[error("{0}")]
    Input(String),
    #[error("trunk: {0}")]
    Trunk(#[source] fedpeft_backbone::BackboneError),
    #[error("tail: {0}")]
    Tail(#[source] fedpeft_peft::PeftError),
}

fn adapter_err(path: &Path, reason: impl std::fmt::Display) -> ModelError {
    ModelError::Adapter {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Which kept round `--round` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundChoice {
    Best,
    Last,
    Round(u32),
}

impl std::str::FromStr for RoundChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "best" => Ok(RoundChoice::Best),
            "last" => Ok(RoundChoice::Last),
            n => n
                .parse()
                .map(RoundChoice::Round)
                .map_err(|_| format!("`{n}` is not best, last or a round number")),
        }
    }
}

/// A global adapter and what it fits.
#[derive(Debug, Clone)]
pub struct KeptAdapter {
    /// The file it was read from.
    pub file: PathBuf,
    pub round: u32,
    pub tensors: Vec<NamedTensor>,
    pub index: GlobalIndex,
    /// The round's held-out accuracy, as the aggregator evaluated it.
    pub eval_accuracy: Option<f64>,
}

/// Finds the adapter `path` names: a run's results folder or its `globals/` folder (the round
/// `choice` picks), or one adapter file (`globals/round-NNNN.bin`, or a run's
/// `global-adapter.bin`) with the index beside it.
pub fn locate(path: &Path, choice: RoundChoice) -> Result<(PathBuf, GlobalIndex), ModelError> {
    let (index_path, index) = read_index(path)?;
    if path.is_file() {
        return Ok((path.to_path_buf(), index));
    }
    pick(&index_path, index, choice)
}

/// The globals index of the run `path` names (a results folder, its `globals/` folder, or an
/// adapter file beside its index), and where it is.
pub fn read_index(path: &Path) -> Result<(PathBuf, GlobalIndex), ModelError> {
    let index_path = if path.is_dir() {
        [path.join("globals/index.json"), path.join("index.json")]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                adapter_err(
                    path,
                    "neither globals/index.json nor index.json is in this folder (give a run's \
                     results folder, its globals/ folder, or an adapter file)",
                )
            })?
    } else if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        [dir.join("index.json"), dir.join("globals/index.json")]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                adapter_err(
                    path,
                    "no index.json beside it or in globals/ beside it: the index says which \
                     backbone and method the adapter fits (copy it along with the adapter)",
                )
            })?
    } else {
        return Err(adapter_err(path, "no such file or folder"));
    };
    let bytes = std::fs::read(&index_path).map_err(|e| adapter_err(&index_path, e))?;
    let index: GlobalIndex = serde_json::from_slice(&bytes)
        .map_err(|e| adapter_err(&index_path, format!("not a globals index: {e}")))?;
    if index.schema != GLOBALS_SCHEMA {
        return Err(adapter_err(
            &index_path,
            format!("schema `{}`, expected `{GLOBALS_SCHEMA}`", index.schema),
        ));
    }
    Ok((index_path, index))
}

/// The adapter file of the round `choice` picks from the index at `index_path`.
fn pick(
    index_path: &Path,
    index: GlobalIndex,
    choice: RoundChoice,
) -> Result<(PathBuf, GlobalIndex), ModelError> {
    let round = match choice {
        RoundChoice::Best => index.best.or(index.last),
        RoundChoice::Last => index.last,
        RoundChoice::Round(r) => Some(r),
    }
    .ok_or_else(|| adapter_err(index_path, "the run kept no global adapter yet"))?;
    let entry = index
        .entry(round)
        .ok_or_else(|| adapter_err(index_path, format!("the run has no round {round}")))?;
    let file = entry.file.as_ref().ok_or_else(|| {
        adapter_err(
            index_path,
            format!(
                "round {round}'s adapter was not kept (keep_globals = \"{}\"); kept: {:?}",
                index.keep,
                index
                    .rounds
                    .iter()
                    .filter(|e| e.file.is_some())
                    .map(|e| e.round)
                    .collect::<Vec<_>>()
            ),
        )
    })?;
    // The index's paths are relative to the run's results folder.
    let run_dir = index_path
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    Ok((run_dir.join(file), index))
}

/// The adapter `--adapter`, `--round` and `--aggregator-key` name, read and checked.
pub fn load(args: &crate::config::cli::AdapterArgs) -> anyhow::Result<KeptAdapter> {
    let choice: RoundChoice = args
        .round
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--round: {e}"))?;
    let key = args
        .aggregator_key
        .as_deref()
        .map(fedpeft_protocol::sign::parse_public_key)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--aggregator-key: {e}"))?;
    let path = args
        .adapter
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--adapter: which kept adapter (or --from-broker)"))?;
    let (file, index) = locate(path, choice)?;
    Ok(read_adapter(&file, index, key.as_ref())?)
}

/// The model `args` name, with its global adapter in: a kept one (`--adapter`), or with
/// `--from-broker` the retained one of the fleet the client's configuration (`cli`) names.
/// Returns the kept adapter when there is one (the broker's has no index).
pub fn open_model(
    cli: &crate::config::Cli,
    args: &crate::config::cli::AdapterArgs,
    runtime: Runtime,
    threads: usize,
) -> anyhow::Result<(Model, Option<KeptAdapter>)> {
    let mut opts = ModelOptions {
        model_dir: args.model_dir.clone(),
        runtime: Some(runtime),
        threads,
    };
    if !args.from_broker {
        let adapter = load(args)?;
        let model = Model::open(&adapter, &opts)?;
        return Ok((model, Some(adapter)));
    }
    let (cfg, mut model) = broker_model(cli, &mut opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (adapter, origin) = rt.block_on(async {
        let mut observer = crate::observe::Observer::new(&cfg)?;
        let a = observer
            .retained(std::time::Duration::from_secs(30))
            .await?;
        let origin = observer.origin(a.round);
        anyhow::Ok((a, origin))
    })?;
    model.load_tensors(adapter.round, &adapter.tensors, Path::new(&origin))?;
    tracing::info!(round = adapter.round, from = %origin, "global adapter from the broker");
    Ok((model, None))
}

/// `--from-broker`: the client's configuration, and the model it trains (no adapter in yet).
pub fn broker_model(
    cli: &crate::config::Cli,
    opts: &mut ModelOptions,
) -> anyhow::Result<(crate::config::EdgeConfig, Model)> {
    use anyhow::Context;
    let cfg = crate::config::EdgeConfig::from_cli(cli)
        .context("--from-broker reads the client's configuration")?;
    let spec = spec_from_config(&cfg, crate::observe::class_names(&cfg));
    opts.model_dir = Some(opts.model_dir.clone().unwrap_or(cfg.model_dir.clone()));
    let model = Model::build(&spec, &cfg.model_dir, opts)?;
    Ok((cfg, model))
}

/// Reads and checks the adapter file `file` of `index`'s run; with `key`, its signature.
pub fn read_adapter(
    file: &Path,
    index: GlobalIndex,
    key: Option<&VerifyingKey>,
) -> Result<KeptAdapter, ModelError> {
    let bytes = std::fs::read(file).map_err(|e| adapter_err(file, e))?;
    let env = Envelope::decode(&bytes)
        .map_err(|e| adapter_err(file, format!("not a global adapter envelope: {e}")))?;
    if env.run_id != index.run_id {
        return Err(adapter_err(
            file,
            format!(
                "belongs to run {}, the index beside it to run {}",
                env.run_id, index.run_id
            ),
        ));
    }
    if let Some(key) = key {
        let fleet = FleetName::new(&index.fleet).map_err(|e| adapter_err(file, e))?;
        fedpeft_protocol::sign::verify(&bytes, &fleet, key)
            .map_err(|e| adapter_err(file, format!("signature: {e}")))?;
    }
    let Message::GlobalAdapter(g) = env.message else {
        return Err(adapter_err(
            file,
            "holds another message, not a global adapter",
        ));
    };
    g.validate().map_err(|e| adapter_err(file, e))?;
    let tensors: Vec<NamedTensor> = g.tensors.iter().map(fedpeft_backbone::dense).collect();
    let eval_accuracy = index.entry(g.round).and_then(|e| e.eval_accuracy);
    Ok(KeptAdapter {
        file: file.to_path_buf(),
        round: g.round,
        tensors,
        index,
        eval_accuracy,
    })
}

/// The PEFT method an index names.
fn method(m: &AdapterModel) -> Result<PeftMethod, String> {
    Ok(match m.peft.as_str() {
        "head" => PeftMethod::Head,
        "bias" => PeftMethod::Bias,
        "lora" => PeftMethod::Lora {
            rank: m.lora_rank.ok_or("lora without lora_rank")?,
            alpha: m.lora_alpha.ok_or("lora without lora_alpha")?,
        },
        "adapter" => PeftMethod::Adapter {
            bottleneck: m.bottleneck.ok_or("adapter without bottleneck")?,
        },
        "prompt" => PeftMethod::Prompt {
            tokens: m.prompt_tokens.ok_or("prompt without prompt_tokens")?,
        },
        "full-tail" => PeftMethod::FullTail,
        other => return Err(format!("unknown method `{other}`")),
    })
}

/// What a fleet client's adapters fit, from its configuration and its data's class names:
/// the model `edge-client --serve` answers with while the client takes part in a run.
pub fn spec_from_config(cfg: &crate::config::EdgeConfig, classes: Vec<String>) -> AdapterModel {
    let p = cfg.peft.fields();
    AdapterModel {
        backbone: Some(cfg.model_dir.display().to_string()),
        backbone_id: None,
        backbone_sha256: None,
        peft: p.name.into(),
        lora_rank: p.lora_rank,
        lora_alpha: p.lora_alpha,
        bottleneck: p.bottleneck,
        prompt_tokens: p.prompt_tokens,
        classes,
        image_size: Some(cfg.image_size),
        max_seq_len: cfg.max_seq_len,
        tensors: Vec::new(),
    }
}

/// How the trunk is run.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// The backbone folder; `None`: the one the run's aggregator was given.
    pub model_dir: Option<PathBuf>,
    /// The trunk's runtime; `None`: no trunk (the tail alone, as `export` needs it).
    pub runtime: Option<Runtime>,
    pub threads: usize,
}

/// Trunk + tail with a global adapter: logits for images or texts.
#[derive(Debug)]
pub struct Model {
    pub backbone: Backbone,
    trunk: Option<Box<dyn Trunk>>,
    tail: Box<dyn Tail>,
    input: ModelInput,
    pub classes: Vec<String>,
    /// The round of the adapter in use.
    pub round: u32,
    /// The PEFT method's name (as in the index).
    peft: String,
}

#[derive(Debug)]
enum ModelInput {
    Image(ImagePreprocess, usize),
    Text(TextPreprocess),
}

impl Model {
    /// Opens the backbone, checks that it is the adapter's, builds the tail and loads the
    /// adapter into it.
    pub fn open(adapter: &KeptAdapter, opts: &ModelOptions) -> Result<Model, ModelError> {
        let mut model = Model::build(&adapter.index.model, &adapter.file, opts)?;
        model.swap(adapter)?;
        Ok(model)
    }

    /// Opens the backbone `spec` names (or `opts.model_dir`), checks that its trunk is the
    /// one `spec` was trained on, and builds the tail with its initial trainable tensors:
    /// load a global adapter ([`Model::load_tensors`]) before trusting its answers. `origin`
    /// (the adapter file, or the client's config) is named in errors.
    pub fn build(
        spec: &AdapterModel,
        origin: &Path,
        opts: &ModelOptions,
    ) -> Result<Model, ModelError> {
        let dir = match (&opts.model_dir, &spec.backbone) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => PathBuf::from(d),
            (None, None) => {
                return Err(adapter_err(
                    origin,
                    "the run had no backbone (an averaging-only aggregator): nothing to predict with",
                ));
            }
        };
        let bb_err = |reason: String| ModelError::Backbone {
            dir: dir.clone(),
            reason,
        };
        let backbone = Backbone::open(&dir).map_err(|e| bb_err(e.to_string()))?;
        if let Some(want) = &spec.backbone_sha256
            && !want.eq_ignore_ascii_case(backbone.trunk_sha256())
        {
            return Err(bb_err(format!(
                "its trunk (sha256 {}) is not the one adapter {} was trained on (backbone `{}`, \
                 trunk sha256 {want})",
                backbone.trunk_sha256(),
                origin.display(),
                spec.backbone_id.as_deref().unwrap_or("?"),
            )));
        }
        let classes = spec.classes.clone();
        if classes.is_empty() {
            return Err(adapter_err(origin, "the index names no classes"));
        }
        let method = method(spec).map_err(|e| adapter_err(origin, e))?;
        let family = backbone.manifest.tail_family().map_err(bb_err)?;
        let weights = fedpeft_peft::FrozenWeights::from_safetensors(&backbone.tail_path())
            .map_err(ModelError::Tail)?;
        let tail = fedpeft_peft::build_tail(
            family,
            &weights,
            PeftConfig::new(fedpeft_backbone::peft_method(method), classes.len(), 0),
        )
        .map_err(ModelError::Tail)?;
        let input = if backbone.manifest.is_text() {
            ModelInput::Text(
                TextPreprocess::from_backbone(&backbone, spec.max_seq_len)
                    .map_err(|e| bb_err(e.to_string()))?,
            )
        } else {
            let default = match &backbone.manifest.input {
                fedpeft_backbone::InputSpec::Image { default_size, .. } => *default_size,
                fedpeft_backbone::InputSpec::Text { .. } => 0,
            };
            let size = spec.image_size.unwrap_or(default);
            ModelInput::Image(
                ImagePreprocess::from_manifest(&backbone.manifest, Some(size))
                    .map_err(|e| bb_err(e.to_string()))?,
                size,
            )
        };
        let trunk = match opts.runtime {
            Some(runtime) => {
                let mut cfg = TrunkConfig::default()
                    .with_runtime(runtime)
                    .with_threads(opts.threads);
                if let ModelInput::Image(_, size) = &input {
                    cfg = cfg.with_image_size(*size);
                }
                Some(open_trunk(&backbone, &cfg).map_err(ModelError::Trunk)?)
            }
            None => None,
        };
        Ok(Model {
            backbone,
            trunk,
            tail,
            input,
            classes,
            round: 0,
            peft: spec.peft.clone(),
        })
    }

    fn trunk(&self) -> Result<&dyn Trunk, ModelError> {
        self.trunk
            .as_deref()
            .ok_or_else(|| ModelError::Input("the model was opened without its trunk".into()))
    }

    /// The PEFT method's name (`lora`, `bias`, ...).
    pub fn peft(&self) -> &str {
        &self.peft
    }

    /// Whether the model reads texts (else images).
    pub fn is_text(&self) -> bool {
        matches!(self.input, ModelInput::Text(_))
    }

    /// The image side the trunk takes (texts: none).
    pub fn image_size(&self) -> Option<usize> {
        match &self.input {
            ModelInput::Image(_, s) => Some(*s),
            ModelInput::Text(_) => None,
        }
    }

    /// Every tail tensor as trained, the adapter merged in ([`Tail::merged`]).
    pub fn merged(&self) -> Vec<NamedTensor> {
        self.tail.merged()
    }

    /// Puts another adapter of the same run in (a newer global).
    pub fn swap(&mut self, adapter: &KeptAdapter) -> Result<(), ModelError> {
        self.load_tensors(adapter.round, &adapter.tensors, &adapter.file)
    }

    /// Puts round `round`'s global adapter in; tensors that do not fit the tail (by name and
    /// shape) are refused with `origin` named, and the adapter in use stays.
    pub fn load_tensors(
        &mut self,
        round: u32,
        tensors: &[NamedTensor],
        origin: &Path,
    ) -> Result<(), ModelError> {
        self.tail.set_trainable(tensors).map_err(|e| {
            adapter_err(
                origin,
                format!(
                    "does not fit the {} tail of {}: {e}",
                    self.peft,
                    self.backbone.dir.display()
                ),
            )
        })?;
        self.round = round;
        Ok(())
    }

    /// Logits `[n, classes]` of images `idx` of `ds`.
    pub fn image_logits(
        &self,
        ds: &ImageDataset,
        idx: &[usize],
    ) -> Result<Array2<f32>, ModelError> {
        let ModelInput::Image(pre, _) = &self.input else {
            return Err(ModelError::Input(format!(
                "backbone `{}` reads texts, not images",
                self.backbone.manifest.id
            )));
        };
        let x = pre.batch(ds, idx).map_err(ModelError::Trunk)?;
        let features = self
            .trunk()?
            .run(&TrunkInput::Image(x))
            .map_err(ModelError::Trunk)?;
        self.tail
            .forward(&Batch::new(features, None))
            .map_err(ModelError::Tail)
    }

    /// Logits `[n, classes]` of texts `idx` of `ds`.
    pub fn text_logits(&self, ds: &TextDataset, idx: &[usize]) -> Result<Array2<f32>, ModelError> {
        let ModelInput::Text(pre) = &self.input else {
            return Err(ModelError::Input(format!(
                "backbone `{}` reads images, not texts",
                self.backbone.manifest.id
            )));
        };
        let (ids, mask) = pre.batch(ds, idx).map_err(ModelError::Trunk)?;
        let mask_f = mask.mapv(|m| m as f32);
        let features = self
            .trunk()?
            .run(&TrunkInput::Tokens { ids, mask })
            .map_err(ModelError::Trunk)?;
        self.tail
            .forward(&Batch::new(features, Some(mask_f)))
            .map_err(ModelError::Tail)
    }
}

/// Softmax of each row, in f64.
pub fn probabilities(logits: &Array2<f32>) -> Array2<f64> {
    let mut p = logits.mapv(f64::from);
    for mut row in p.rows_mut() {
        let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - m).exp());
        let s = row.sum();
        row.mapv_inplace(|v| v / s);
    }
    p
}
