//! Which configuration the edge runs when several hubs offer one: a newer generation replaces
//! the running configuration, an older one is ignored, and the same generation with different
//! content is a disagreement between hubs that leaves the running configuration in place.

use std::collections::BTreeMap;

use remoteingress_wire::EdgeConfig;

use crate::tunnels::TunnelKey;

/// What to do with an offered configuration, given the running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Newer, the first, or from a hub that gives no generations: apply it.
    Apply,
    /// The content already running: nothing to change.
    Unchanged,
    /// Older than the running generation: ignored.
    Older {
        /// The running generation.
        running: u64,
    },
    /// The running generation with different content: the hubs disagree; the running
    /// configuration stays.
    Disagrees {
        /// The generation both name.
        generation: u64,
    },
}

impl Verdict {
    /// Why the configuration was not applied, for the offering hub; `None` if it is in force.
    pub(crate) fn refusal(self, offered: Option<u64>) -> Option<String> {
        let offered = offered.unwrap_or_default();
        match self {
            Verdict::Apply | Verdict::Unchanged => None,
            Verdict::Older { running } => Some(format!(
                "generation {offered} is older than the running generation {running}"
            )),
            Verdict::Disagrees { generation } => Some(format!(
                "another hub sent a different configuration with the same generation \
                 {generation}; keeping the running one"
            )),
        }
    }
}

/// Judges `offered` against the `running` configuration.
pub(crate) fn judge(running: Option<&EdgeConfig>, offered: &EdgeConfig) -> Verdict {
    let Some(running) = running else {
        return Verdict::Apply;
    };
    if running.same_content(offered) {
        return Verdict::Unchanged;
    }
    match (running.generation, offered.generation) {
        (Some(running), Some(offered)) if offered < running => Verdict::Older { running },
        (Some(running), Some(offered)) if offered == running => Verdict::Disagrees {
            generation: running,
        },
        _ => Verdict::Apply,
    }
}

/// Two or more hubs offering different content under one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    /// The generation they share.
    pub generation: u64,
    /// The hubs (instance ids, or addresses of original hubs).
    pub hubs: Vec<String>,
}

/// The latest configuration each live tunnel's hub offered.
#[derive(Default)]
pub(crate) struct Offers {
    by_tunnel: BTreeMap<TunnelKey, (String, EdgeConfig)>,
}

impl Offers {
    /// Records what `hub` offers over tunnel `key`.
    pub(crate) fn insert(&mut self, key: TunnelKey, hub: &str, config: &EdgeConfig) {
        self.by_tunnel.insert(key, (hub.to_owned(), config.clone()));
    }

    /// Forgets a tunnel's offer.
    pub(crate) fn remove(&mut self, key: TunnelKey) {
        self.by_tunnel.remove(&key);
    }

    /// The highest generation under which live hubs offer different content, if any.
    pub(crate) fn disagreement(&self) -> Option<Disagreement> {
        let mut by_generation: BTreeMap<u64, Vec<&(String, EdgeConfig)>> = BTreeMap::new();
        for offer in self.by_tunnel.values() {
            if let Some(generation) = offer.1.generation {
                by_generation.entry(generation).or_default().push(offer);
            }
        }
        by_generation
            .into_iter()
            .rev()
            .find(|(_, offers)| {
                offers
                    .iter()
                    .any(|(_, config)| !config.same_content(&offers[0].1))
            })
            .map(|(generation, offers)| {
                let mut hubs: Vec<String> = offers.iter().map(|(hub, _)| hub.clone()).collect();
                hubs.sort();
                hubs.dedup();
                Disagreement { generation, hubs }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ports: &[u16], generation: Option<u64>) -> EdgeConfig {
        EdgeConfig {
            listen_ports: ports.to_vec(),
            generation,
            ..EdgeConfig::default()
        }
    }

    #[test]
    fn only_a_newer_generation_replaces_the_running_configuration() {
        let running = config(&[80], Some(5));
        assert_eq!(judge(None, &running), Verdict::Apply);
        assert_eq!(
            judge(Some(&running), &config(&[81], Some(6))),
            Verdict::Apply
        );
        assert_eq!(
            judge(Some(&running), &config(&[80], Some(9))),
            Verdict::Unchanged
        );
        assert_eq!(
            judge(Some(&running), &config(&[81], Some(4))),
            Verdict::Older { running: 5 }
        );
        assert_eq!(
            judge(Some(&running), &config(&[81], Some(5))),
            Verdict::Disagrees { generation: 5 }
        );
        assert_eq!(
            judge(Some(&running), &config(&[81], None)),
            Verdict::Apply,
            "a hub without generations is followed"
        );
        assert!(Verdict::Older { running: 5 }
            .refusal(Some(4))
            .is_some_and(|why| why.contains("older")));
        assert_eq!(Verdict::Unchanged.refusal(Some(4)), None);
    }

    #[test]
    fn hubs_disagree_when_one_generation_names_two_contents() {
        let mut offers = Offers::default();
        offers.insert(1, "hub-a", &config(&[80], Some(5)));
        offers.insert(2, "hub-b", &config(&[80], Some(5)));
        assert_eq!(offers.disagreement(), None);
        offers.insert(2, "hub-b", &config(&[81], Some(5)));
        assert_eq!(
            offers.disagreement(),
            Some(Disagreement {
                generation: 5,
                hubs: vec!["hub-a".into(), "hub-b".into()]
            })
        );
        offers.insert(2, "hub-b", &config(&[81], Some(6)));
        assert_eq!(
            offers.disagreement(),
            None,
            "a newer generation is no quarrel"
        );
        offers.insert(2, "hub-b", &config(&[81], Some(5)));
        offers.remove(2);
        assert_eq!(offers.disagreement(), None);
    }
}
