//! Who the client is, under any server.
//!
//! `X-Forwarded-For`, client-IP hashing and "`PURGE` only from loopback" all need the
//! client's address, but each server hands it over differently: this crate's
//! [`server`](crate::server) puts a [`ClientAddr`] extension on every request, axum's
//! `into_make_service_with_connect_info::<SocketAddr>()` a `ConnectInfo<SocketAddr>`, and
//! hyper-util's server nothing at all (the caller knows the peer of each connection). When
//! the address is missing, those features used to stop silently.
//!
//! [`ClientAddrLayer`] is the one place that settles it, in front of everything else:
//!
//! - the TCP peer comes from [`ClientAddr`], else axum's `ConnectInfo<SocketAddr>` (feature
//!   `axum`, on by default), else the address given with [`ClientAddrLayer::peer`]; it is
//!   stored as [`ClientAddr`];
//! - an incoming `X-Forwarded-For` is believed only when the peer is one of the
//!   [`TrustedProxies`]; the real client is then the rightmost address that is not a
//!   trusted proxy (nginx `real_ip_recursive on`). From anyone else the header is removed:
//!   a client may write anything there;
//! - the believed client is stored as [`ClientIp`], which client-IP hashing and the
//!   `PURGE` check read ([`client_ip`]).
//!
//! ```
//! use tower_patterns::client_addr::{ClientAddrLayer, TrustedProxies};
//!
//! let layer = ClientAddrLayer::new().trust("127.0.0.1/32, 10.0.0.0/8".parse::<TrustedProxies>()?);
//! # Ok::<_, tower_patterns::client_addr::TrustedProxiesError>(())
//! ```

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

// Not among `http`'s constants: a de-facto header.
const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
use http::{Extensions, HeaderMap, HeaderValue, Request};
use tower_layer::Layer;
use tower_service::Service;

/// The TCP peer of a request, as a request extension. Set by [`crate::server::serve`] and
/// by [`ClientAddrLayer`]; [`Forward`](crate::proxy::Forward) appends it to
/// `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

// The server's request extension maps, reused (issue 12). A request's extensions are a
// boxed map, its table and a box per value: the server's `ClientAddr` alone cost three
// allocations and three frees a request (~0.75k instructions, another task's cache lines
// at the free). `Forward` hands back the map of a request it sends upstream when the map
// holds nothing but the `ClientAddr` (nothing the upstream exchange reads), and the
// server's next request on this thread takes it, overwriting the address in place. The
// server calls `Forward` synchronously within its own call, so on one worker the map
// goes round without ever being freed; a map holding anything else is left alone.
thread_local! {
    static SPARE: std::cell::Cell<Option<Extensions>> = const { std::cell::Cell::new(None) };
    // Whether this crate's server runs on this thread, i.e. whether anyone takes a spare
    // here. Under another server (axum's, with `ClientAddrLayer` putting the address) a
    // recycled map would only be dropped later, and a `Scoped` list would be an
    // allocation a request for nothing.
    static SERVES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Puts `addr` into a request's extensions as its [`ClientAddr`], in a map handed back by
/// [`recycle`] when `ext` is still empty and one is there.
pub(crate) fn insert_client_addr(ext: &mut Extensions, addr: ClientAddr) {
    SERVES.with(|s| s.set(true));
    if ext.is_empty() {
        if let Some(spare) = SPARE.with(std::cell::Cell::take) {
            *ext = spare;
            if let Some(slot) = ext.get_mut::<ClientAddr>() {
                *slot = addr;
                return;
            }
        }
    }
    ext.insert(addr);
}

/// Takes the extensions of a request about to leave for its upstream, for
/// [`insert_client_addr`], when they hold only a [`ClientAddr`] and values inserted with
/// [`insert_scoped`]; anything else keeps the map with its request.
pub(crate) fn recycle(ext: &mut Extensions) {
    if !SERVES.with(std::cell::Cell::get) || ext.get::<ClientAddr>().is_none() {
        return;
    }
    // Bare `Forward` (the address alone) asks nothing more.
    let len = ext.len();
    if len > 1 {
        let Some(scoped) = ext.get_mut::<Scoped>() else {
            return;
        };
        // The address, the list, the listed values: anything more is somebody else's.
        if scoped.count().is_none_or(|count| len != 2 + count) {
            return;
        }
        let removers = std::mem::take(scoped);
        for remove in removers.removers.iter().flatten() {
            remove(ext);
        }
        // A listed value removed by someone else and replaced by an unlisted one.
        if ext.len() != 2 {
            return;
        }
    }
    let map = std::mem::take(ext);
    SPARE.with(|s| s.set(Some(map)));
}

/// Puts `value` on a request for the layers between the caller and the upstream exchange
/// only (the gateway's verified identity, its trace context): the upstream gets them as
/// headers, and nothing of the exchange reads them, so [`recycle`] may drop them and reuse
/// the map. Without that, a map holding them besides the `ClientAddr` went with its
/// request: behind the gateway stack the map, its table, its growth and the address's box,
/// four allocations and four frees a request (session 16). The layers say which values
/// are theirs here; this module never names their types.
pub(crate) fn insert_scoped<T: Clone + Send + Sync + 'static>(ext: &mut Extensions, value: T) {
    // Only a map with the server's address goes round (`recycle`), and only on a thread
    // this crate's server runs on; for any other the list would be one more allocation a
    // request for nothing (a gateway under axum's server).
    if ext.insert(value).is_some() {
        // Already listed (or inserted by someone else: then `recycle` finds one too many).
        return;
    }
    // The value alone in its map: no address and no list there (a request that did not
    // come from this crate's server, e.g. under axum's or in process); two lookups fewer.
    if ext.len() == 1 {
        return;
    }
    // A list is only ever put into a map holding the address on a serving thread (below),
    // and a recycled map keeps both: when one is there, those two checks hold and are
    // not looked up again (one map probe fewer per value; `recycle` checks the address
    // itself before it takes anything).
    if let Some(scoped) = ext.get_mut::<Scoped>() {
        scoped.push(remove_value::<T>);
        return;
    }
    if ext.get::<ClientAddr>().is_none() || !SERVES.with(std::cell::Cell::get) {
        return;
    }
    let mut scoped = Scoped::default();
    scoped.push(remove_value::<T>);
    ext.insert(scoped);
}

