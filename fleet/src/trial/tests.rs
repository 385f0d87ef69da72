//! The trial file's parsing, validation and preflight.

use std::path::{Path, PathBuf};

use fedpeft_config::strategy::StrategyKind;

use super::*;
use crate::links::Mechanism;

const MINIMAL: &str = r#"
    name = "t"
    rounds = 2
    clients = 4
    [model]
    backbone = "models/build/efficientnet-lite0"
    [data]
"#;

#[test]
fn a_minimal_trial_gets_documented_defaults() {
    let t = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
    assert_eq!((t.min_clients, t.start_clients), (4, 4));
    assert_eq!(t.quorum, 4);
    assert_eq!(t.model.peft, "lora");
    assert_eq!(t.model.image_size, 96);
    assert_eq!(t.data.partition, "dirichlet");
    assert_eq!(t.broker, Broker::Embedded);
    assert_eq!(t.client_id(3), "client-03");
}

#[test]
fn an_unknown_key_is_rejected_with_the_file_name() {
    let text = format!("{MINIMAL}\nbogus = 1\n");
    let err = Trial::parse(&text, Path::new("trials/x.toml")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("trials/x.toml") && msg.contains("bogus"),
        "{msg}"
    );
}

#[test]
fn impossible_settings_name_their_field() {
    for (patch, field) in [
        ("rounds = 0", "rounds"),
        ("fraction = 1.5", "fraction"),
        ("min_clients = 9", "min_clients"),
        ("start_clients = 9", "start_clients"),
        ("quorum = 0", "quorum"),
        ("round_timeout_secs = -1.0", "round_timeout_secs"),
        ("dropout = 1.0", "dropout"),
        ("dropout = -0.1", "dropout"),
        ("dropout_offline_secs = -2.0", "dropout_offline_secs"),
    ] {
        let text = MINIMAL.replace("rounds = 2", &format!("rounds = 2\n{patch}"));
        let text = if patch.starts_with("rounds") {
            MINIMAL.replace("rounds = 2", patch)
        } else {
            text
        };
        let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains(field), "{patch}: {err}");
    }
}

