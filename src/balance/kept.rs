//! The copy of a request kept for its next try ([`Kept`]), split from `retry.rs` (the
//! retry rules), which it outgrew: what is copied, how cheaply, and how a retry gets its
//! request back.

use http::header::{self, HeaderName, HeaderValue};
use http::{Extensions, Method, Request, Uri, Version};

use super::retry::CloneBody;
use crate::client_addr::ClientAddr;
use crate::proxy::BodyLimits;

/// The copy of a request kept for its next try (retries on, another try possible).
///
/// Not a `Request`: a copy is made for nearly every request and used for almost none, so
/// it is built to be cheap to make and to drop. Field by field from the original (a
/// `Request::new` would first build default parts, each dropped again when overwritten),
/// the headers as a plain list, where a `HeaderMap` clone allocates twice (its index
/// table and its entries) and frees twice, and the extensions as plain values when they
/// are only the server's own (see [`KeptExtensions`]). The map and the extensions are
/// rebuilt, in the original's order, only when a retry actually happens.
///
/// The head lives in a box recycled per thread (`spare.rs`): a dropped copy empties it and
/// gives it, header list capacity included, to the next request's copy, so the copy
/// allocates nothing once a thread has served a few requests. The body stays inline: it
/// is the request's own type, and small (an `Arc` handle for a buffered body).
///
/// A recycled head copies the header values' bytes (and an origin-form target) into its
/// own buffer instead of keeping the values: a parsed request's values are slices of the
/// server connection's read buffer, and a copy holding them kept that 8 KiB buffer alive
/// until the response came back, where it is otherwise freed as soon as the head was
/// written upstream. With the buffers of every in-flight request alive at once, glibc's
/// per-size caches ran dry and the process's allocations took malloc's slow path more
/// often: ~90 instructions per request over two upstreams, on top of the clones and drops
/// of the values (~40; issue 12, session 18). A retry (rare) makes the values again.
pub(crate) struct Kept<B> {
    head: HeadBox,
    body: B,
}

/// What a [`Kept`] copy holds besides the body; emptied and recycled when the copy goes.
pub(crate) struct KeptHead {
    method: Method,
    /// `None` while the box is a spare (emptying and refilling it then drops nothing: a
    /// default `Uri` in between would be built and dropped for every copy), and when the
    /// target is in `bytes` (`target`).
    uri: Option<Uri>,
    /// Length of the origin-form target (`/path?query`, or `*`) copied to the start of
    /// `bytes`; 0 when `uri` holds the target.
    target: u32,
    version: Version,
    headers: Vec<(HeaderName, KeptValue)>,
    /// The copied bytes: the target, then header values, at most [`MAX_BYTES`] in all.
    /// Empty (no capacity) in a head made fresh; a recycled head gets its buffer once.
    bytes: Vec<u8>,
    extensions: KeptExtensions,
}

/// A header value of a [`KeptHead`].
enum KeptValue {
    /// Its bytes, `bytes[start..end]` of the head, and its sensitive flag.
    Copied {
        start: u32,
        end: u32,
        sensitive: bool,
    },
    /// The value itself: past [`MAX_BYTES`], or in a head made fresh (no buffer yet).
    Shared(HeaderValue),
}

impl KeptHead {
    fn empty() -> Self {
        KeptHead {
            method: Method::GET,
            uri: None,
            target: 0,
            version: Version::HTTP_11,
            headers: Vec::new(),
            bytes: Vec::new(),
            extensions: KeptExtensions::NONE,
        }
    }

    pub(crate) fn headers_capacity(&self) -> usize {
        self.headers.capacity()
    }

    pub(crate) fn bytes_capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Copies `req`'s head (not its body) into this empty head.
    #[inline(always)]
    fn fill<B>(&mut self, req: &Request<B>) {
        self.method = req.method().clone();
        self.version = req.version();
        let map = req.headers();
        let uri = req.uri();
        match origin_form(uri).filter(|t| t.len() <= self.room()) {
            Some(t) => {
                self.bytes.extend_from_slice(t.as_bytes());
                self.target = self.bytes.len() as u32;
            }
            None => self.uri = Some(uri.clone()),
        }
        if !map.is_empty() {
            // `len` counts every value: at most one growth of a recycled list.
            self.headers.reserve(map.len());
            for (name, value) in map {
                let v = value.as_bytes();
                let kept = if v.len() <= self.room() {
                    let start = self.bytes.len() as u32;
                    self.bytes.extend_from_slice(v);
                    KeptValue::Copied {
                        start,
                        end: self.bytes.len() as u32,
                        sensitive: value.is_sensitive(),
                    }
                } else {
                    KeptValue::Shared(value.clone())
                };
                self.headers.push((name.clone(), kept));
            }
        }
        // The head is empty (made or cleared), its extensions `NONE`: a request without
        // any (not from `server`: in-process callers) leaves them as they are, where
        // building and moving the whole value was ~20 instructions a copy.
        debug_assert!(self.extensions.is_none());
        let ext = req.extensions();
        if !ext.is_empty() {
            self.extensions = KeptExtensions::of(ext);
        }
    }

