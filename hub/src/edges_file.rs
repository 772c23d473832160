//! The declarative edges file: reading it (JSON or TOML), and following it so that no write is
//! ever missed. Changes are noticed by the kernel (inotify on the file's directory, which also
//! sees an atomic rename and a Kubernetes ConfigMap's `..data` swap) and by a periodic check as
//! fallback; either way the file's content is compared by digest, never its modification time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{validate_all, AllowedEdge, HubError, HubEvent, HubHandle};

/// An edges file as read.
#[derive(Debug, Clone)]
pub struct EdgesFileContent {
    /// The edges, each with the file's generation unless it has its own.
    pub edges: Vec<AllowedEdge>,
    /// The file's `generation`, if it has one.
    pub generation: Option<u64>,
    /// SHA-256 of the file's bytes, in hex.
    pub digest: String,
}

/// An edges file as an object: the edges and, optionally, the generation of all of them.
#[derive(Deserialize)]
struct EdgesFileShape {
    #[serde(default)]
    generation: Option<u64>,
    #[serde(default)]
    edges: Vec<AllowedEdge>,
}

/// Reads an edges file: JSON (an array of edges, or `{"generation": N, "edges": [...]}`) or TOML
/// (`generation = N` and `[[edges]]` tables), by extension. An edge without its own
/// `generation` gets the file's; without either, the hub counts changes (one hub only).
pub fn load_edges_file(path: &Path) -> Result<EdgesFileContent, HubError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    parse_edges_file(path, &bytes, digest_of(&bytes))
}

/// SHA-256 of an edges file's bytes, in hex.
fn digest_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> HubError {
    HubError::EdgesFile {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Parses the bytes (whose digest is `digest`) of the edges file at `path`; its extension tells
/// TOML from JSON.
fn parse_edges_file(
    path: &Path,
    bytes: &[u8],
    digest: String,
) -> Result<EdgesFileContent, HubError> {
    let text = std::str::from_utf8(bytes).map_err(|e| file_error(path, e))?;
    let parsed = if path.extension().is_some_and(|ext| ext == "toml") {
        toml::from_str::<EdgesFileShape>(text).map_err(|e| e.to_string())
    } else if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<AllowedEdge>>(text)
            .map(|edges| EdgesFileShape {
                generation: None,
                edges,
            })
            .map_err(|e| e.to_string())
    } else {
        serde_json::from_str::<EdgesFileShape>(text).map_err(|e| e.to_string())
    };
    let EdgesFileShape { generation, edges } = parsed.map_err(|e| file_error(path, e))?;
    let edges: Vec<AllowedEdge> = edges
        .into_iter()
        .map(|mut edge| {
            edge.config.generation = edge.config.generation.or(generation);
            edge
        })
        .collect();
    validate_all(&edges)?;
    Ok(EdgesFileContent {
        edges,
        generation,
        digest,
    })
}

/// What the follower last saw at the path.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Content with this digest.
    Content(String),
    /// A file that could not be read, for this reason.
    Unreadable(String),
}

/// Time without further notifications before a changed file is read, so that a write in
/// several steps is read once it is whole.
const SETTLE: Duration = Duration::from_millis(50);
/// Longest a read waits for notifications to settle.
const SETTLE_AT_MOST: Duration = Duration::from_secs(1);

impl HubHandle {
    /// Follows the edges file at `path`: applies it now (an error leaves the hub unchanged and
    /// is returned), then applies every change of its content, noticed by the kernel or by a
    /// check every `poll`. Each change is logged with its digest and generation, counted in
    /// `remoteingress_config_reloads_total{result}` and announced as
    /// [`HubEvent::ConfigReloaded`]; a rejected one keeps the previous edges.
    pub async fn watch_edges_file(&self, path: PathBuf, poll: Duration) -> Result<(), HubError> {
        let content = load_edges_file(&path)?;
        let digest = content.digest.clone();
        self.apply_edges_file(&path, content).await?;
        let (notified, notifications) = mpsc::channel(1);
        let watcher = watch_directory(&path, notified);
        let hub = self.clone();
        let task = tokio::spawn(async move {
            let _watcher = watcher;
            follow(&hub, &path, poll, notifications, Seen::Content(digest)).await;
        });
        self.inner.track(task);
        Ok(())
    }