#[test]
fn the_strategy_is_the_aggregators_table_checked_before_anything_runs() {
    let text = format!("{MINIMAL}\n[strategy]\nkind = \"trimmed-mean\"\ntrim = 0.2\n");
    let t = Trial::parse(&text, Path::new("t.toml")).unwrap();
    assert_eq!(t.strategy, Some(StrategyKind::TrimmedMean { trim: 0.2 }));
    let text = format!("{MINIMAL}\n[strategy]\nkind = \"krum\"\n");
    let err = Trial::parse(&text, Path::new("t.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("t.toml") && err.contains("krum"), "{err}");
}

#[test]
fn dropout_and_stragglers_are_read_validated_and_seeded() {
    let t = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
    assert_eq!(t.dropout, 0.0);
    assert!(t.stragglers.is_empty());
    assert_eq!(t.global_dtype, "f32");
    let text = MINIMAL.replace("clients = 4", "clients = 8\ndropout = 0.3")
        + "[stragglers]\nfraction = 0.25\ndelay_secs = 30.0\n";
    let t = Trial::parse(&text, Path::new("t.toml")).unwrap();
    assert_eq!(t.dropout, 0.3);
    assert_eq!(t.stragglers.len(), 2);
    assert_eq!(t.straggle_secs, 30.0);
    assert_eq!(t.stragglers, pick_stragglers(8, 0.25, 42), "seeded");
    assert_ne!(
        (0..20)
            .map(|s| pick_stragglers(8, 0.25, s))
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        1,
        "the seed picks them"
    );
    assert_eq!(pick_stragglers(8, 0.01, 1).len(), 1, "at least one");
    for (table, key) in [
        ("fraction = 0.0\ndelay_secs = 1.0", "stragglers.fraction"),
        ("fraction = 0.5\ndelay_secs = 0.0", "stragglers.delay_secs"),
        ("fraction = 0.5", "delay_secs"),
        ("fraction = 0.5\ndelay_secs = 1.0\nslowdown = 2", "slowdown"),
    ] {
        let text = format!("{MINIMAL}\n[stragglers]\n{table}\n");
        let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains(key), "{table}: {err}");
    }
}

#[test]
fn text_trials_parse_and_impossible_data_settings_name_their_key() {
    let text = r#"
        name = "spam"
        rounds = 2
        clients = 8
        [model]
        backbone = "models/build/all-minilm-l6-v2"
        peft = "prompt"
        prompt_tokens = 8
        max_seq_len = 64
        [data]
        dataset = "spam-assassin"
        partition = "natural"
    "#;
    let t = Trial::parse(text, Path::new("t.toml")).unwrap();
    assert_eq!(t.data.partition, "natural");
    assert_eq!(
        (t.model.prompt_tokens, t.model.max_seq_len),
        (Some(8), Some(64))
    );
    for (from, to, field) in [
        (
            "dataset = \"spam-assassin\"",
            "dataset = \"fashion-mnist\"",
            "data.partition",
        ),
        (
            "dataset = \"spam-assassin\"",
            "dataset = \"imdb\"",
            "data.dataset",
        ),
        (
            "partition = \"natural\"",
            "partition = \"shards\"",
            "data.partition",
        ),
        ("max_seq_len = 64", "max_seq_len = 1", "model.max_seq_len"),
        (
            "prompt_tokens = 8",
            "prompt_tokens = 0",
            "model.prompt_tokens",
        ),
        ("max_seq_len = 64", "max_seq_length = 64", "max_seq_length"),
    ] {
        let err = Trial::parse(&text.replace(from, to), Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains(field), "{to}: {err}");
    }
}

#[test]
fn the_global_dtype_follows_the_update_dtype_unless_set() {
    let int8 = format!("{MINIMAL}\n[local]\nupdate_dtype = \"int8\"\n");
    assert_eq!(
        Trial::parse(&int8, Path::new("t.toml"))
            .unwrap()
            .global_dtype,
        "int8"
    );
    let f32_down = int8.replace("rounds = 2", "rounds = 2\nglobal_dtype = \"f32\"");
    assert_eq!(
        Trial::parse(&f32_down, Path::new("t.toml"))
            .unwrap()
            .global_dtype,
        "f32"
    );
    let bad = MINIMAL.replace("rounds = 2", "rounds = 2\nglobal_dtype = \"int4\"");
    let err = Trial::parse(&bad, Path::new("t.toml")).unwrap_err();
    assert!(err.to_string().contains("global_dtype"), "{err}");
}

#[test]
fn preflight_refuses_a_data_set_or_method_the_backbone_cannot_train() {
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conv");
    let text = dir.path().join("text");
    for (d, family) in [(&conv, "conv_head"), (&text, "transformer")] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(
            d.join("manifest.json"),
            format!("{{\"family\": \"{family}\"}}"),
        )
        .unwrap();
    }
    let check = |backbone: &Path, peft: &str, dataset: &str| {
        let mut t = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
        t.model.backbone = backbone.to_path_buf();
        t.model.peft = peft.into();
        t.data.dataset = dataset.into();
        t.preflight()
    };
    check(&conv, "lora", "fashion-mnist").unwrap();
    check(&text, "adapter", "spam-assassin").unwrap();
    for (backbone, peft, dataset, field) in [
        (&conv, "prompt", "fashion-mnist", "model.peft"),
        (&conv, "adapter", "fashion-mnist", "model.peft"),
        (&conv, "lora", "spam-assassin", "data.dataset"),
        (&text, "lora", "fashion-mnist", "data.dataset"),
    ] {
        let err = check(backbone, peft, dataset).unwrap_err();
        assert!(err.to_string().contains(field), "{peft} {dataset}: {err}");
    }
}

#[test]
fn an_external_broker_needs_a_url() {
    let text = format!("{MINIMAL}\n[broker]\nkind = \"external\"\n");
    let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
    assert!(err.to_string().contains("broker.url"), "{err}");
    let text =
        format!("{MINIMAL}\n[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:1884\"\n");
    let t = Trial::parse(&text, Path::new("t.toml")).unwrap();
    assert_eq!(
        t.broker,
        Broker::External {
            url: "mqtt://127.0.0.1:1884".into()
        }
    );
}

#[test]
fn links_name_their_key_and_mix_profiles() {
    let text = format!(
        "{MINIMAL}\n[broker]\nmax_packet_bytes = 16384\n[links]\nassign = [{{ profile = \"lte-m\", share = 0.5 }}, {{ profile = \"nb-iot\", share = 0.5 }}]\n"
    );
    let t = Trial::parse(&text, Path::new("t.toml")).unwrap();
    let plan = t.links.unwrap();
    assert_eq!(plan.clients[1].profile, "lte-m");
    assert_eq!(plan.clients[2].profile, "nb-iot");
    let text = format!("{MINIMAL}\n[links]\nprofile = \"nb-iot\"\n");
    let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
    assert!(err.to_string().contains("broker.max_packet_bytes"), "{err}");
    for (table, key) in [
        ("profile = \"nb-iot\"\nbogus = 1", "bogus"),
        ("profile = \"satellite\"", "links.profile"),
        (
            "profile = \"x\"\n[links.profiles.x]\nup_kbit = -1.0\ndown_kbit = 8.0",
            "links.profiles.x.up_kbit",
        ),
        (
            "profile = \"x\"\n[links.profiles.x]\nup_kbit = 1.0\ndown_kbit = 8.0\nrate = 3",
            "rate",
        ),
    ] {
        let text = format!("{MINIMAL}\n[links]\n{table}\n");
        let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains(key), "{table}: {err}");
    }
}

