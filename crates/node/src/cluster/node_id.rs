//! The node's id: given by flag, else read from the data directory, else generated once and
//! stored there, so a node keeps its Raft identity across restarts without configuration.

use std::path::Path;

use anyhow::{bail, Context};

const FILE: &str = "node-id";

/// Resolves and persists the node id for `data_dir`.
pub fn resolve(data_dir: &Path, configured: Option<u64>) -> anyhow::Result<u64> {
    let path = data_dir.join(FILE);
    let stored = match std::fs::read_to_string(&path) {
        Ok(s) => Some(
            s.trim()
                .parse::<u64>()
                .with_context(|| format!("{} does not hold a node id", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let id = match (stored, configured) {
        (Some(s), Some(c)) if s != c => bail!(
            "--node-id {c} differs from the id {s} this data directory belongs to ({}); \
             a node cannot change its id",
            path.display()
        ),
        (Some(s), _) => s,
        (None, Some(c)) => c,
        // A data directory from before node ids were stored was node 1 (its Raft state says
        // so); only a fresh one gets a random id.
        (None, None) if has_state(data_dir) => 1,
        (None, None) => loop {
            let n: u64 = rand::random::<u64>() >> 1;
            if n != 0 {
                break n;
            }
        },
    };
    if id == 0 {
        bail!("node id 0 is reserved");
    }
    if stored.is_none() {
        std::fs::write(&path, format!("{id}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(id)
}

/// Whether the data directory holds anything besides the node id file.
pub fn has_state(data_dir: &Path) -> bool {
    std::fs::read_dir(data_dir)
        .map(|mut d| d.any(|e| e.map(|e| e.file_name() != FILE).unwrap_or(false)))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = resolve(dir.path(), None).expect("first");
        let b = resolve(dir.path(), None).expect("second");
        assert_eq!(a, b);
        assert_ne!(a, 0);
    }

    #[test]
    fn configured_id_is_stored_and_a_different_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(resolve(dir.path(), Some(7)).expect("set"), 7);
        assert_eq!(resolve(dir.path(), None).expect("read"), 7);
        assert!(resolve(dir.path(), Some(8)).is_err());
    }

    #[test]
    fn old_data_directory_keeps_id_1() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), b"x").expect("write");
        assert_eq!(resolve(dir.path(), None).expect("legacy"), 1);
    }
}