fn remove_value<T: Send + Sync + 'static>(ext: &mut Extensions) {
    ext.remove::<T>();
}

/// The values of [`insert_scoped`] in one request's map, by their removers. It stays in a
/// recycled map, emptied, like the `ClientAddr` (the next request's values reuse it).
#[derive(Clone, Default)]
struct Scoped {
    removers: [Option<fn(&mut Extensions)>; SCOPED_MAX],
    /// More values than `removers` holds: the map is not recycled.
    overflow: bool,
}

const SCOPED_MAX: usize = 4;

impl Scoped {
    fn push(&mut self, remove: fn(&mut Extensions)) {
        match self.removers.iter_mut().find(|r| r.is_none()) {
            Some(slot) => *slot = Some(remove),
            None => self.overflow = true,
        }
    }

    /// How many values are listed; `None` after an overflow.
    fn count(&self) -> Option<usize> {
        (!self.overflow).then(|| self.removers.iter().flatten().count())
    }
}

/// The client as believed: the peer, or the address a trusted proxy forwarded for. Set by
/// [`ClientAddrLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// The client address of a request: [`ClientIp`] if a [`ClientAddrLayer`] resolved one,
/// else the peer of [`ClientAddr`].
pub fn client_ip(extensions: &Extensions) -> Option<IpAddr> {
    extensions
        .get::<ClientIp>()
        .map(|c| c.0)
        .or_else(|| extensions.get::<ClientAddr>().map(|a| a.0.ip()))
}

/// A [`TrustedProxies`] list that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid trusted proxy {0:?}: expected an IP address or CIDR such as 10.0.0.0/8")]
pub struct TrustedProxiesError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            // An IPv4-mapped IPv6 peer (dual-stack listener) matches IPv4 networks.
            (IpAddr::V4(net), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|ip| prefix_eq(&net.octets(), &ip.octets(), self.prefix)),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = prefix % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

impl FromStr for Net {
    type Err = TrustedProxiesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TrustedProxiesError(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Net { addr, prefix })
    }
}

/// The peers whose `X-Forwarded-For` is believed (nginx `set_real_ip_from`). Empty by
/// default: no incoming `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<Net>,
}

impl TrustedProxies {
    /// Trusts nobody.
    pub fn none() -> Self {
        Self::default()
    }

    /// Trusts proxies on loopback addresses (`127.0.0.0/8`, `::1`).
    pub fn loopback() -> Self {
        TrustedProxies {
            nets: vec![
                Net {
                    addr: IpAddr::from([127, 0, 0, 0]),
                    prefix: 8,
                },
                Net {
                    addr: IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
                    prefix: 128,
                },
            ],
        }
    }