#[test]
fn preflight_refuses_a_missing_model_and_kernel_links_without_root() {
    let mut t = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
    t.model.backbone = PathBuf::from("/nonexistent/backbone");
    let err = t.preflight().unwrap_err();
    assert!(err.to_string().contains("model.backbone"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("manifest.json"),
        r#"{"family": "conv_head"}"#,
    )
    .unwrap();
    let text = format!("{MINIMAL}\n[links]\nprofile = \"wifi\"\nmechanism = \"kernel\"\n");
    let mut t = Trial::parse(&text, Path::new("t.toml")).unwrap();
    t.model.backbone = dir.path().to_path_buf();
    match crate::netns::unavailable() {
        Some(_) => {
            let err = t.preflight().unwrap_err();
            assert!(err.to_string().contains("links.mechanism"), "{err}");
        }
        None => {
            eprintln!("running as root: kernel links are available, so preflight accepts them");
            t.preflight().unwrap();
        }
    }
    // auto resolves to something concrete.
    t.set_mechanism(Mechanism::Auto).unwrap();
    t.preflight().unwrap();
    assert_ne!(t.links.as_ref().unwrap().mechanism, Mechanism::Auto);
    // --links on a trial without [links] names the table.
    let mut plain = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
    let err = plain.set_mechanism(Mechanism::Userspace).unwrap_err();
    assert!(err.to_string().contains("`links`"), "{err}");
}

#[test]
fn every_trial_file_in_the_repository_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trials");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Trial::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 4, "{n} trial files in {}", dir.display());
    let mixed = Trial::load(&dir.join("links-mixed.toml")).unwrap();
    let names: Vec<_> = mixed
        .links
        .unwrap()
        .clients
        .into_iter()
        .map(|c| c.profile)
        .collect();
    assert_eq!(names[2..4], ["lte-m", "nb-iot"]);
    assert_eq!(names[6..], ["rural-3g", "rural-3g"]);
}

/// A trial on the user's own image folders: `data` is the `[data]` table's body.
fn own(data: &str) -> Result<Trial, TrialError> {
    let text = format!(
        "name = \"t\"\nrounds = 2\nclients = 2\n[model]\nbackbone = \"m\"\n[data]\n{data}\n"
    );
    Trial::parse(&text, Path::new("t.toml"))
}

#[test]
fn each_client_gets_its_own_root_and_trains_on_all_of_it() {
    let t = own(
        "dataset = \"image-folder\"\nclient_roots = [\"a/\", \"b/\"]\neval_root = \"held-out\"",
    )
    .unwrap();
    assert_eq!(t.data.partition, "none");
    assert_eq!(
        (t.client_root(0), t.client_root(1)),
        (Some(PathBuf::from("a/")), Some(PathBuf::from("b/")))
    );
    assert_eq!(t.eval_root(), Some(PathBuf::from("held-out")));
    let t = own(
        "dataset = \"csv\"\nroot = \"sites/{client}/{index}.csv\"\neval_root = \"t.csv\"\n\
         classes = [\"ham\", \"spam\"]",
    )
    .unwrap();
    assert_eq!(
        t.client_root(1),
        Some(PathBuf::from("sites/client-01/1.csv"))
    );
    assert_eq!(t.data.partition, "none");
    // One root split across the clients (simulation): Dirichlet unless set.
    let t = own("dataset = \"image-folder\"\nroot = \"all\"\neval_root = \"held-out\"").unwrap();
    assert_eq!(
        (t.data.partition.as_str(), t.client_root(1)),
        ("dirichlet", Some("all".into()))
    );
    // A named set's held-out data is its root.
    let t = own("root = \"/data/fmnist\"").unwrap();
    assert_eq!(t.eval_root(), Some(PathBuf::from("/data/fmnist")));
    assert_eq!(own("").unwrap().eval_root(), None);
}

