//! The example config shipped in every board bundle (cross/edge.example.toml, filled in by the
//! bundle's install.sh) is one the edge client accepts, with the settings the book's
//! "On the device" walk-through relies on.

use std::path::Path;

use clap::Parser;
use fedpeft_edge::config::{Cli, EdgeConfig, RuntimeChoice};
use fedpeft_protocol::PeftMethod;

#[test]
fn the_bundled_example_config_is_valid_once_installed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("cross/edge.example.toml")).unwrap();
    // What install.sh does with PREFIX=/usr/local (the default).
    let filled = text
        .replace("@PREFIX@", "/usr/local")
        .replace("@SYSCONFDIR@", "/etc/fedpeft");
    assert!(
        !filled.contains('@'),
        "a placeholder install.sh does not fill"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, filled).unwrap();

    let cli = Cli::try_parse_from(["edge-client", "--config", path.to_str().unwrap()]).unwrap();
    let cfg = EdgeConfig::from_cli(&cli).unwrap();
    assert_eq!(cfg.client_id, "pi-01");
    assert_eq!(cfg.fleet, "fedpeft");
    assert_eq!(
        (cfg.brokers.first().host.as_str(), cfg.brokers.first().port),
        ("aggregator.local", 1883)
    );
    assert_eq!(
        cfg.model_dir,
        Path::new("/usr/local/share/fedpeft/models/efficientnet-lite0")
    );
    assert_eq!(cfg.runtime, RuntimeChoice::Auto);
    assert!(matches!(cfg.peft, PeftMethod::Lora { rank: 8, .. }));
    assert_eq!(cfg.data.max_examples, Some(500));
    // The unit's CacheDirectory= and StateDirectory=: the only writable places it has.
    assert_eq!(cfg.cache_dir, Path::new("/var/cache/fedpeft"));
    assert_eq!(
        cfg.summary_json.as_deref(),
        Some(Path::new("/var/lib/fedpeft/summary.json"))
    );

    // The same file with a flag on top: the per-board edit people make most.
    let cli = Cli::try_parse_from([
        "edge-client",
        "--config",
        path.to_str().unwrap(),
        "--client-id",
        "pi-07",
        "--client-index",
        "6",
    ])
    .unwrap();
    let cfg = EdgeConfig::from_cli(&cli).unwrap();
    assert_eq!((cfg.client_id.as_str(), cfg.data.index), ("pi-07", 6));
}
