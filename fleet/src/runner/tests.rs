//! The aggregator's config, the keys and the clients' command lines a trial gets.

use std::path::Path;

use fedpeft_config::aggregator::AggregatorFile;

use super::config::as_f32;
use super::*;

#[test]
fn every_trial_read_gets_a_run_id_of_its_own_and_hands_it_to_everyone() {
    let (a, b) = (trial(), trial());
    assert_ne!(a.run_id, b.run_id);
    assert_ne!(a.run_id, a.seed);
    let config = aggregator_config(&a, Path::new("o"), None);
    assert_eq!(config.run_id, Some(a.run_id));
    let args = client_args(&a, 1);
    assert_eq!(flag_value(&args, "--run-id"), a.run_id.to_string());
}

fn trial() -> Trial {
    Trial::parse(
        r#"
        name = "t"
        rounds = 3
        clients = 4
        quorum = 3
        [model]
        backbone = "models/build/efficientnet-lite0"
        peft = "lora"
        lora_rank = 4
        [data]
        max_examples = 100
        [local]
        epochs = 2
        learning_rate = 0.01
        [strategy]
        kind = "trimmed-mean"
        trim = 0.25
        "#,
        Path::new("t.toml"),
    )
    .unwrap()
}

#[test]
fn the_aggregator_config_carries_the_trial_settings() {
    let text = aggregator_config(&trial(), Path::new("runs/t"), Some(4321)).to_toml();
    for needle in [
        "rounds = 3",
        "quorum = 3",
        "start_clients = 4",
        "port = 4321",
        "url = \"embedded\"",
        "lora_rank = 4",
        "epochs = 2",
        "kind = \"trimmed-mean\"",
        "dir = \"runs/t\"",
        "global_dtype = \"f32\"",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    assert!(
        !text.contains("batch_size"),
        "unset fields stay unset:\n{text}"
    );
}

/// The file written for a trial means what the runner wrote when it built the file as a
/// TOML table (that text is kept in `fixtures/`): both parse to the same [`AggregatorFile`].
#[test]
fn the_aggregator_config_means_what_the_table_built_one_meant() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let quickstart = Trial::load(&data.join("../../trials/quickstart.toml")).unwrap();
    let dp = Trial::load(&data.join("dp-fedadam-signed.toml")).unwrap();
    for (trial, out, port, then) in [
        (
            &quickstart,
            "runs/quickstart",
            Some(4321),
            "aggregator-quickstart.toml",
        ),
        (
            &dp,
            "runs/dp-robust",
            None,
            "aggregator-dp-fedadam-signed.toml",
        ),
    ] {
        let text = aggregator_config(trial, Path::new(out), port).to_toml();
        let mut now = AggregatorFile::parse(&text, Path::new("now.toml")).unwrap();
        // The run id is fresh for every trial read; the fixture keeps the seed's.
        assert_eq!(now.run_id, Some(trial.run_id));
        now.run_id = Some(trial.seed);
        let then = AggregatorFile::read(&data.join(then)).unwrap();
        assert_eq!(now, then, "{}: written now:\n{text}", trial.name);
    }
    // The f32 fields read as the aggregator reads the trial's text, not one ulp away.
    assert_eq!(as_f32(0.001), 0.001_f32);
    assert_eq!(dp.local.weight_decay.map(as_f32), Some(0.0001_f32));
}

/// The arguments `client_command` gives client `index` of `t`.
fn client_args(t: &Trial, index: usize) -> Vec<String> {
    let bins = Binaries {
        aggregator: "agg".into(),
        edge_client: "edge".into(),
    };
    client_command(
        t,
        &bins,
        index,
        "mqtt://127.0.0.1:1",
        Path::new("o"),
        Some("ab12"),
    )
    .get_args()
    .map(|a| a.to_string_lossy().into_owned())
    .collect()
}

/// The value following `flag` in `args`.
fn flag_value(args: &[String], flag: &str) -> String {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1].clone()
}

/// A signed trial: fresh keys for the aggregator and every client, the aggregator told to
/// sign and to enforce the enrolment, each client given its key and the aggregator's.
#[test]
fn a_signed_trial_makes_keys_enrols_every_client_and_hands_each_its_key() {
    let mut t = trial();
    let unsigned = aggregator_config(&t, Path::new("o"), None).to_toml();
    assert!(!unsigned.contains("[security]"), "{unsigned}");
    assert!(
        !client_args(&t, 1)
            .iter()
            .any(|a| a.starts_with("--signing"))
    );
    t.signed = true;
    let out = tempfile::tempdir().unwrap();
    let agg_hex = make_keys(&t, out.path()).unwrap();
    let keys = out.path().join("keys");
    let agg = fedpeft_protocol::sign::read_signing_key(&keys.join("aggregator.key")).unwrap();
    assert_eq!(
        fedpeft_protocol::sign::public_key_hex(&agg.verifying_key()),
        agg_hex
    );
    let enrolled: toml::Table =
        toml::from_str(&std::fs::read_to_string(keys.join("enrolled.toml")).unwrap()).unwrap();
    let clients = enrolled["clients"].as_table().unwrap();
    assert_eq!(clients.len(), t.clients);
    for index in 0..t.clients {
        let id = t.client_id(index);
        let key =
            fedpeft_protocol::sign::read_signing_key(&keys.join(format!("{id}.key"))).unwrap();
        assert_eq!(
            clients[&id].as_str(),
            Some(fedpeft_protocol::sign::public_key_hex(&key.verifying_key()).as_str()),
            "{id}"
        );
    }
    // A second run into the same folder makes new keys instead of failing on the old.
    assert_ne!(make_keys(&t, out.path()).unwrap(), agg_hex);
    let config = aggregator_config(&t, Path::new("o"), None).to_toml();
    assert!(
        config.contains("signing_key = \"o/keys/aggregator.key\""),
        "{config}"
    );
    assert!(
        config.contains("enrolled_keys = \"o/keys/enrolled.toml\""),
        "{config}"
    );
    let args = client_args(&t, 2);
    assert_eq!(flag_value(&args, "--signing-key"), "o/keys/client-02.key");
    assert_eq!(flag_value(&args, "--aggregator-key"), "ab12");
}