#[test]
fn own_data_settings_that_cannot_work_name_their_field() {
    let img = "dataset = \"image-folder\"\neval_root = \"e\"\n";
    for (data, field, words) in [
        (
            format!("{img}client_roots = [\"a\"]"),
            "data.client_roots",
            "1 roots for 2",
        ),
        (
            format!("{img}root = \"r\"\nclient_roots = [\"a\", \"b\"]"),
            "data.client_roots",
            "not both",
        ),
        (
            format!("{img}client_roots = [\"a\", \"b\"]\npartition = \"iid\""),
            "data.partition",
            "\"none\"",
        ),
        (
            format!("{img}root = \"r\"\npartition = \"none\""),
            "data.partition",
            "same data",
        ),
        (img.to_string(), "data.root", "required"),
        (
            "dataset = \"image-folder\"\nroot = \"r\"".to_string(),
            "data.eval_root",
            "held-out",
        ),
        (
            "dataset = \"jsonl\"\nroot = \"r\"\neval_root = \"e\"".to_string(),
            "data.classes",
            "required",
        ),
        (
            format!("{img}root = \"r\"\nclasses = [\"a\"]"),
            "data.classes",
            "at least 2",
        ),
        (
            "classes = [\"a\", \"b\"]".to_string(),
            "data.classes",
            "fixed",
        ),
        (
            "client_roots = [\"a\", \"b\"]".to_string(),
            "data.client_roots",
            "own data",
        ),
        (
            format!("{img}root = \"r\"\nlabels = \"l\""),
            "data.labels",
            "idx",
        ),
        (
            format!("{img}root = \"r\"\ntext_column = \"t\""),
            "data.text_column",
            "csv or jsonl",
        ),
        (
            "dataset = \"idx\"\nroot = \"pics.idx\"\neval_root = \"t10k-images-idx3-ubyte\"\n\
             classes = [\"a\", \"b\"]"
                .to_string(),
            "data.labels",
            "images-idx3",
        ),
        (
            "dataset = \"idx\"\nroot = \"train-images-idx3-ubyte\"\neval_root = \"e.idx\"\n\
             classes = [\"a\", \"b\"]"
                .to_string(),
            "data.eval_labels",
            "images-idx3",
        ),
        (
            format!("{img}root = \"r\"\npartition = \"natural\""),
            "data.partition",
            "natural",
        ),
    ] {
        let err = own(&data).unwrap_err().to_string();
        assert!(
            err.contains(&format!("`{field}`")) && err.contains(words),
            "{data}: {err}"
        );
    }
}

#[test]
fn preflight_finds_the_own_data_and_reads_an_image_folders_classes_from_the_held_out_folder() {
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conv");
    std::fs::create_dir(&conv).unwrap();
    std::fs::write(conv.join("manifest.json"), "{\"family\": \"conv_head\"}").unwrap();
    for class in ["dog", "cat", ".git", "bird"] {
        std::fs::create_dir_all(dir.path().join("held-out").join(class)).unwrap();
    }
    std::fs::create_dir(dir.path().join("client-00")).unwrap();
    let at = |p: &str| dir.path().join(p).display().to_string();
    let trial = |data: &str| {
        let mut t = own(data).unwrap();
        t.model.backbone = conv.clone();
        t
    };
    let mut t = trial(&format!(
        "dataset = \"image-folder\"\nroot = \"{}\"\neval_root = \"{}\"",
        at("{client}"),
        at("held-out")
    ));
    let err = t.preflight().unwrap_err().to_string();
    assert!(
        err.contains("client-01") && err.contains("`data.root`"),
        "{err}"
    );
    std::fs::create_dir(dir.path().join("client-01")).unwrap();
    t.preflight().unwrap();
    assert_eq!(
        t.data.classes,
        Some(vec!["bird".into(), "cat".into(), "dog".into()])
    );
    let mut t = trial(&format!(
        "dataset = \"image-folder\"\nroot = \"{}\"\neval_root = \"{}\"",
        at("client-00"),
        at("nowhere")
    ));
    let err = t.preflight().unwrap_err().to_string();
    assert!(
        err.contains("`data.eval_root`") && err.contains("nowhere"),
        "{err}"
    );
    let mut t = trial(&format!(
        "dataset = \"csv\"\nroot = \"{}\"\neval_root = \"{}\"\nclasses = [\"a\", \"b\"]",
        at("client-00"),
        at("held-out")
    ));
    let err = t.preflight().unwrap_err().to_string();
    assert!(
        err.contains("`data.dataset`") && err.contains("image-folder"),
        "{err}"
    );
}
