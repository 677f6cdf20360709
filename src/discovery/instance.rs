use std::collections::BTreeMap;
use std::fmt;

use super::DiscoveryError;

/// One running instance of a service, as it registers itself.
///
/// The seed's `consul.agent.service.register({id, name, address, port, tags})`, plus a
/// `version` (several versions of a service run at once and clients ask for one) and free
/// `metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(
    any(feature = "etcd", feature = "consul"),
    derive(serde::Serialize, serde::Deserialize)
)]
pub struct Instance {
    /// Unique among the instances of the service (the seed uses `service + port`).
    pub id: String,
    /// The service name clients look up, such as `api-service`.
    pub service: String,
    /// Host name or IP address the instance listens on.
    pub address: String,
    /// Port the instance listens on.
    pub port: u16,
    /// Free-form tags; a [`Selector`] can require some.
    #[cfg_attr(any(feature = "etcd", feature = "consul"), serde(default))]
    pub tags: Vec<String>,
    /// Version of the code the instance runs (`"2.3.1"`); a [`Selector`] can ask for one.
    #[cfg_attr(any(feature = "etcd", feature = "consul"), serde(default))]
    pub version: Option<String>,
    /// Free-form key/value metadata.
    #[cfg_attr(any(feature = "etcd", feature = "consul"), serde(default))]
    pub metadata: BTreeMap<String, String>,
}

impl Instance {
    /// An instance of `service` with the given id, listening on `address:port`.
    pub fn new(
        service: impl Into<String>,
        id: impl Into<String>,
        address: impl Into<String>,
        port: u16,
    ) -> Self {
        Instance {
            id: id.into(),
            service: service.into(),
            address: address.into(),
            port,
            tags: Vec::new(),
            version: None,
            metadata: BTreeMap::new(),
        }
    }

    /// Adds a tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Sets the version.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Adds a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    /// `http://host:port`, ready for [`Forward::to`](crate::proxy::Forward::to).
    pub fn http_uri(&self) -> String {
        format!("http://{}", self.authority())
    }

    /// Checks what a registry and a proxy rely on: non-empty service and id without `/`
    /// or control characters (they become etcd keys and URL path segments), a host that
    /// forms a valid URI authority, and a port other than 0.
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        let bad = |m: String| Err(DiscoveryError::InvalidInstance(m));
        for (what, v) in [("service", &self.service), ("id", &self.id)] {
            if v.is_empty() {
                return bad(format!("{what} is empty"));
            }
            if v.len() > 256 {
                return bad(format!("{what} is longer than 256 bytes"));
            }
            if v.chars().any(|c| {
                c == '/' || c == '?' || c == '#' || c == '%' || c.is_control() || c.is_whitespace()
            }) {
                return bad(format!(
                    "{what} `{v}` contains `/`, `?`, `#`, `%`, a space or a control character"
                ));
            }
        }
        if self.port == 0 {
            return bad(format!("instance `{}` has port 0", self.id));
        }
        if self.address.is_empty() || self.address.contains(['/', '@', '?', '#']) {
            return bad(format!(
                "instance `{}` has an invalid address `{}`",
                self.id, self.address
            ));
        }
        if self.authority().parse::<http::uri::Authority>().is_err() {
            return bad(format!(
                "instance `{}` has an invalid address `{}`",
                self.id, self.address
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.service, self.id, self.authority())?;
        if let Some(v) = &self.version {
            write!(f, " v{v}")?;
        }
        Ok(())
    }
}

/// Which instances of a service a client wants: a version and/or tags.
///
/// A version constraint matches whole dot-separated components from the left: `"2"`
/// matches `2`, `2.0` and `2.3.1` but not `20.1`; `"2.3"` matches `2.3` and `2.3.7`;
/// `"2.3.1"` matches only itself (and `2.3.1.x`). Instances without a version never match
/// a version constraint. Every required tag must be present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    version: Option<String>,
    tags: Vec<String>,
}

impl Selector {
    /// Every instance.
    pub fn any() -> Self {
        Selector::default()
    }

    /// Requires a version (see the type's docs for the matching rule).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Requires a tag (may be called several times: all are required).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// `true` when `instance` satisfies every constraint.
    pub fn matches(&self, instance: &Instance) -> bool {
        if let Some(want) = &self.version {
            match &instance.version {
                Some(have) if version_matches(want, have) => {}
                _ => return false,
            }
        }
        self.tags
            .iter()
            .all(|t| instance.tags.iter().any(|h| h == t))
    }
}

fn version_matches(want: &str, have: &str) -> bool {
    let want = want.trim().trim_start_matches('v');
    let have = have.trim().trim_start_matches('v');
    if want.is_empty() {
        return true;
    }
    let mut h = have.split('.');
    want.split('.').all(|w| h.next() == Some(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_prefix_matches_whole_components() {
        assert!(version_matches("2", "2.3.1"));
        assert!(version_matches("2.3", "2.3.1"));
        assert!(version_matches("v2.3", "2.3"));
        assert!(!version_matches("2", "20.1"));
        assert!(!version_matches("2.3.1", "2.3"));
        assert!(!version_matches("2.4", "2.3.9"));
    }

    #[test]
    fn validate_refuses_what_breaks_keys_or_uris() {
        assert!(Instance::new("api", "a1", "127.0.0.1", 80)
            .validate()
            .is_ok());
        assert!(Instance::new("api", "a1", "::1", 80).validate().is_ok());
        assert!(Instance::new("api", "a/1", "127.0.0.1", 80)
            .validate()
            .is_err());
        assert!(Instance::new("", "a1", "127.0.0.1", 80).validate().is_err());
        assert!(Instance::new("api", "a1", "127.0.0.1", 0)
            .validate()
            .is_err());
        assert!(Instance::new("api", "a1", "evil@host", 80)
            .validate()
            .is_err());
        assert!(Instance::new("api", "a1", "", 80).validate().is_err());
        assert!(Instance::new("api", "a 1", "h", 80).validate().is_err());
    }
}
