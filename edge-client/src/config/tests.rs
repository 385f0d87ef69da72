//! The edge config: file and flags merged, defaults filled, bad values refused by name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use fedpeft_protocol::PeftMethod;

use super::*;

fn cli(args: &[&str]) -> Cli {
    let mut all = vec!["edge-client"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all).expect("flags parse")
}

fn parse(text: &str) -> Result<EdgeFile, ConfigError> {
    EdgeFile::parse(text, Path::new("edge.toml"))
}

#[test]
fn a_full_file_is_read_and_defaults_fill_the_rest() {
    let file = parse(
        r#"
        [broker]
        url = "mqtt://broker.local:1884"
        [client]
        fleet = "lab"
        id = "pi-07"
        run_id = 9
        [model]
        dir = "models/build/efficientnet-lite0"
        runtime = "tract"
        peft = "lora"
        lora_rank = 4
        [data]
        partition = "iid"
        num_clients = 8
        index = 7
        "#,
    )
    .unwrap();
    let cfg = EdgeConfig::resolve(file, &cli(&[])).unwrap();
    assert_eq!(
        cfg.brokers,
        BrokerList::from(BrokerAddr {
            host: "broker.local".into(),
            port: 1884,
            tls: false,
        })
    );
    assert_eq!(cfg.fleet, "lab");
    assert_eq!(cfg.client_id, "pi-07");
    assert_eq!(cfg.run_id, 9);
    assert_eq!(cfg.runtime, RuntimeChoice::Tract);
    assert_eq!(
        cfg.peft,
        PeftMethod::Lora {
            rank: 4,
            alpha: 16.0
        }
    );
    assert_eq!((cfg.image_size, cfg.trunk_batch), (96, 16));
    assert_eq!(cfg.data.partition, PartitionKind::Iid);
    assert_eq!((cfg.data.index, cfg.data.num_clients), (7, 8));
    assert_eq!(cfg.data.dataset, DatasetKind::FashionMnist);
    assert_eq!(cfg.data.seed, 42);
    assert_eq!(cfg.max_packet_bytes, 1 << 20);
    assert_eq!(cfg.keep_alive, Duration::from_secs(30));
    assert_eq!(cfg.cache_dir, PathBuf::from("data/cache"));
}

#[test]
fn flags_override_the_file() {
    let file =
        parse("[client]\nid = \"a\"\n[model]\ndir = \"m\"\n[data]\nnum_clients = 4\nindex = 1\n")
            .unwrap();
    let cfg = EdgeConfig::resolve(
        file,
        &cli(&[
            "--client-id",
            "b",
            "--client-index",
            "3",
            "--broker",
            "mqtt://10.0.0.2",
        ]),
    )
    .unwrap();
    assert_eq!(cfg.client_id, "b");
    assert_eq!(cfg.data.index, 3);
    assert_eq!(cfg.brokers.first().port, 1883);
    assert_eq!(cfg.brokers.first().host, "10.0.0.2");
}

#[test]
fn the_broker_may_be_a_list_of_cluster_nodes_with_one_scheme() {
    let base = ["--client-id", "a", "--model-dir", "m"];
    let with = |url: &str| {
        let mut args = base.to_vec();
        args.extend(["--broker", url]);
        EdgeConfig::resolve(EdgeFile::default(), &cli(&args))
    };
    let cfg = with("mqtt://n2:1884,mqtt://n3:1885,mqtt://n1").unwrap();
    assert_eq!(
        cfg.brokers.to_string(),
        "mqtt://n2:1884,mqtt://n3:1885,mqtt://n1:1883"
    );
    // The file's key takes the same list.
    let file = parse(
        "[client]\nid = \"a\"\n[model]\ndir = \"m\"\n[broker]\nurl = \"mqtt://n1, mqtt://n2\"\n",
    )
    .unwrap();
    let cfg = EdgeConfig::resolve(file, &cli(&[])).unwrap();
    assert_eq!(cfg.brokers.len(), 2);
    for (url, says) in [
        ("mqtt://n1,mqtts://n2", "mixes plain and TLS"),
        ("mqtt://n1,", "entry 2 of the list is empty"),
        ("mqtt://n1,n2", "entry 2 of the list"),
    ] {
        let msg = with(url).unwrap_err().to_string();
        assert!(
            msg.contains("broker.url") && msg.contains(says),
            "{url}: {msg}"
        );
    }
}