    /// `true` when `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }
}

/// A comma-separated list of addresses and CIDR networks: `"127.0.0.1, 10.0.0.0/8, ::1"`.
impl FromStr for TrustedProxies {
    type Err = TrustedProxiesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let nets = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(Net::from_str)
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { nets })
    }
}

/// All `X-Forwarded-For` lines of `headers` joined with `", "`, as RFC 9110 §5.3 says
/// repeated fields combine. `None` when there is none.
pub(crate) fn joined_forwarded_for(headers: &HeaderMap) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for v in headers.get_all(X_FORWARDED_FOR) {
        let out = out.get_or_insert_with(Vec::new);
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// One `X-Forwarded-For` element: an address, optionally with a port (`[::1]:80`, `1.2.3.4:80`).
fn parse_element(e: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(e).ok()?.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// The client behind a trusted `peer` according to `xff`: the rightmost element that is
/// not a trusted proxy (the leftmost when all are trusted).
///
/// An element that cannot be read fails closed: the client is the unspecified address
/// (`0.0.0.0`), which no loopback or allow-list check admits. Stopping at the last
/// readable element instead would name a trusted proxy — often loopback — as the client.
fn resolve(peer: IpAddr, xff: &[u8], trusted: &TrustedProxies) -> IpAddr {
    let mut client = peer;
    for element in xff.rsplit(|b| *b == b',') {
        match parse_element(element) {
            Some(ip) => {
                client = ip;
                if !trusted.contains(ip) {
                    break;
                }
            }
            None => return IpAddr::from([0, 0, 0, 0]),
        }
    }
    client
}

/// Finds the client address of every request under any server; see the
/// [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct ClientAddrLayer {
    trusted: Arc<TrustedProxies>,
    peer: Option<SocketAddr>,
}

impl ClientAddrLayer {
    /// Believes no incoming `X-Forwarded-For`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Believes `X-Forwarded-For` from these peers.
    pub fn trust(mut self, trusted: TrustedProxies) -> Self {
        self.trusted = Arc::new(trusted);
        self
    }

    /// The peer to use when the server gives none (hyper-util's server: make one layer per
    /// accepted connection with its peer address).
    pub fn peer(mut self, peer: SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }
}

impl<S> Layer<S> for ClientAddrLayer {
    type Service = ClientAddrService<S>;
    fn layer(&self, inner: S) -> ClientAddrService<S> {
        ClientAddrService {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ClientAddrLayer`].
#[derive(Clone)]
pub struct ClientAddrService<S> {
    inner: S,
    layer: ClientAddrLayer,
}

impl<S: fmt::Debug> fmt::Debug for ClientAddrService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAddrService")
            .field("inner", &self.inner)
            .field("trusted", &self.layer.trusted)
            .finish()
    }
}

fn server_peer(ext: &Extensions) -> Option<SocketAddr> {
    if let Some(a) = ext.get::<ClientAddr>() {
        return Some(a.0);
    }
    #[cfg(feature = "axum")]
    if let Some(c) = ext.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(c.0);
    }
    None
}

impl<S, B> Service<Request<B>> for ClientAddrService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let peer = server_peer(req.extensions()).or(self.layer.peer);
        let Some(peer) = peer else {
            // No address at all: nothing can be believed about the client.
            req.headers_mut().remove(X_FORWARDED_FOR);
            return self.inner.call(req);
        };
        let trusted = self.layer.trusted.contains(peer.ip());
        let xff = joined_forwarded_for(req.headers());
        let client = match (&xff, trusted) {
            (Some(xff), true) => resolve(peer.ip(), xff, &self.layer.trusted),
            _ => peer.ip(),
        };
        let headers = req.headers_mut();
        headers.remove(X_FORWARDED_FOR);
        if let (Some(xff), true) = (xff, trusted) {
            // One line, so nothing downstream reads only the first of several.
            if let Ok(v) = HeaderValue::from_bytes(&xff) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
        let ext = req.extensions_mut();
        ext.insert(ClientAddr(peer));
        ext.insert(ClientIp(client));
        self.inner.call(req)
    }
}

#[cfg(test)]
#[path = "client_addr_recycle_tests.rs"]
mod recycle_tests;

#[cfg(test)]
#[path = "client_addr_tests.rs"]
mod tests;