    /// Applies one reading of the edges file; logs and reports it either way.
    async fn apply_edges_file(
        &self,
        path: &Path,
        content: EdgesFileContent,
    ) -> Result<(), HubError> {
        let EdgesFileContent {
            edges,
            generation,
            digest,
        } = content;
        let count = edges.len();
        let result = match self.replica_without_generation(&edges) {
            Some(edge) => Err(file_error(
                path,
                format!(
                    "edge {edge:?} has no generation: a hub running as one of several replicas \
                     (--replica or --peer) needs `\"generation\": N` in the edges file (or on \
                     every edge), raised with every change, so that every replica gives the \
                     same content the same generation"
                ),
            )),
            None => self.update_allowed_edges(edges).await,
        };
        self.report_reload(path, digest, generation, count, &result);
        result
    }

    /// In replica mode, the first edge that names no generation.
    fn replica_without_generation<'a>(&self, edges: &'a [AllowedEdge]) -> Option<&'a str> {
        let replica = self.inner.options.replica;
        edges
            .iter()
            .find(|edge| replica && edge.config.generation.is_none())
            .map(|edge| edge.id.as_str())
    }

    fn report_reload(
        &self,
        path: &Path,
        digest: String,
        generation: Option<u64>,
        edges: usize,
        result: &Result<(), HubError>,
    ) {
        let label = match result {
            Ok(()) => {
                tracing::info!(path = %path.display(), %digest, ?generation, edges, "edges file applied");
                "applied"
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %digest, %error, "edges file rejected; keeping the previous edges");
                "rejected"
            }
        };
        let metrics = &self.inner.metrics;
        metrics.config_reloads.with_label_values(&[label]).inc();
        metrics.config_reload_ok.set(i64::from(result.is_ok()));
        self.inner.emit(HubEvent::ConfigReloaded {
            path: path.display().to_string(),
            digest,
            generation,
            edges,
            error: result.as_ref().err().map(ToString::to_string),
        });
    }
}

/// Asks the kernel to tell about changes in the directory of `path`; `None` (with a warning)
/// where it cannot, and the periodic check alone follows the file.
fn watch_directory(path: &Path, notified: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let watched = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| !announces_a_change(&event.kind)) {
            return;
        }
        // A full channel already holds a notification that leads to a check.
        let _ = notified.try_send(());
    })
    .and_then(|mut watcher| {
        watcher.watch(directory, notify::RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match watched {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(directory = %directory.display(), %error, "cannot watch the edges file's directory; checking it periodically only");
            None
        }
    }
}

/// Whether a notification may mean new content: not a file being opened (the hub's own reads
/// included, which would otherwise wake it again and again), nor data being written, which is
/// read once the writer closes the file (or by the periodic check, if it never does). An error
/// from the watcher counts, so that the file is looked at.
fn announces_a_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    use notify::EventKind;
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Data(_)) => false,
        _ => true,
    }
}

