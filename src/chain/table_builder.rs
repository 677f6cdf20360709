//! Building a [`LinkTable`]: names are checked and normalised, links resolved to indices,
//! and every configuration mistake (unknown target, self link, a cycle of any length, a
//! default that is not a host) refused with a [`LinkConfigError`] before anything serves.
//!
//! Kept apart from the table because none of it runs per request.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};
use tower_service::Service;

use super::error::LinkConfigError;
use super::layer::{ChainLayer, LinkLayer};
use super::table::{LinkService, LinkTable, TableInner};
use crate::body::{boxed, ReplayBody};
use crate::classify::Condition;
use crate::BoxError;

/// Builds a [`LinkTable`]; nothing is checked until [`build`](Self::build).
pub struct LinkTableBuilder<B> {
    hosts: Vec<(String, LinkService<B>)>,
    links: Vec<(String, Condition, String)>,
    default: Option<String>,
    chain: ChainLayer,
    non_idempotent: bool,
    drain: Option<(u64, Duration)>,
}

impl<B> fmt::Debug for LinkTableBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkTableBuilder")
            .field(
                "hosts",
                &self
                    .hosts
                    .iter()
                    .map(|(h, _)| h.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("links", &self.links)
            .field("default", &self.default)
            .field("chain", &self.chain)
            .finish()
    }
}

impl<B> LinkTableBuilder<B> {
    pub(super) fn new() -> Self {
        LinkTableBuilder {
            hosts: Vec::new(),
            links: Vec::new(),
            default: None,
            chain: ChainLayer::new(),
            non_idempotent: false,
            drain: None,
        }
    }
}

impl<B> LinkTableBuilder<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Declares the virtual host `name` served by `service`. Its responses are boxed into
    /// [`BoxBody`](crate::body::BoxBody) so hosts of different types can link to each other.
    pub fn vhost<S, RB>(mut self, name: impl Into<String>, service: S) -> Self
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        RB: Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let svc = service
            .map_response(|res: Response<RB>| res.map(boxed))
            .map_err(Into::into);
        self.hosts
            .push((name.into(), BoxCloneSyncService::new(svc)));
        self
    }

    /// `<VhostLink Condition="...">to</VhostLink>` inside host `from`: what `from` answers
    /// matching `condition` is served by `to`.
    pub fn link(
        mut self,
        from: impl Into<String>,
        condition: Condition,
        to: impl Into<String>,
    ) -> Self {
        self.links.push((from.into(), condition, to.into()));
        self
    }

    /// Requests for unknown hosts (and without a `Host`) go to this host instead of being
    /// answered `421`/`400`, like nginx's `default_server`.
    pub fn default_vhost(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }

    /// The edge settings (replay limit, hop header and limit, report header).
    pub fn chain(mut self, layer: ChainLayer) -> Self {
        self.chain = layer;
        self
    }

    /// Let non-idempotent requests (POST, PATCH, ...) follow links; see
    /// [`LinkLayer::non_idempotent`].
    pub fn non_idempotent(mut self, yes: bool) -> Self {
        self.non_idempotent = yes;
        self
    }

    /// How skipped responses are discarded; see [`LinkLayer::drain`].
    pub fn drain(mut self, limit: u64, timeout: Duration) -> Self {
        self.drain = Some((limit, timeout));
        self
    }

    /// Validates the table and builds it.
    ///
    /// Checks, in this order: host names (valid, not declared twice), links (from a
    /// declared host, at most one per host, to an existing host, not to itself), cycles
    /// (reported once, starting from the first declared host on the cycle), the default
    /// host.
    pub fn build(self) -> Result<LinkTable<B>, LinkConfigError> {
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut names = Vec::with_capacity(self.hosts.len());
        let mut services = Vec::with_capacity(self.hosts.len());
        for (raw, svc) in self.hosts {
            let name = valid_name(&raw)?;
            if index.insert(name.clone(), names.len()).is_some() {
                return Err(LinkConfigError::DuplicateHost { host: name });
            }
            names.push(name);
            services.push(svc);
        }
        let mut link: Vec<Option<(Condition, usize)>> = vec![None; names.len()];
        for (from, cond, to) in self.links {
            let from_n = valid_name(&from)?;
            let Some(&f) = index.get(&from_n) else {
                return Err(LinkConfigError::UnknownHost { host: from_n });
            };
            if link[f].is_some() {
                return Err(LinkConfigError::DuplicateLink { host: from_n });
            }
            let to_n = match valid_name(&to) {
                Ok(n) => n,
                Err(_) => {
                    return Err(LinkConfigError::MissingTarget {
                        host: from_n,
                        target: to,
                    })
                }
            };
            let Some(&t) = index.get(&to_n) else {
                return Err(LinkConfigError::MissingTarget {
                    host: from_n,
                    target: to_n,
                });
            };
            if t == f {
                return Err(LinkConfigError::SelfLink { host: from_n });
            }
            link[f] = Some((cond, t));
        }
        if let Some(cycle) = find_cycle(&link) {
            return Err(LinkConfigError::RecursiveLink {
                cycle: cycle.into_iter().map(|i| names[i].clone()).collect(),
            });
        }
        let default = match self.default {
            None => None,
            Some(d) => {
                let n = valid_name(&d)
                    .map_err(|_| LinkConfigError::MissingDefault { host: d.clone() })?;
                match index.get(&n) {
                    Some(&i) => Some(i),
                    None => return Err(LinkConfigError::MissingDefault { host: n }),
                }
            }
        };

        // Each host's chain, built from the end of its path; memoised so shared tails are
        // built once (the graph is acyclic now).
        let mut built: Vec<Option<LinkService<B>>> = vec![None; names.len()];
        for start in 0..names.len() {
            let mut path = vec![start];
            let mut cur = start;
            while let Some((_, t)) = link[cur] {
                if built[t].is_some() {
                    break;
                }
                path.push(t);
                cur = t;
            }
            for &h in path.iter().rev() {
                if built[h].is_some() {
                    continue;
                }
                let svc = match &link[h] {
                    None => services[h].clone(),
                    Some((cond, t)) => {
                        let t = *t;
                        let next = match &built[t] {
                            Some(n) => n.clone(),
                            None => services[t].clone(),
                        };
                        let mut layer = LinkLayer::new(cond.clone(), next)
                            .names(names[h].as_str(), names[t].as_str())
                            .non_idempotent(self.non_idempotent);
                        if let Some((limit, timeout)) = self.drain {
                            layer = layer.drain(limit, timeout);
                        }
                        let fb = layer.layer(services[h].clone());
                        BoxCloneSyncService::new(fb.map_err(BoxError::from))
                    }
                };
                built[h] = Some(svc);
            }
        }
        let chains = built
            .into_iter()
            .zip(services)
            .enumerate()
            .map(|(i, (b, s))| {
                let edge = self.chain.clone().entry_name(names[i].as_str().into());
                edge.layer(b.unwrap_or(s))
            })
            .collect();
        Ok(LinkTable {
            inner: Arc::new(TableInner {
                hosts: index,
                chains,
                names,
                links: link.iter().map(|l| l.as_ref().map(|(_, t)| *t)).collect(),
                default,
            }),
        })
    }
}