#[test]
fn an_unknown_key_is_rejected_with_its_name() {
    let err = parse("[client]\nid = \"a\"\nfleat = \"x\"\n").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("fleat"), "{msg}");
    assert!(msg.contains("edge.toml"), "{msg}");
    let err = parse("[brokr]\nurl = \"mqtt://x\"\n").unwrap_err();
    assert!(err.to_string().contains("brokr"), "{err}");
}

#[test]
fn a_missing_client_id_names_the_field_and_the_flag() {
    let err = EdgeConfig::resolve(EdgeFile::default(), &cli(&["--model-dir", "m"])).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Missing {
                field: "client.id",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--client-id"));
}

#[test]
fn a_shard_index_outside_the_fleet_is_rejected() {
    let err = EdgeConfig::resolve(
        EdgeFile::default(),
        &cli(&[
            "--client-id",
            "a",
            "--model-dir",
            "m",
            "--num-clients",
            "4",
            "--client-index",
            "4",
        ]),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                field: "data.index",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn client_ids_that_would_break_topics_are_rejected() {
    for bad in ["a/b", "a+b", "#", "", "x".repeat(33).as_str(), "é"] {
        let err = EdgeConfig::resolve(
            EdgeFile::default(),
            &cli(&["--client-id", bad, "--model-dir", "m"]),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "client.id",
                    ..
                }
            ),
            "{bad}: {err}"
        );
    }
}

#[test]
fn out_of_range_numbers_are_rejected() {
    let base = ["--client-id", "a", "--model-dir", "m"];
    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        EdgeConfig::resolve(EdgeFile::default(), &cli(&v))
    };
    assert!(with(&["--max-packet-bytes", "100"]).is_err());
    assert!(with(&["--alpha", "0"]).is_err());
    assert!(with(&["--num-clients", "0"]).is_err());
    assert!(with(&["--max-examples", "0"]).is_err());
    assert!(with(&["--image-size", "8"]).is_err());
    let err = with(&["--peft", "loar"]).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                field: "model.peft",
                ..
            }
        ),
        "{err}"
    );
    let file = parse("[reconnect]\njitter = 1.5\n").unwrap();
    assert!(EdgeConfig::resolve(file, &cli(&base)).is_err());
    let file = parse("[reconnect]\ninitial_ms = 1000\nmax_ms = 10\n").unwrap();
    assert!(EdgeConfig::resolve(file, &cli(&base)).is_err());
}

#[test]
fn faults_come_from_the_file_or_flags_and_bad_values_name_their_key() {
    let base = ["--client-id", "a", "--model-dir", "m"];
    let cfg = EdgeConfig::resolve(EdgeFile::default(), &cli(&base)).unwrap();
    assert_eq!(cfg.faults.dropout, 0.0);
    assert_eq!(cfg.faults.straggle, Duration::ZERO);
    assert_eq!(cfg.faults.dropout_offline, Duration::from_secs(2));
    let file = parse(
        "[faults]
dropout = 0.3
dropout_offline_secs = 0.5
straggle_secs = 4
",
    )
    .unwrap();
    let cfg = EdgeConfig::resolve(file.clone(), &cli(&base)).unwrap();
    assert_eq!(cfg.faults.dropout, 0.3);
    assert_eq!(cfg.faults.dropout_offline, Duration::from_millis(500));
    assert_eq!(cfg.faults.straggle, Duration::from_secs(4));
    let mut flags = base.to_vec();
    flags.extend(["--dropout", "0.5", "--straggle-secs", "1"]);
    let cfg = EdgeConfig::resolve(file, &cli(&flags)).unwrap();
    assert_eq!(cfg.faults.dropout, 0.5, "a flag beats the file");
    assert_eq!(cfg.faults.straggle, Duration::from_secs(1));
    for (text, field) in [
        ("[faults]\ndropout = 1.5\n", "faults.dropout"),
        (
            "[faults]\ndropout_offline_secs = -1.0\n",
            "faults.dropout_offline_secs",
        ),
        ("[faults]\nstraggle_secs = nan\n", "faults.straggle_secs"),
        ("[model]\ntrunk_batch = 0\n", "model.trunk_batch"),
    ] {
        let err = EdgeConfig::resolve(parse(text).unwrap(), &cli(&base)).unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { field: f, .. } if f == field),
            "{text}: {err}"
        );
    }
    assert!(parse("[faults]\nvanish = 1\n").is_err());
}