    /// Bytes left to copy into: none in a head without a buffer (made fresh, not
    /// recycled: its values are kept as they are rather than allocate one more time).
    #[inline]
    fn room(&self) -> usize {
        // The buffer is reserved exactly once (see `Kept::of`), so it never grows past
        // its capacity and a recycled head keeps it.
        self.bytes.capacity() - self.bytes.len()
    }

    /// The request target, as it was.
    fn uri(&self) -> Option<Uri> {
        match &self.uri {
            Some(u) => Some(u.clone()),
            None => {
                let t = self.bytes.get(..self.target as usize)?;
                Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(t)).ok()
            }
        }
    }

    /// A header value, as it was.
    fn value(&self, v: &KeptValue) -> Option<HeaderValue> {
        match v {
            KeptValue::Copied {
                start,
                end,
                sensitive,
            } => {
                let b = self.bytes.get(*start as usize..*end as usize)?;
                // The bytes of a `HeaderValue`: they pass its own check again.
                let mut value = HeaderValue::from_bytes(b).ok()?;
                value.set_sensitive(*sensitive);
                Some(value)
            }
            KeptValue::Shared(value) => Some(value.clone()),
        }
    }

    /// The headers, as a map with the original's order (values of one name in order,
    /// names by their first value). `None` only if a value no longer passes the map's
    /// checks (it cannot: same entries, same bytes, same limit).
    fn header_map(&self) -> Option<http::HeaderMap> {
        let mut map = http::HeaderMap::with_capacity(self.headers.len());
        for (name, v) in &self.headers {
            map.try_append(name.clone(), self.value(v)?).ok()?;
        }
        Some(map)
    }

    /// Drops the request's values and keeps the allocations: a recycled box must not hold
    /// on to anything of the request (its header bytes share the server's read buffer).
    fn clear(&mut self) {
        // `Vec::clear` calls the slice's drop even for no entries (in-process callers).
        if !self.headers.is_empty() {
            self.headers.clear();
        }
        self.bytes.clear();
        self.target = 0;
        self.uri = None;
        self.method = Method::GET;
        // Written only when set: a whole new value (dropping the old) was ~10
        // instructions a copy, for the common request with none.
        if !self.extensions.is_none() {
            self.extensions = KeptExtensions::NONE;
        }
    }
}

/// The box of a [`KeptHead`], given back to this thread's spares when dropped. An
/// `Option` only so `drop` can take it out (never `None` before then).
struct HeadBox(Option<Box<KeptHead>>);

impl Drop for HeadBox {
    #[inline]
    fn drop(&mut self) {
        if let Some(mut head) = self.0.take() {
            head.clear();
            super::spare::give(head);
        }
    }
}

impl HeadBox {
    #[inline]
    fn get(&self) -> &KeptHead {
        match &self.0 {
            Some(h) => h,
            None => unreachable!("a kept head is taken only by its drop"),
        }
    }

    #[inline]
    fn get_mut(&mut self) -> &mut KeptHead {
        match &mut self.0 {
            Some(h) => h,
            None => unreachable!("a kept head is taken only by its drop"),
        }
    }
}

/// The extensions of a [`Kept`] copy.
///
/// A request from [`crate::server`] carries the client's address ([`ClientAddr`]) and, when
/// it has a body, its [`BodyLimits`]: two small `Copy` values. Cloning the `Extensions`
/// map that holds them allocates three times (the map's box, its table, each value's box)
/// and frees as often when the unused copy is dropped: ~700 instructions, 3 of the
/// balancer's 5 allocations per proxied `GET` (issue 12's profile). When the map holds
/// nothing else (its length says so: one entry per type), the values are copied as they
/// are and put back into a map only for a retry; any other extension (an `OnUpgrade`, a
/// trace context, a caller's own) makes it a full clone, as before.
enum KeptExtensions {
    /// Only the server's own values (or none at all).
    Server {
        peer: Option<ClientAddr>,
        limits: Option<BodyLimits>,
    },
    /// Anything else: a full copy of the map.
    Cloned(Extensions),
}

impl KeptExtensions {
    const NONE: Self = KeptExtensions::Server {
        peer: None,
        limits: None,
    };

