//! Sending each tunnel the configuration its edge is owed. One pusher per tunnel, so that an
//! edge that stops reading delays only its own pushes, never an admin write or another edge;
//! a change made while a push is pending replaces it (only the newest configuration matters).

use bytes::Bytes;
use remoteingress_tunnel::SessionHandle;
use remoteingress_wire::frame::FrameType;

use crate::registry::OwedConfig;
use crate::{HubEvent, HubInner};

/// Sends every configuration `owed` to the tunnel `session` of `edge_id` until the tunnel ends
/// or the hub forgets it.
pub(crate) async fn push_configs(
    inner: &HubInner,
    edge_id: &str,
    session: &SessionHandle,
    mut owed: OwedConfig,
) {
    loop {
        tokio::select! {
            changed = owed.changed() => if changed.is_err() { return },
            () = session.closed() => return,
        }
        let Some(config) = owed.borrow_and_update().clone() else {
            continue;
        };
        let version = config.version.unwrap_or_default();
        let json = match serde_json::to_vec(&config) {
            Ok(json) => Bytes::from(json),
            Err(error) => {
                tracing::error!(edge = %edge_id, %error, "configuration could not be encoded");
                continue;
            }
        };
        let sent = tokio::select! {
            sent = session.send_control(FrameType::Config, json) => sent.is_ok(),
            () = session.closed() => false,
        };
        if !sent {
            return;
        }
        tracing::info!(edge = %edge_id, version, generation = ?config.generation, "configuration pushed");
        inner
            .metrics
            .config_pushes
            .with_label_values(&[edge_id])
            .inc();
        inner.emit(HubEvent::ConfigPushed {
            edge_id: edge_id.to_owned(),
            version,
        });
    }
}