#[test]
fn each_client_gets_its_own_id_shard_and_files() {
    let args = client_args(&trial(), 2);
    let after = |flag: &str| flag_value(&args, flag);
    assert_eq!(after("--client-id"), "client-02");
    assert_eq!(after("--client-index"), "2");
    assert_eq!(after("--num-clients"), "4");
    assert_eq!(after("--max-examples"), "100");
    assert_eq!(after("--summary-json"), "o/clients/client-02.json");
    assert!(
        !args
            .iter()
            .any(|a| a == "--dropout" || a == "--straggle-secs")
    );
    // The method's hyper-parameters reach the clients as they reach the aggregator.
    assert_eq!(after("--lora-rank"), "4");
    assert!(!args.iter().any(|a| a == "--max-seq-len"));
}

#[test]
fn dropout_goes_to_every_client_and_the_delay_to_stragglers_only() {
    let mut t = trial();
    t.dropout = 0.3;
    t.stragglers = vec![1];
    t.straggle_secs = 12.5;
    for i in 0..4 {
        let a = client_args(&t, i);
        assert_eq!(flag_value(&a, "--dropout"), "0.3");
        let straggles = a.iter().position(|x| x == "--straggle-secs");
        assert_eq!(straggles.is_some(), i == 1, "client {i}");
        if let Some(at) = straggles {
            assert_eq!(a[at + 1], "12.5");
        }
    }
}

#[test]
fn a_text_trial_passes_its_data_set_and_sequence_length_to_both_sides() {
    let t = Trial::parse(
        r#"
        name = "spam"
        rounds = 2
        clients = 4
        [model]
        backbone = "models/build/all-minilm-l6-v2"
        peft = "adapter"
        bottleneck = 8
        max_seq_len = 64
        [data]
        dataset = "spam-assassin"
        partition = "natural"
        "#,
        Path::new("t.toml"),
    )
    .unwrap();
    let text = aggregator_config(&t, Path::new("o"), None).to_toml();
    for needle in [
        "dataset = \"spam-assassin\"",
        "max_seq_len = 64",
        "bottleneck = 8",
        "peft = \"adapter\"",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    let args = client_args(&t, 1);
    let after = |flag: &str| flag_value(&args, flag);
    assert_eq!(after("--dataset"), "spam-assassin");
    assert_eq!(after("--partition"), "natural");
    assert_eq!(after("--max-seq-len"), "64");
    assert_eq!(after("--bottleneck"), "8");
    assert_eq!(after("--peft"), "adapter");
}

/// Own data: each client gets its root as a flag and the fleet's class list (and how to read
/// its files) in its config file; the aggregator gets the held-out data and the same list.
#[test]
fn an_own_data_trial_gives_each_client_its_root_and_everyone_the_same_classes() {
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir(out.path().join("clients")).unwrap();
    let t = Trial::parse(
        r#"
        name = "own"
        rounds = 2
        clients = 2
        [model]
        backbone = "models/build/all-minilm-l6-v2"
        [data]
        dataset = "csv"
        client_roots = ["site-a.csv", "site-b.csv"]
        eval_root = "held-out.csv"
        text_column = "review"
        classes = ["neg", "pos"]
        "#,
        Path::new("own.toml"),
    )
    .unwrap();
    let bins = Binaries {
        aggregator: "agg".into(),
        edge_client: "edge".into(),
    };
    let args: Vec<String> = client_command(&t, &bins, 1, "mqtt://127.0.0.1:1", out.path(), None)
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(flag_value(&args, "--dataset"), "csv");
    assert_eq!(flag_value(&args, "--data-root"), "site-b.csv");
    assert_eq!(flag_value(&args, "--partition"), "none");
    let file =
        fedpeft_config::edge::EdgeFile::read(Path::new(&flag_value(&args, "--config"))).unwrap();
    assert_eq!(
        file.data.classes,
        Some(vec!["neg".to_string(), "pos".to_string()])
    );
    assert_eq!(file.data.text_column.as_deref(), Some("review"));
    let agg = aggregator_config(&t, Path::new("o"), None);
    assert_eq!(agg.model.dataset.as_deref(), Some("csv"));
    assert_eq!(agg.model.eval_root, Some(PathBuf::from("held-out.csv")));
    assert_eq!(agg.model.classes, file.data.classes);
    assert_eq!(agg.model.text_column.as_deref(), Some("review"));
    // A trial on a named set writes no client config file.
    let args = client_args(&trial(), 0);
    assert!(!args.iter().any(|a| a == "--config"), "{args:?}");
}
