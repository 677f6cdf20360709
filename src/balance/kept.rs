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
pub(crate) struct Kept<B> {
    head: HeadBox,
    body: B,
}

/// What a [`Kept`] copy holds besides the body; emptied and recycled when the copy goes.
pub(crate) struct KeptHead {
    method: Method,
    /// `None` only while the box is a spare: emptying and refilling it then drops nothing
    /// (a default `Uri` in between would be built and dropped for every copy).
    uri: Option<Uri>,
    version: Version,
    headers: Vec<(HeaderName, HeaderValue)>,
    extensions: KeptExtensions,
}

impl KeptHead {
    pub(crate) fn headers_capacity(&self) -> usize {
        self.headers.capacity()
    }

    /// Drops the request's values and keeps the allocations: a recycled box must not hold
    /// on to anything of the request (its header bytes share the server's read buffer).
    fn clear(&mut self) {
        // `Vec::clear` calls the slice's drop even for no entries (in-process callers).
        if !self.headers.is_empty() {
            self.headers.clear();
        }
        self.uri = None;
        self.method = Method::GET;
        self.extensions = KeptExtensions::NONE;
    }
}

/// The box of a [`KeptHead`], given back to this thread's spares when dropped. An
/// `Option` only so `drop` can take it out (never `None` before then).
struct HeadBox(Option<Box<KeptHead>>);

