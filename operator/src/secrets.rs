//! The Secrets of Edges: the shared secret (referenced, or generated once) and the connection
//! token the operator writes for whoever runs the edge.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use rand::RngCore;
use remoteingress_controlplane::pb;
use sha2::{Digest, Sha256};

use crate::compose::{ObjectKey, Refused};
use crate::crd::Edge;
use crate::hubs::Admin;
use crate::plan::TokenWrite;

/// The key of a shared secret when a reference names none, and of generated secrets.
const SECRET_KEY: &str = "secret";
/// The label of every Secret the operator reads (its own, and those `secretRef` names): it
/// watches only these, instead of reading a Secret per Edge on every pass.
pub const SECRET_LABEL: &str = "remoteingress.dev/secret";
/// The key of the connection token in the token Secret.
const TOKEN_KEY: &str = "token";

/// The Secret an Edge's generated shared secret lives in.
pub fn secret_name(edge: &str) -> String {
    format!("{edge}-secret")
}

/// The Secret an Edge's connection token is written to.
pub fn token_secret_name(edge: &str) -> String {
    format!("{edge}-token")
}

/// A short digest of a secret, to tell when it changed.
pub fn digest(secret: &str) -> String {
    hex::encode(&Sha256::digest(secret.as_bytes())[..12])
}

/// Each Edge's shared secret from the watched Secrets, or why it has none (missing, unusable,
/// not labelled, a Secret of that name that is not the Edge's); an Edge without a reference
/// gets a random one, created here once. An API failure fails the whole read, so that no edge
/// is ever dropped for a moment's error.
pub async fn edge_secrets(
    client: &Client,
    edges: &[Arc<Edge>],
    watched: &Store<Secret>,
) -> Result<HashMap<ObjectKey, Result<String, Refused>>, kube::Error> {
    let mut secrets = HashMap::new();
    for edge in edges {
        let namespace = edge.namespace().unwrap_or_default();
        let find = |name: &str| watched.get(&ObjectRef::new(name).within(&namespace));
        let secret = match &edge.spec.secret_ref {
            Some(reference) => {
                let key = reference.key.as_deref().unwrap_or(SECRET_KEY);
                let name = &reference.name;
                match find(name) {
                    Some(secret) => text(&secret, name, key),
                    None => Err(format!(
                        "Secret {name} does not exist or lacks the label {SECRET_LABEL} (the \
                         operator reads only Secrets that carry it)"
                    )),
                }
                .map_err(Refused::Invalid)
            }
            None => {
                let name = secret_name(&edge.name_any());
                match find(&name) {
                    Some(secret) if owned_by(&secret, edge) => {
                        text(&secret, &name, SECRET_KEY).map_err(Refused::Invalid)
                    }
                    Some(_) => Err(foreign(&name)),
                    None => {
                        let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
                        generated(&api, edge).await?
                    }
                }
            }
        };
        secrets.insert(crate::compose::key_of(edge.as_ref()), secret);
    }
    Ok(secrets)
}

/// The text under `key` of a Secret.
fn text(secret: &Secret, name: &str, key: &str) -> Result<String, String> {
    let value = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .ok_or_else(|| format!("Secret {name} has no key {key:?}"))?;
    String::from_utf8(value.0.clone()).map_err(|_| format!("Secret {name} key {key:?} is not text"))
}

/// Whether `secret` is controlled by `edge` (made for it by the operator).
fn owned_by(secret: &Secret, edge: &Edge) -> bool {
    let uid = edge.uid();
    secret
        .owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && Some(&owner.uid) == uid.as_ref())
}

/// The conflict of an Edge with a Secret of the name it needs that is not its own.
fn foreign(name: &str) -> Refused {
    Refused::Conflict(format!(
        "Secret {name} exists and does not belong to this Edge; it is left untouched"
    ))
}