    // Always inline: for the common empty map this is one check; as a call it cost ~25
    // instructions a copy (dispatch bench).
    #[inline(always)]
    fn of(ext: &Extensions) -> Self {
        if ext.is_empty() {
            return Self::NONE;
        }
        // One entry per type: equal counts mean these are all the map holds. The limits
        // are looked up only when something else is there (a `GET` has none).
        let peer = ext.get::<ClientAddr>().copied();
        let n = usize::from(peer.is_some());
        if ext.len() == n {
            return KeptExtensions::Server { peer, limits: None };
        }
        let limits = ext.get::<BodyLimits>().copied();
        if ext.len() == n + usize::from(limits.is_some()) {
            KeptExtensions::Server { peer, limits }
        } else {
            KeptExtensions::Cloned(ext.clone())
        }
    }

    /// Whether these are [`NONE`](Self::NONE).
    fn is_none(&self) -> bool {
        matches!(
            self,
            KeptExtensions::Server {
                peer: None,
                limits: None
            }
        )
    }

    fn to_extensions(&self) -> Extensions {
        match self {
            KeptExtensions::Server { peer, limits } => {
                let mut ext = Extensions::new();
                if let Some(p) = peer {
                    ext.insert(*p);
                }
                if let Some(l) = limits {
                    ext.insert(*l);
                }
                ext
            }
            KeptExtensions::Cloned(ext) => ext.clone(),
        }
    }

    fn into_extensions(self) -> Extensions {
        match self {
            KeptExtensions::Cloned(ext) => ext,
            server => server.to_extensions(),
        }
    }
}

/// The target of an origin-form URI (`/path?query`, or `*`: what a server receives), which
/// `Uri` parses back to an equal `Uri`; `None` for any other form (kept as a `Uri`).
#[inline]
fn origin_form(uri: &Uri) -> Option<&str> {
    if uri.scheme().is_some() || uri.authority().is_some() {
        return None;
    }
    let t = uri.path_and_query()?.as_str();
    (t.starts_with('/') || t == "*").then_some(t)
}

impl<B: CloneBody> Kept<B> {
    /// A copy of `req`: method, URI, version, headers, extensions and body; `None` if the
    /// body can't be copied.
    pub(crate) fn of(req: &Request<B>) -> Option<Self> {
        let body = req.body().try_clone_body()?;
        let head = match super::spare::take() {
            Some(mut head) => {
                if head.bytes.capacity() == 0 {
                    // Once per recycled box: its buffer, then kept with it.
                    head.bytes.reserve_exact(super::spare::MAX_BYTES);
                }
                head.fill(req);
                head
            }
            None => {
                // A fresh head keeps the values as they are: no buffer to allocate for a
                // copy that may never be recycled (more copies alive than spares). `fill`
                // allocates the list once, and not at all without headers.
                let mut head = Box::new(KeptHead::empty());
                head.fill(req);
                head
            }
        };
        Some(Kept {
            head: HeadBox(Some(head)),
            body,
        })
    }
}

impl<B> Kept<B> {
    /// The request to send again. Values of one name keep their order, names the order
    /// of their first value: the head the original map would have written. `None` only
    /// if the target or a header no longer parses (they cannot: the same bytes parsed
    /// before; see [`KeptHead::header_map`]).
    pub(crate) fn into_request(self) -> Option<Request<B>> {
        let Kept { mut head, body } = self;
        let h = head.get_mut();
        let mut req = Request::new(body);
        *req.uri_mut() = h.uri()?;
        *req.headers_mut() = h.header_map()?;
        *req.method_mut() = std::mem::replace(&mut h.method, Method::GET);
        *req.version_mut() = h.version;
        let ext = std::mem::replace(&mut h.extensions, KeptExtensions::NONE);
        *req.extensions_mut() = ext.into_extensions();
        Some(req)
    }

    /// The request's method.
    pub(crate) fn method(&self) -> &Method {
        &self.head.get().method
    }

    /// Whether the request is an upgrade (WebSocket) that [`Forward`](crate::proxy::Forward)
    /// would tunnel. Asked only once a try failed; without an `Upgrade` header (nearly
    /// always) the answer is `false` without building anything, else the proxy's own
    /// check runs on a throwaway head with the same method, version, headers and
    /// extensions.
    pub(crate) fn is_upgrade(&self) -> bool {
        let h = self.head.get();
        if !h.headers.iter().any(|(n, _)| n == header::UPGRADE) {
            return false;
        }
        let mut head = Request::new(());
        *head.method_mut() = h.method.clone();
        *head.version_mut() = h.version;
        let Some(map) = h.header_map() else {
            // Cannot happen (see `into_request`); not resending is the safe answer.
            return true;
        };
        *head.headers_mut() = map;
        *head.extensions_mut() = h.extensions.to_extensions();
        crate::proxy::is_upgrade_request(&head)
    }
}

// The tests are one file apart: with the copy's round trips they outgrew the code.
#[cfg(test)]
#[path = "kept_tests.rs"]
mod tests;
