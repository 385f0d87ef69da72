//! The command line of `edge-client`: flags that override the config file's settings, and the
//! subcommands.

use std::path::PathBuf;

use clap::Parser;

use super::{PartitionKind, RuntimeChoice};

/// Command-line flags of `edge-client`. Each overrides the same setting of the config file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "edge-client",
    version,
    about = "fedpeft edge client: trains a PEFT tail on local data and publishes compact updates over MQTT"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML config file.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Broker URL, mqtt://host[:port] or mqtts://host[:port] (TLS), or the nodes of a cluster
    /// as a comma-separated list of URLs (tried in turn when a connection fails).
    #[arg(long)]
    pub broker: Option<String>,
    /// mqtts: PEM file of the CA the broker's certificate chains to.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// mqtts: PEM client certificate (with --client-key).
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// mqtts: PEM private key of --client-cert.
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// MQTT username.
    #[arg(long)]
    pub username: Option<String>,
    /// File whose first line is the MQTT password (a password is never a flag).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Secret key file: sign Join, Status and updates (`edge-client keygen`).
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// The aggregator's public key (64 hex digits): refuse unsigned or forged global adapters
    /// and round announcements.
    #[arg(long)]
    pub aggregator_key: Option<String>,
    /// Fleet name.
    #[arg(long)]
    pub fleet: Option<String>,
    /// This client's id.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Run id (must match the aggregator's).
    #[arg(long)]
    pub run_id: Option<u64>,
    /// Folder with the backbone manifest.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Trunk runtime.
    #[arg(long, value_enum)]
    pub runtime: Option<RuntimeChoice>,
    /// PEFT method (head, bias, lora, adapter, prompt, full-tail).
    #[arg(long)]
    pub peft: Option<String>,
    /// Image side for a vision trunk.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Samples per trunk batch while filling the activation cache (default 16).
    #[arg(long)]
    pub trunk_batch: Option<usize>,
    /// Tokens per text for a text trunk (default: the manifest's max_len).
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// LoRA rank.
    #[arg(long)]
    pub lora_rank: Option<u16>,
    /// LoRA alpha.
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// Adapter bottleneck width.
    #[arg(long)]
    pub bottleneck: Option<u16>,
    /// Prompt tokens.
    #[arg(long)]
    pub prompt_tokens: Option<u16>,
    /// Threads for the trunk runtime (0 = runtime default).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Data set: fashion-mnist, spam-assassin, or this device's own image-folder, idx, csv or
    /// jsonl data.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Where the data is: a named set's folder; own data's class folders, IDX images file,
    /// CSV or JSONL file.
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Own data: the fleet's class list in label-id order, comma-separated (as the
    /// aggregator's model.classes).
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
    /// Partition kind (none: all of the local data).
    #[arg(long, value_enum)]
    pub partition: Option<PartitionKind>,
    /// Dirichlet alpha.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Number of clients the data set is split across.
    #[arg(long)]
    pub num_clients: Option<usize>,
    /// This client's shard index.
    #[arg(long)]
    pub client_index: Option<usize>,
    /// Partition seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep at most this many local examples.
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Activation cache folder.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Cache the whole data set's activations in one entry shared by the fleet (`[cache] shared`).
    #[arg(long)]
    pub cache_shared: bool,
    /// Largest MQTT packet, bytes.
    #[arg(long)]
    pub max_packet_bytes: Option<usize>,
    /// JSON summary file written at exit.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// Emulated dropout: probability of vanishing mid-round in a sampled round (`[faults] dropout`).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Seconds a client that vanished stays away (`[faults] dropout_offline_secs`).
    #[arg(long)]
    pub dropout_offline_secs: Option<f64>,
    /// Emulated straggler: hold each finished update this many seconds (`[faults] straggle_secs`).
    #[arg(long)]
    pub straggle_secs: Option<f64>,

    /// Emulated mid-protocol dropout in secure rounds: go silent after sending this stage's
    /// message, `keys`, `shares` or `masked` (`[faults] secagg_drop_after`).
    #[arg(long, value_name = "STAGE")]
    pub secagg_drop_after: Option<String>,
    /// While taking part in the fleet, answer `POST /predict` on this address (e.g.
    /// 127.0.0.1:8088) with each newer global adapter the client receives (`edge-client serve`
    /// describes the requests).
    #[arg(long)]
    pub serve: Option<std::net::SocketAddr>,
}