/// The Edge's generated secret, not among the watched Secrets: created with a random value,
/// or, if a Secret of that name exists (made by an earlier version without the label, or not
/// yet seen by the watch), labelled and read if it is the Edge's. A Secret of that name that
/// is not the Edge's is never read.
async fn generated(api: &Api<Secret>, edge: &Edge) -> Result<Result<String, Refused>, kube::Error> {
    let name = secret_name(&edge.name_any());
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    let object = owned_secret(edge, &name, SECRET_KEY, &secret);
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {
            tracing::info!(edge = %edge.name_any(), secret = %name, "generated the edge's secret");
            return Ok(Ok(secret));
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error),
    }
    let Some(existing) = api.get_opt(&name).await? else {
        return Ok(Err(Refused::Invalid(format!(
            "Secret {name} was deleted while being created; retrying"
        ))));
    };
    if !owned_by(&existing, edge) {
        return Ok(Err(foreign(&name)));
    }
    let label = serde_json::json!({"metadata": {"labels": {SECRET_LABEL: "true"}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&label))
        .await?;
    Ok(text(&existing, &name, SECRET_KEY).map_err(Refused::Invalid))
}

/// A Secret owned by the Edge (deleted with it), holding `value` under `key`.
fn owned_secret(edge: &Edge, name: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: edge.namespace(),
            owner_references: edge.controller_owner_ref(&()).map(|o| vec![o]),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    crate::MANAGER.to_owned(),
                ),
                (SECRET_LABEL.to_owned(), "true".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_owned(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// Why a connection token was not written.
#[derive(Debug)]
pub enum TokenError {
    /// A Secret of the token's name exists that is not the Edge's: left untouched.
    Foreign(Refused),
    /// The hub or the API failed; tried again later.
    Failed(String),
}

/// Asks the hub (`admin`) for the edge's connection token and writes it to the token Secret,
/// creating it, or updating it if it is the Edge's own; a foreign Secret is never touched.
/// The watched Secrets tell which exist: the Edge's own carry the label.
pub async fn write_token(
    client: &Client,
    watched: &Store<Secret>,
    mut admin: Admin,
    token: &TokenWrite,
) -> Result<(), TokenError> {
    let edge = token.edge.as_ref();
    let namespace = edge.namespace().unwrap_or_default();
    let name = token_secret_name(&edge.name_any());
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let failed = |what: String| TokenError::Failed(what);
    let existing = watched.get(&ObjectRef::new(&name).within(&namespace));
    if existing
        .as_ref()
        .is_some_and(|secret| !owned_by(secret, edge))
    {
        return Err(TokenError::Foreign(foreign(&name)));
    }
    let connection_token = admin
        .create_connection_token(pb::CreateConnectionTokenRequest {
            edge_id: token.edge_id.clone(),
            secret: token.secret.clone(),
            ..pb::CreateConnectionTokenRequest::default()
        })
        .await
        .map_err(|e| failed(format!("the hub: {}", e.message())))?
        .into_inner()
        .token;
    let object = owned_secret(edge, &name, TOKEN_KEY, &connection_token);
    let written = match existing {
        // Created only if absent: a Secret of that name not among the watched ones (no
        // label: someone else's, or ours not yet seen) is looked at, never overwritten.
        None => match api.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(status)) if status.code == 409 => match api.get_opt(&name).await {
                Ok(Some(secret)) if !owned_by(&secret, edge) => {
                    return Err(TokenError::Foreign(foreign(&name)))
                }
                Ok(_) => apply(&api, &name, &object).await,
                Err(error) => Err(error),
            },
            other => other.map(drop),
        },
        Some(_) => apply(&api, &name, &object).await,
    };
    written.map_err(|e| failed(format!("writing Secret {name}: {e}")))?;
    tracing::info!(edge = %token.edge_id, secret = %name, "wrote the connection token");
    Ok(())
}

/// Writes one of the Edge's own Secrets by server-side apply.
async fn apply(api: &Api<Secret>, name: &str, object: &Secret) -> Result<(), kube::Error> {
    api.patch(
        name,
        &PatchParams::apply(crate::MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map(drop)
}