#[test]
fn text_settings_come_from_flags_or_the_file_and_bad_combinations_name_their_key() {
    let base = ["--client-id", "a", "--model-dir", "m"];
    let with = |file: &str, extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        EdgeConfig::resolve(parse(file).unwrap(), &cli(&v))
    };
    let cfg = with(
        "[model]\npeft = \"prompt\"\nprompt_tokens = 8\nmax_seq_len = 64\n\
         [data]\ndataset = \"spam-assassin\"\npartition = \"natural\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(cfg.peft, PeftMethod::Prompt { tokens: 8 });
    assert_eq!(cfg.max_seq_len, Some(64));
    assert_eq!(cfg.data.partition, PartitionKind::Natural);
    let cfg = with(
        "[model]\nmax_seq_len = 64\n",
        &[
            "--max-seq-len",
            "32",
            "--peft",
            "adapter",
            "--bottleneck",
            "8",
            "--dataset",
            "spam-assassin",
        ],
    )
    .unwrap();
    assert_eq!(cfg.max_seq_len, Some(32));
    assert_eq!(cfg.peft, PeftMethod::Adapter { bottleneck: 8 });
    assert_eq!(with("", &[]).unwrap().max_seq_len, None);
    let lora = with(
        "",
        &["--peft", "lora", "--lora-rank", "4", "--lora-alpha", "8"],
    )
    .unwrap();
    assert_eq!(
        lora.peft,
        PeftMethod::Lora {
            rank: 4,
            alpha: 8.0
        }
    );
    for (file, extra, field) in [
        ("", &["--partition", "natural"][..], "data.partition"),
        (
            "[data]\npartition = \"natural\"\n",
            &[][..],
            "data.partition",
        ),
        ("", &["--dataset", "cifar-10"][..], "data.dataset"),
        ("", &["--max-seq-len", "1"][..], "model.max_seq_len"),
        ("[model]\nmax_seq_len = 513\n", &[][..], "model.max_seq_len"),
        (
            "",
            &["--peft", "prompt", "--prompt-tokens", "0"][..],
            "model.prompt_tokens",
        ),
        (
            "",
            &["--peft", "adapter", "--bottleneck", "0"][..],
            "model.bottleneck",
        ),
    ] {
        let err = with(file, extra).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
            "{file:?} {extra:?}: {err}"
        );
        assert!(err.to_string().contains(field), "{err}");
    }
    assert!(parse("[model]\nmax_seq_length = 64\n").is_err());
}

#[test]
fn tls_password_and_keys_are_read_from_files_and_flags_and_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let key = fedpeft_protocol::SigningKey::from_bytes(&[3; 32]).verifying_key();
    let hex = fedpeft_protocol::sign::public_key_hex(&key);
    let pw_arg = pw.display().to_string();
    let base = ["--client-id", "pi-01", "--model-dir", "m"];
    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        EdgeConfig::resolve(EdgeFile::default(), &cli(&v))
    };
    let cfg = with(&[
        "--broker",
        "mqtts://broker.lan",
        "--ca-file",
        "ca.crt",
        "--username",
        "pi-01",
        "--password-file",
        &pw_arg,
        "--signing-key",
        "pi-01.key",
        "--aggregator-key",
        &hex,
    ])
    .unwrap();
    assert!(cfg.brokers.tls());
    assert_eq!(cfg.tls.unwrap().ca_file, PathBuf::from("ca.crt"));
    assert_eq!(
        cfg.credentials,
        Some(("pi-01".to_string(), "hunter2".to_string()))
    );
    assert_eq!(cfg.aggregator_key, Some(key));
    assert_eq!(cfg.signing_key, Some(PathBuf::from("pi-01.key")));
    for (extra, field) in [
        (&["--broker", "mqtts://h"][..], "broker.ca_file"),
        (&["--ca-file", "ca.crt"][..], "broker.ca_file"),
        (&["--aggregator-key", "00"][..], "security.aggregator_key"),
        (
            &["--username", "u", "--password-file", "/nonexistent/pw"][..],
            "broker.password_file",
        ),
    ] {
        let err = with(extra).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
            "{extra:?}: {err}"
        );
    }
    // A password is never a flag.
    assert!(Cli::try_parse_from(["edge-client", "--password", "x"]).is_err());
}

