//! A signed trial's keys (`signed = true`): made fresh for each run in `<out>/keys/`.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::trial::Trial;

/// Where a signed trial's keys live: `<out>/keys/{aggregator.key, <client>.key, enrolled.toml}`.
pub(super) fn keys_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("keys")
}

/// A new Ed25519 key from the operating system's randomness.
fn new_key() -> anyhow::Result<fedpeft_protocol::SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
    Ok(fedpeft_protocol::SigningKey::from_bytes(&seed))
}

/// A signed trial's keys, made fresh for each run: the aggregator's and every client's secret
/// key (owner-only files) and the enrolment file mapping each client id to its public key.
/// Returns the aggregator's public key (hex), which every client is given.
pub fn make_keys(trial: &Trial, out_dir: &Path) -> anyhow::Result<String> {
    use fedpeft_protocol::sign::{public_key_hex, write_signing_key};
    let dir = keys_dir(out_dir);
    // Secret key files are never overwritten: a rerun into the same folder starts afresh.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let aggregator = new_key()?;
    write_signing_key(&dir.join("aggregator.key"), &aggregator)?;
    let mut enrolled = String::from("[clients]\n");
    for index in 0..trial.clients {
        let id = trial.client_id(index);
        let key = new_key()?;
        write_signing_key(&dir.join(format!("{id}.key")), &key)?;
        enrolled.push_str(&format!(
            "{id} = \"{}\"\n",
            public_key_hex(&key.verifying_key())
        ));
    }
    let path = dir.join("enrolled.toml");
    std::fs::write(&path, enrolled).with_context(|| format!("writing {}", path.display()))?;
    Ok(public_key_hex(&aggregator.verifying_key()))
}