impl Drop for HeadBox {
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

impl<B: CloneBody> Kept<B> {
    /// A copy of `req`: method, URI, version, headers, extensions and body; `None` if the
    /// body can't be copied.
    pub(crate) fn of(req: &Request<B>) -> Option<Self> {
        let body = req.body().try_clone_body()?;
        let map = req.headers();
        let head = match super::spare::take() {
            Some(mut head) => {
                let h = &mut *head;
                h.method = req.method().clone();
                h.uri = Some(req.uri().clone());
                h.version = req.version();
                if !map.is_empty() {
                    // `len` counts every value: at most one growth of a recycled list.
                    h.headers.reserve(map.len());
                    h.headers
                        .extend(map.iter().map(|(n, v)| (n.clone(), v.clone())));
                }
                h.extensions = KeptExtensions::of(req.extensions());
                head
            }
            None => {
                // The list allocated once; a head without headers (in-process callers)
                // skips the iterator too.
                let headers = if map.is_empty() {
                    Vec::new()
                } else {
                    let mut list = Vec::with_capacity(map.len());
                    list.extend(map.iter().map(|(n, v)| (n.clone(), v.clone())));
                    list
                };
                Box::new(KeptHead {
                    method: req.method().clone(),
                    uri: Some(req.uri().clone()),
                    version: req.version(),
                    headers,
                    extensions: KeptExtensions::of(req.extensions()),
                })
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
    /// if the map refuses a header it held before (it cannot: same entries, same limit).
    pub(crate) fn into_request(self) -> Option<Request<B>> {
        let Kept { mut head, body } = self;
        let h = head.get_mut();
        let mut req = Request::new(body);
        *req.method_mut() = std::mem::replace(&mut h.method, Method::GET);
        *req.uri_mut() = h.uri.take().unwrap_or_default();
        *req.version_mut() = h.version;
        let map = req.headers_mut();
        for (name, value) in h.headers.drain(..) {
            map.try_append(name, value).ok()?;
        }
        let ext = std::mem::replace(&mut h.extensions, KeptExtensions::NONE);
        *req.extensions_mut() = ext.into_extensions();
        Some(req)
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
        let map = head.headers_mut();
        for (name, value) in &h.headers {
            if map.try_append(name.clone(), value.clone()).is_err() {
                // Cannot happen (see `into_request`); not resending is the safe answer.
                return true;
            }
        }
        *head.extensions_mut() = h.extensions.to_extensions();
        crate::proxy::is_upgrade_request(&head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A head with repeated and interleaved names, a sensitive value, a custom method, a
    /// full URI and an extension: what a retry sends must be the same head.
    fn original() -> Request<String> {
        let mut req = Request::builder()
            .method(Method::from_bytes(b"PURGE").unwrap())
            .uri("http://example.com:8080/a/b?x=1&y=2")
            .version(Version::HTTP_10)
            .header("x-a", "1")
            .header(header::HOST, "example.com")
            .header("x-a", "2")
            .header(header::COOKIE, "k=v")
            .header("x-b", "3")
            .header("x-a", "3")
            .extension(7u32)
            .body("body".to_string())
            .unwrap();
        let mut secret = HeaderValue::from_static("Bearer t");
        secret.set_sensitive(true);
        req.headers_mut().insert(header::AUTHORIZATION, secret);
        req
    }

    #[test]
    fn a_kept_copy_becomes_the_same_request() {
        let req = original();
        let copy = Kept::of(&req).unwrap().into_request().unwrap();
        assert_eq!(copy.method(), req.method());
        assert_eq!(copy.uri(), req.uri());
        assert_eq!(copy.version(), req.version());
        assert_eq!(copy.body(), req.body());
        assert_eq!(copy.extensions().get::<u32>(), Some(&7));
        // Same map, and the same order when written out (names by first value, values of
        // one name in order), which is what the upstream sees.
        assert_eq!(copy.headers(), req.headers());
        let pairs = |r: &Request<String>| {
            r.headers()
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(pairs(&copy), pairs(&req));
        assert_eq!(
            copy.headers().get_all("x-a").iter().collect::<Vec<_>>(),
            ["1", "2", "3"]
        );
        assert!(copy.headers()[header::AUTHORIZATION].is_sensitive());
    }

    #[test]
    fn the_servers_extensions_are_kept_as_values_and_come_back() {
        let peer = ClientAddr("127.0.0.1:4242".parse().unwrap());
        let limits = BodyLimits {
            max_bytes: Some(10),
            idle_timeout: Some(Duration::from_secs(3)),
        };
        let mut req = original();
        req.extensions_mut().clear();
        req.extensions_mut().insert(peer);
        req.extensions_mut().insert(limits);
        let kept = Kept::of(&req).unwrap();
        assert!(matches!(
            kept.head.get().extensions,
            KeptExtensions::Server { .. }
        ));
        let copy = kept.into_request().unwrap();
        assert_eq!(copy.extensions().len(), 2);
        assert_eq!(copy.extensions().get::<ClientAddr>(), Some(&peer));
        assert_eq!(copy.extensions().get::<BodyLimits>(), Some(&limits));
        // The peer alone, and nothing at all.
        req.extensions_mut().remove::<BodyLimits>();
        let copy = Kept::of(&req).unwrap().into_request().unwrap();
        assert_eq!(copy.extensions().len(), 1);
        assert_eq!(copy.extensions().get::<ClientAddr>(), Some(&peer));
        req.extensions_mut().clear();
        let copy = Kept::of(&req).unwrap().into_request().unwrap();
        assert!(copy.extensions().is_empty());
    }

    #[test]
    fn any_other_extension_keeps_the_whole_map() {
        let peer = ClientAddr("127.0.0.1:4242".parse().unwrap());
        let mut req = original();
        req.extensions_mut().insert(peer);
        let kept = Kept::of(&req).unwrap();
        assert!(matches!(
            kept.head.get().extensions,
            KeptExtensions::Cloned(_)
        ));
        let copy = kept.into_request().unwrap();
        assert_eq!(copy.extensions().len(), 2);
        assert_eq!(copy.extensions().get::<ClientAddr>(), Some(&peer));
        assert_eq!(copy.extensions().get::<u32>(), Some(&7));
    }

    #[test]
    fn a_recycled_head_carries_nothing_of_the_request_before() {
        use crate::balance::spare;
        // The first copy on this (test) thread fills a head; dropping it keeps the box.
        let first = original();
        drop(Kept::of(&first).unwrap());
        let kept_before = spare::held();
        assert!(kept_before >= 1, "a dropped copy gives its head back");
        // The next copy reuses that box: only its own request's values come back out.
        let second = Request::post("/other")
            .header("x-only", "here")
            .body("2".to_string())
            .unwrap();
        let kept = Kept::of(&second).unwrap();
        assert_eq!(spare::held(), kept_before - 1, "the spare was taken");
        let copy = kept.into_request().unwrap();
        assert_eq!(copy.method(), Method::POST);
        assert_eq!(copy.uri(), "/other");
        assert_eq!(copy.version(), Version::HTTP_11);
        assert_eq!(copy.headers().len(), 1);
        assert_eq!(copy.headers()["x-only"], "here");
        assert!(copy.extensions().is_empty());
        assert_eq!(copy.body(), "2");
        // A spare holds no value of any request: its list is empty, its URI the default.
        drop(Kept::of(&first).unwrap());
        let head = spare::take().unwrap();
        assert!(head.headers.is_empty() && head.headers.capacity() >= 6);
        assert_eq!(head.uri, None);
        assert!(matches!(
            head.extensions,
            KeptExtensions::Server {
                peer: None,
                limits: None
            }
        ));
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_small_spares() {
        use crate::balance::spare::{self, MAX_LIST, SPARES};
        // The bound the module docs state: ~40 KiB a thread at most.
        let most = SPARES
            * (std::mem::size_of::<KeptHead>()
                + MAX_LIST * std::mem::size_of::<(HeaderName, HeaderValue)>());
        assert!(most <= 40 * 1024, "{most} bytes of spares a thread");
        while spare::take().is_some() {}
        // More copies alive at once than the bound: only the bound is kept.
        let req = original();
        let copies: Vec<_> = (0..SPARES + 5).map(|_| Kept::of(&req).unwrap()).collect();
        drop(copies);
        assert_eq!(spare::held(), SPARES);
        // A head with a longer list than kept spares may hold is freed, not kept.
        while spare::take().is_some() {}
        let mut big = Request::new(String::new());
        for i in 0..=MAX_LIST {
            big.headers_mut().append(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        drop(Kept::of(&big).unwrap());
        assert_eq!(spare::held(), 0);
    }

    #[test]
    fn a_body_that_cannot_be_copied_gives_no_copy() {
        let req = Request::new(crate::body::BoxBody::default());
        assert!(Kept::of(&req).is_none());
    }

    #[test]
    fn an_upgrade_is_recognised_only_with_its_headers() {
        assert!(!Kept::of(&original()).unwrap().is_upgrade());
        // Upgrade headers but no hyper `OnUpgrade` (not from a server connection): the
        // proxy would not tunnel it, so neither does the check.
        let req = Request::get("/ws")
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "upgrade")
            .body(String::new())
            .unwrap();
        assert!(!Kept::of(&req).unwrap().is_upgrade());
    }
}