#[test]
fn backoff_grows_exponentially_caps_and_jitters_downwards() {
    let b = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(1000),
        multiplier: 2.0,
        jitter: 0.5,
    };
    assert_eq!(b.delay(0, 0.0), Duration::from_millis(100));
    assert_eq!(b.delay(1, 0.0), Duration::from_millis(200));
    assert_eq!(b.delay(3, 0.0), Duration::from_millis(800));
    assert_eq!(b.delay(4, 0.0), Duration::from_millis(1000));
    assert_eq!(b.delay(40, 0.0), Duration::from_millis(1000));
    assert_eq!(b.delay(2, 1.0), Duration::from_millis(200));
    let mid = b.delay(2, 0.5);
    assert!(mid > Duration::from_millis(200) && mid < Duration::from_millis(400));
}

#[test]
fn the_aggregators_own_keys_of_the_shared_tables_are_refused_by_name() {
    let base = ["--client-id", "a", "--model-dir", "m"];
    for (text, field) in [
        ("[broker]\nhost = \"0.0.0.0\"\n", "broker.host"),
        ("[broker]\nport = 1884\n", "broker.port"),
        ("[broker]\nclient_id = \"agg\"\n", "broker.client_id"),
        (
            "[broker]\nreceive_buffer_bytes = 65536\n",
            "broker.receive_buffer_bytes",
        ),
        (
            "[security]\nenrolled_keys = \"keys.toml\"\n",
            "security.enrolled_keys",
        ),
    ] {
        let err = EdgeConfig::resolve(parse(text).unwrap(), &cli(&base)).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
            "{text}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(field) && msg.contains("aggregator"), "{msg}");
    }
    // What both sides read is accepted from an edge client's file.
    let cfg = EdgeConfig::resolve(
        parse("[broker]\nurl = \"mqtt://h:1884\"\nkeep_alive_secs = 10\n").unwrap(),
        &cli(&base),
    )
    .unwrap();
    assert_eq!(
        (cfg.brokers.first().port, cfg.keep_alive),
        (1884, Duration::from_secs(10))
    );
}