/// Checks the file whenever the kernel tells of a change in its directory and every `poll`,
/// until the hub shuts down.
async fn follow(
    hub: &HubHandle,
    path: &Path,
    poll: Duration,
    mut notifications: mpsc::Receiver<()>,
    mut seen: Seen,
) {
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = hub.inner.shutdown.clone();
    loop {
        tokio::select! {
            Some(()) = notifications.recv() => settle(&mut notifications).await,
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        check(hub, path, &mut seen).await;
    }
}

/// Waits until notifications stop for [`SETTLE`], at most [`SETTLE_AT_MOST`].
async fn settle(notifications: &mut mpsc::Receiver<()>) {
    let deadline = Instant::now() + SETTLE_AT_MOST;
    loop {
        let quiet_until = (Instant::now() + SETTLE).min(deadline);
        match tokio::time::timeout_at(quiet_until, notifications.recv()).await {
            Ok(Some(())) if Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

/// Reads the file and applies it if its content differs from what was last seen.
async fn check(hub: &HubHandle, path: &Path, seen: &mut Seen) {
    let read = tokio::fs::read(path).await;
    let (now, digest) = match &read {
        Ok(bytes) => {
            let digest = digest_of(bytes);
            (Seen::Content(digest.clone()), digest)
        }
        Err(error) => (Seen::Unreadable(error.to_string()), String::new()),
    };
    if now == *seen {
        return;
    }
    *seen = now;
    let parsed = read
        .map_err(|e| file_error(path, e))
        .and_then(|bytes| parse_edges_file(path, &bytes, digest.clone()));
    match parsed {
        // Applying reports the outcome.
        Ok(content) => {
            let _ = hub.apply_edges_file(path, content).await;
        }
        Err(error) => hub.report_reload(path, digest, None, 0, &Err(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn reads_json_and_toml() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("edges.json");
        std::fs::write(
            &json,
            r#"[{"id":"e1","secret":"s","listenPorts":[80],"targetPorts":{"80":8080},
                 "firewallConfig":{"blockedIps":["10.0.0.0/8"]}}]"#,
        )
        .unwrap();
        let edges = load_edges_file(&json).unwrap().edges;
        assert_eq!(edges[0].config.listen_ports, vec![80]);
        assert_eq!(edges[0].targets.ports, BTreeMap::from([(80, 8080)]));

        let toml = dir.path().join("edges.toml");
        std::fs::write(
            &toml,
            "[[edges]]\nid = \"e1\"\nsecret = \"s\"\nlistenPorts = [80, 443]\n[edges.targetPorts]\n80 = 8080\n",
        )
        .unwrap();
        let edges = load_edges_file(&toml).unwrap().edges;
        assert_eq!(edges[0].config.listen_ports, vec![80, 443]);
        assert_eq!(edges[0].targets.ports, BTreeMap::from([(80, 8080)]));
    }

    #[test]
    fn generations_come_from_the_edge_or_the_file_never_from_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("edges.json");
        std::fs::write(
            &json,
            r#"{"generation":7,"edges":[{"id":"e1","secret":"s"},
                                         {"id":"e2","secret":"s","generation":9}]}"#,
        )
        .unwrap();
        let content = load_edges_file(&json).unwrap();
        let generations: Vec<Option<u64>> =
            content.edges.iter().map(|e| e.config.generation).collect();
        assert_eq!(generations, [Some(7), Some(9)]);
        assert_eq!(content.generation, Some(7));

        std::fs::write(&json, r#"[{"id":"e1","secret":"s"}]"#).unwrap();
        let content = load_edges_file(&json).unwrap();
        assert_eq!(
            (content.generation, content.edges[0].config.generation),
            (None, None),
            "left to the hub to count"
        );

        let toml = dir.path().join("edges.toml");
        std::fs::write(
            &toml,
            "generation = 3\n[[edges]]\nid = \"e1\"\nsecret = \"s\"\n",
        )
        .unwrap();
        assert_eq!(
            load_edges_file(&toml).unwrap().edges[0].config.generation,
            Some(3)
        );
    }

    #[test]
    fn the_digest_is_the_contents_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edges.json");
        std::fs::write(&path, "[]").unwrap();
        assert_eq!(
            load_edges_file(&path).unwrap().digest,
            "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"
        );
        std::fs::write(&path, "[ ]").unwrap();
        assert_ne!(
            load_edges_file(&path).unwrap().digest,
            "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"
        );
    }

    #[test]
    fn only_notifications_that_may_mean_new_content_wake_the_follower() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind,
            RenameMode,
        };
        use notify::EventKind;
        for (kind, wakes) in [
            (EventKind::Access(AccessKind::Open(AccessMode::Any)), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                false,
            ),
            (EventKind::Modify(ModifyKind::Data(DataChange::Any)), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                true,
            ),
            (EventKind::Create(CreateKind::Any), true),
            (EventKind::Modify(ModifyKind::Name(RenameMode::To)), true),
            (
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                true,
            ),
            (EventKind::Remove(RemoveKind::Any), true),
            (EventKind::Any, true),
        ] {
            assert_eq!(announces_a_change(&kind), wakes, "{kind:?}");
        }
    }

    #[test]
    fn unreadable_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edges.json");
        let missing = load_edges_file(&path).unwrap_err().to_string();
        assert!(missing.contains("edges.json"), "{missing}");
        std::fs::write(&path, "{\"edges\":[").unwrap();
        let broken = load_edges_file(&path).unwrap_err().to_string();
        assert!(broken.contains("edges.json"), "{broken}");
    }
}
