use std::fmt;

use http::StatusCode;

use super::hops::ChainHops;
use crate::error::HttpStatus;
use crate::BoxError;

/// A chain ended with an error instead of a response: the last link tried failed and the
/// chain did not (or could not) go on.
///
/// Carries the [`ChainHops`] so the trail survives the error; its
/// [`source`](std::error::Error::source) is the link's own error, so
/// [`classify::error_kind`](crate::classify::error_kind) and
/// [`error_status`](crate::error::error_status) see through it.
#[derive(Debug)]
pub struct ChainError {
    hops: ChainHops,
    source: BoxError,
}

impl ChainError {
    pub(crate) fn new(hops: ChainHops, source: BoxError) -> Self {
        ChainError { hops, source }
    }

    pub(crate) fn into_parts(self) -> (ChainHops, BoxError) {
        (self.hops, self.source)
    }

    /// The links tried; the last one failed.
    pub fn hops(&self) -> &ChainHops {
        &self.hops
    }

    /// The failed link's error.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl ChainError {
    /// The status a proxy answers with ([`HttpStatus`], callable without importing it).
    pub fn status(&self) -> StatusCode {
        HttpStatus::status(self)
    }
}

/// Whatever the failed link's error stands for (`502`/`504`, see
/// [`error_status`](crate::error::error_status)).
impl HttpStatus for ChainError {
    fn status(&self) -> StatusCode {
        crate::error::error_status(&*self.source)
    }
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "content chain failed at {}", self.hops.last().name())
    }
}

impl std::error::Error for ChainError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A [`LinkTable`](super::LinkTable) configuration that was refused. Each variant names the
/// hosts involved, as STON refuses a broken `<VhostLink>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkConfigError {
    /// The link target is not a configured virtual host (`foo.com -> ?`).
    #[error("virtual host {host:?} links to {target:?}, which does not exist")]
    MissingTarget {
        /// The host whose link is broken.
        host: String,
        /// The target that does not exist.
        target: String,
    },
    /// A host links to itself (`foo.com -> foo.com`).
    #[error("virtual host {host:?} links to itself")]
    SelfLink {
        /// The host.
        host: String,
    },
    /// Links form a cycle (`foo.com -> bar.com -> foo.com`). `cycle` lists the hosts in link
    /// order and repeats the first at the end.
    #[error("recursive virtual host link: {}", .cycle.join(" -> "))]
    RecursiveLink {
        /// The hosts of the cycle, first repeated at the end.
        cycle: Vec<String>,
    },
    /// The same host was declared twice (names compare case-insensitively).
    #[error("virtual host {host:?} is declared twice")]
    DuplicateHost {
        /// The host.
        host: String,
    },
    /// A host has two links; a virtual host has at most one, as in STON.
    #[error("virtual host {host:?} has more than one link")]
    DuplicateLink {
        /// The host.
        host: String,
    },
    /// A link (or the default) names a host that was never declared as its source.
    #[error("a link is declared for {host:?}, which is not a virtual host")]
    UnknownHost {
        /// The host.
        host: String,
    },
    /// The default virtual host does not exist.
    #[error("the default virtual host {host:?} does not exist")]
    MissingDefault {
        /// The host.
        host: String,
    },
    /// The name is not a usable host name (empty, or contains a port, a path or spaces).
    #[error("{host:?} is not a valid virtual host name")]
    InvalidHost {
        /// The name as given.
        host: String,
    },
}
