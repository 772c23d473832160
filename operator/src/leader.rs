//! Leader election with a `coordination.k8s.io` Lease, so the operator can run several
//! replicas: one holds the lease and writes, the others wait to take over when it stops
//! renewing. A replica that loses the lease stops at once (Kubernetes restarts it as a
//! follower), so two replicas never write at the same time for longer than a renewal.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::chrono::{DateTime, Utc};
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio_util::sync::CancellationToken;

/// A lease not renewed for this long may be taken over.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and a follower tries.
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Where the lease lives and who we are.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    /// The Lease's namespace (the operator's own).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
}

/// What a look at the lease decided.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Nobody holds it (or its holder stopped renewing): take it with this spec.
    Take(LeaseSpec),
    /// We hold it: renew it with this spec.
    Renew(LeaseSpec),
    /// Someone else holds it.
    Wait,
}

/// Pure: what `identity` should do with the lease `current` at `now`.
pub(crate) fn decide(current: Option<&LeaseSpec>, identity: &str, now: DateTime<Utc>) -> Decision {
    let duration = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(i32::MAX);
    let ours = current.and_then(|spec| spec.holder_identity.as_deref()) == Some(identity);
    let free = current.is_none_or(|spec| {
        let held_for = spec.lease_duration_seconds.map_or(LEASE_DURATION, |secs| {
            Duration::from_secs(secs.max(0) as u64)
        });
        let renewed = spec.renew_time.as_ref().map(|t| t.0);
        spec.holder_identity.is_none()
            || renewed.is_none_or(|at| {
                now.signed_duration_since(at).to_std().unwrap_or_default() >= held_for
            })
    });
    let transitions = current.and_then(|spec| spec.lease_transitions).unwrap_or(0);
    let spec = |acquired: Option<MicroTime>, transitions: i32| LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(duration),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    if ours {
        let acquired = current.and_then(|spec| spec.acquire_time.clone());
        Decision::Renew(spec(acquired, transitions))
    } else if free {
        Decision::Take(spec(None, transitions + 1))
    } else {
        Decision::Wait
    }
}

impl LeaderElection {
    fn api(&self, client: &kube::Client) -> Api<Lease> {
        Api::namespaced(client.clone(), &self.namespace)
    }

    /// One look at the lease: true if we hold it afterwards. A write that lost a race (the
    /// lease changed meanwhile) is a plain false.
    async fn try_hold(&self, api: &Api<Lease>) -> Result<bool, kube::Error> {
        let lease = api.get_opt(&self.name).await?;
        let decision = decide(
            lease.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            Utc::now(),
        );
        let spec = match decision {
            Decision::Wait => return Ok(false),
            Decision::Take(spec) | Decision::Renew(spec) => spec,
        };
        let written = match lease {
            Some(mut lease) => {
                lease.spec = Some(spec);
                api.replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                api.create(&PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Gives the lease up (on a clean shutdown), so that a stand-by takes over at once rather
    /// than after [`LEASE_DURATION`]. Best effort: a failure only delays the takeover.
    pub async fn release(&self, client: &kube::Client) {
        let api = self.api(client);
        let released = async {
            let Some(mut lease) = api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            api.replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(drop)
        };
        match released.await {
            Ok(()) => tracing::info!(lease = %self.name, "gave the lease up"),
            Err(error) => tracing::warn!(%error, lease = %self.name, "giving the lease up"),
        }
    }

    /// Waits until this replica holds the lease (or `stop`), then keeps renewing it in the
    /// background; the token returned is cancelled when the lease is lost or `stop` fires.
    pub async fn lead(
        &self,
        client: &kube::Client,
        stop: &CancellationToken,
    ) -> Option<CancellationToken> {
        let api = self.api(client);
        loop {
            match self.try_hold(&api).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, lease = %self.name, "leader election"),
            }
            tokio::select! {
                () = tokio::time::sleep(RENEW_EVERY) => {}
                () = stop.cancelled() => return None,
            }
        }
        tracing::info!(identity = %self.identity, lease = %self.name, "leading");
        let leading = stop.child_token();
        let renewing = leading.clone();
        let election = self.clone();
        tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(RENEW_EVERY) => {}
                    () = renewing.cancelled() => return,
                }
                match election.try_hold(&api).await {
                    Ok(true) => renewed = tokio::time::Instant::now(),
                    Ok(false) => {
                        tracing::error!(lease = %election.name, "another replica took the lease: stopping");
                        renewing.cancel();
                        return;
                    }
                    Err(error) if renewed.elapsed() + RENEW_EVERY >= LEASE_DURATION => {
                        tracing::error!(%error, lease = %election.name, "cannot renew the lease before it runs out: stopping");
                        renewing.cancel();
                        return;
                    }
                    Err(error) => tracing::warn!(%error, "renewing the lease; retrying"),
                }
            }
        });
        Some(leading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn held_by(who: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(0))),
            lease_transitions: Some(1),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_free_lease_is_taken_a_held_one_waited_for_an_expired_one_taken_over() {
        assert!(matches!(decide(None, "a", at(0)), Decision::Take(_)));
        let held = held_by("b", 10);
        assert_eq!(decide(Some(&held), "a", at(20)), Decision::Wait);
        let Decision::Take(taken) = decide(Some(&held), "a", at(25)) else {
            panic!("b stopped renewing 15 s ago");
        };
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(2));
        let Decision::Renew(renewed) = decide(Some(&held), "b", at(20)) else {
            panic!("the holder renews");
        };
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(0))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(20))));
    }
}
