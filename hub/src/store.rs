//! The allowed-edge set on disk: one JSON file in the state directory, written atomically
//! (temporary file, fsync, rename), with secrets only as salted hashes.

use std::io::Write;
use std::path::Path;

use remoteingress_wire::EdgeConfig;
use serde::{Deserialize, Serialize};

use crate::{HubError, PortTargets};

/// Format version of the state file.
const FORMAT: u32 = 1;

/// One edge as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredEdge {
    pub(crate) id: String,
    pub(crate) secret_hash: String,
    pub(crate) config: EdgeConfig,
    #[serde(flatten)]
    pub(crate) targets: PortTargets,
    /// The configuration's generation (0 in files written before generations existed).
    #[serde(default)]
    pub(crate) generation: u64,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: u32,
    edges: Vec<StoredEdge>,
}

fn state_error(path: &Path, message: impl std::fmt::Display) -> HubError {
    HubError::State {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Reads the state file; a missing file is an empty set, anything unreadable is an error.
pub(crate) fn load(path: &Path) -> Result<Vec<StoredEdge>, HubError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(state_error(path, e)),
    };
    let file: StateFile = serde_json::from_str(&text).map_err(|e| {
        state_error(
            path,
            format!("{e}; the file is corrupt — restore it or move it away to start with no edges"),
        )
    })?;
    if file.format != FORMAT {
        return Err(state_error(
            path,
            format!("unsupported format {}", file.format),
        ));
    }
    Ok(file.edges)
}

/// Replaces the state file with `edges`; the previous file stays whole if this fails.
pub(crate) fn save(path: &Path, edges: Vec<StoredEdge>) -> Result<(), HubError> {
    let json = serde_json::to_vec_pretty(&StateFile {
        format: FORMAT,
        edges,
    })
    .map_err(|e| state_error(path, e))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| state_error(dir, e))?;
    }
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        state_error(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edges.json");
        assert_eq!(load(&path).unwrap(), vec![]);
        let edge = StoredEdge {
            id: "e1".into(),
            secret_hash: "sha256:00:00".into(),
            config: EdgeConfig::default(),
            targets: PortTargets {
                ports: BTreeMap::from([(80, 8080)]),
                hosts: BTreeMap::from([(443, "10.96.0.7".into())]),
            },
            generation: 7,
        };
        save(&path, vec![edge.clone()]).unwrap();
        assert_eq!(load(&path).unwrap(), vec![edge]);
        std::fs::write(&path, "{\"format\":1,\"edges\":[").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("edges.json"),
            "{err}"
        );
    }
}