fn valid_name(raw: &str) -> Result<String, LinkConfigError> {
    let n = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(n)
    } else {
        Err(LinkConfigError::InvalidHost {
            host: raw.to_string(),
        })
    }
}

/// The first cycle met walking from each host in declaration order, as host indices with
/// the first repeated at the end.
fn find_cycle(link: &[Option<(Condition, usize)>]) -> Option<Vec<usize>> {
    // 0 = unvisited, 1 = on the current walk, 2 = done (no cycle reachable).
    let mut mark = vec![0u8; link.len()];
    for start in 0..link.len() {
        if mark[start] != 0 {
            continue;
        }
        let mut walk = Vec::new();
        let mut cur = Some(start);
        while let Some(h) = cur {
            match mark[h] {
                2 => break,
                1 => {
                    let pos = walk.iter().position(|&x| x == h).unwrap_or(0);
                    let mut cycle: Vec<usize> = walk[pos..].to_vec();
                    cycle.push(h);
                    return Some(cycle);
                }
                _ => {
                    mark[h] = 1;
                    walk.push(h);
                    cur = link[h].as_ref().map(|(_, t)| *t);
                }
            }
        }
        for h in walk {
            mark[h] = 2;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_found_with_their_members() {
        let c = Condition::never();
        // 0 -> 1 -> 2 -> 1
        let link = vec![
            Some((c.clone(), 1)),
            Some((c.clone(), 2)),
            Some((c.clone(), 1)),
        ];
        assert_eq!(find_cycle(&link), Some(vec![1, 2, 1]));
        // 0 -> 1, 2 -> 1: no cycle.
        let link = vec![Some((c.clone(), 1)), None, Some((c, 1))];
        assert_eq!(find_cycle(&link), None);
    }
}