/// `edge-client` subcommands (none: run the client).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Generate an Ed25519 key pair: writes the secret key to a new owner-only file and prints
    /// the public key (enrol it with the aggregator under this client's id).
    Keygen {
        /// Secret key file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Predict with the federation's model (the trunk + the tail with a kept global adapter):
    /// the label and top-k probabilities of each image or text, or with `--evaluate` the
    /// accuracy and confusion matrix on labelled data.
    Predict(Box<PredictArgs>),
    /// Export the federation's model: the tail with a kept global adapter merged in (LoRA
    /// folded into its weights) as safetensors with a model.json, and with --onnx one ONNX
    /// file of trunk and tail.
    Export(Box<ExportArgs>),
    /// Serve predictions over HTTP with a kept global adapter: `POST /predict` (an image, a
    /// text, or JSON), `GET /model`, `GET /healthz`; with --watch, each newer adapter the run
    /// keeps is swapped in as it appears.
    Serve(Box<ServeArgs>),
}

/// `edge-client serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: AdapterArgs,
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8088")]
    pub listen: std::net::SocketAddr,
    /// Swap in each newer global adapter the run keeps (polls the folder's index.json).
    #[arg(long)]
    pub watch: bool,
    /// --watch: how often the index is read, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub watch_ms: u64,
    /// Trunk runtime.
    #[arg(long, value_enum, default_value = "auto")]
    pub runtime: super::RuntimeChoice,
    /// Trunk threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Most inputs run through the trunk together (waiting requests are batched).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Most requests waiting; more are refused with 503 and Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body, KiB.
    #[arg(long, default_value_t = 8192)]
    pub max_body_kb: usize,
    /// Most inputs (images or texts) in one request.
    #[arg(long, default_value_t = 64)]
    pub max_inputs: usize,
    /// Threads answering HTTP (the model runs on its own thread).
    #[arg(long, default_value_t = 1)]
    pub http_threads: usize,
    /// File whose first line is a bearer token every request must carry
    /// (`Authorization: Bearer <token>`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// `edge-client export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub source: AdapterArgs,
    /// Output folder (created): tail-merged.safetensors, model.json, and model.onnx with
    /// --onnx.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write model.onnx (trunk + merged tail) with models/export_onnx.py.
    #[arg(long)]
    pub onnx: bool,
    /// The Python that runs models/export_onnx.py (needs the onnx package).
    #[arg(long, default_value = ".venv-models/bin/python")]
    pub python: PathBuf,
    /// models/export_onnx.py of a fedpeft checkout.
    #[arg(long, default_value = "models/export_onnx.py")]
    pub script: PathBuf,
}

/// Which kept global adapter `predict`, `export` and `serve` use.
#[derive(Debug, Clone, clap::Args)]
pub struct AdapterArgs {
    /// The adapter: a run's results folder or its globals/ folder (with --round), or one
    /// adapter file (`globals/round-0007.bin`, `global-adapter.bin`) with its index.json.
    #[arg(long, required_unless_present = "from_broker")]
    pub adapter: Option<PathBuf>,
    /// predict and serve: take the fleet's global adapter from the broker instead (the
    /// retained one; serve follows each newer one), with the broker, fleet, run, model and
    /// data settings of the client's config and flags (`edge-client -c edge.toml predict
    /// --from-broker ...`).
    #[arg(long, conflicts_with = "adapter")]
    pub from_broker: bool,
    /// The kept round to use from a folder: best (highest held-out accuracy), last, or a
    /// round number.
    #[arg(long, default_value = "best")]
    pub round: String,
    /// Backbone folder. Default: the one the run's aggregator used.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// The aggregator's public key (64 hex digits): refuse an adapter it did not sign.
    #[arg(long)]
    pub aggregator_key: Option<String>,
}

/// `edge-client predict`.
#[derive(Debug, Clone, clap::Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub source: AdapterArgs,
    /// Trunk runtime.
    #[arg(long, value_enum, default_value = "auto")]
    pub runtime: super::RuntimeChoice,
    /// Trunk threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Examples per trunk batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Probabilities printed per prediction.
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
    /// Output: jsonl (one JSON object per input) or csv.
    #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
    pub format: String,
    /// Texts: a file of one text per line (.txt), a CSV with a header row (.csv), or JSON
    /// lines (.jsonl), instead of images.
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// CSV / JSONL: the text column (field).
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// CSV / JSONL with --evaluate: the label column (field).
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Labelled data instead: print accuracy, loss and the confusion matrix. An image folder
    /// of class sub-folders, an IDX images file (with --labels), --texts with a label
    /// column, or --dataset fashion-mnist / spam-assassin (their held-out parts).
    #[arg(long)]
    pub evaluate: bool,
    /// --evaluate on a named data set's held-out part: fashion-mnist (the test split, from
    /// the folder given as input or the default one) or spam-assassin (its seeded 20 %).
    #[arg(long, value_parser = ["fashion-mnist", "spam-assassin"])]
    pub dataset: Option<String>,
    /// --evaluate on IDX images: the labels file.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// --evaluate: at most this many examples, chosen as the aggregator chooses its held-out
    /// examples (the first N of a named set, a seeded subset of the user's own data).
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Images: files or folders (read recursively). With --evaluate: the labelled folder or
    /// IDX file, or a named set's folder.
    pub inputs: Vec<PathBuf>,
}