#[test]
fn own_data_needs_a_root_and_the_fleets_classes_and_trains_on_all_of_it_by_default() {
    let base = ["--client-id", "a", "--model-dir", "m"];
    let with = |file: &str, extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        EdgeConfig::resolve(parse(file).unwrap(), &cli(&v))
    };
    let cfg = with(
        "[data]\ndataset = \"image-folder\"\nroot = \"/photos\"\nclasses = [\"cat\", \"dog\"]\n",
        &[],
    )
    .unwrap();
    assert_eq!(cfg.data.dataset, DatasetKind::ImageFolder);
    assert_eq!(cfg.data.partition, PartitionKind::Whole);
    assert_eq!(
        cfg.data.source,
        DataSource::Own {
            data: fedpeft_backbone::data::OwnData::ImageFolder {
                root: PathBuf::from("/photos")
            },
            classes: vec!["cat".into(), "dog".into()],
        }
    );
    // Flags alone do it too; a simulated split is still possible.
    let cfg = with(
        "",
        &[
            "--dataset",
            "csv",
            "--data-root",
            "t.csv",
            "--classes",
            "ham,spam",
            "--partition",
            "iid",
            "--num-clients",
            "4",
        ],
    )
    .unwrap();
    assert_eq!(
        cfg.data.classes(),
        Some(&["ham".to_string(), "spam".to_string()][..])
    );
    assert_eq!(cfg.data.partition, PartitionKind::Iid);
    // IDX labels are found beside MNIST-named images, or named.
    let cfg = with(
        "[data]\ndataset = \"idx\"\nroot = \"d/train-images-idx3-ubyte.gz\"\nclasses = [\"0\", \"1\"]\n",
        &[],
    )
    .unwrap();
    let DataSource::Own {
        data: fedpeft_backbone::data::OwnData::Idx { labels, .. },
        ..
    } = cfg.data.source
    else {
        panic!("{:?}", cfg.data.source)
    };
    assert_eq!(labels, PathBuf::from("d/train-labels-idx1-ubyte.gz"));
    let cfg = with(
        "[data]\ndataset = \"jsonl\"\nroot = \"t.jsonl\"\ntext_column = \"body\"\nclasses = [\"a\", \"b\"]\n",
        &[],
    )
    .unwrap();
    let DataSource::Own {
        data: fedpeft_backbone::data::OwnData::Jsonl { columns, .. },
        ..
    } = cfg.data.source
    else {
        panic!("{:?}", cfg.data.source)
    };
    assert_eq!(
        (columns.text.as_str(), columns.label.as_str()),
        ("body", "label")
    );
    assert_eq!(
        with("", &["--partition", "none"]).unwrap().data.partition,
        PartitionKind::Whole
    );
}

#[test]
fn bad_own_data_settings_name_their_key() {
    let base = ["--client-id", "a", "--model-dir", "m"];
    let classes = "classes = [\"cat\", \"dog\"]\n";
    for (file, extra, field, words) in [
        (
            format!("[data]\ndataset = \"image-folder\"\n{classes}"),
            &[][..],
            "data.root",
            "required",
        ),
        (
            "[data]\ndataset = \"image-folder\"\nroot = \"p\"\n".to_string(),
            &[][..],
            "data.classes",
            "model.classes",
        ),
        (
            "[data]\ndataset = \"csv\"\nroot = \"p\"\nclasses = [\"cat\"]\n".to_string(),
            &[][..],
            "data.classes",
            "at least 2",
        ),
        (
            "".to_string(),
            &[
                "--dataset",
                "image-folder",
                "--data-root",
                "p",
                "--classes",
                "a,a",
            ][..],
            "data.classes",
            "twice",
        ),
        (
            format!("[data]\n{classes}"),
            &[][..],
            "data.classes",
            "fashion-mnist",
        ),
        (
            format!("[data]\ndataset = \"idx\"\nroot = \"pics.idx\"\n{classes}"),
            &[][..],
            "data.labels",
            "images-idx3",
        ),
        (
            format!("[data]\ndataset = \"csv\"\nroot = \"t.csv\"\nlabels = \"l\"\n{classes}"),
            &[][..],
            "data.labels",
            "idx",
        ),
        (
            format!(
                "[data]\ndataset = \"image-folder\"\nroot = \"p\"\ntext_column = \"t\"\n{classes}"
            ),
            &[][..],
            "data.text_column",
            "csv or jsonl",
        ),
        (
            format!(
                "[data]\ndataset = \"csv\"\nroot = \"t.csv\"\nlabel_column = \"text\"\n{classes}"
            ),
            &[][..],
            "data.label_column",
            "also the text column",
        ),
        (
            format!(
                "[data]\ndataset = \"csv\"\nroot = \"t.csv\"\npartition = \"natural\"\n{classes}"
            ),
            &[][..],
            "data.partition",
            "natural",
        ),
        (
            "".to_string(),
            &["--dataset", "folder"][..],
            "data.dataset",
            "image-folder",
        ),
    ] {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        let err = EdgeConfig::resolve(parse(&file).unwrap(), &cli(&v)).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
            "{file:?} {extra:?}: {err}"
        );
        assert!(err.to_string().contains(words), "{file:?}: {err}");
    }
}
