//! Tests of `client_addr`: trusted proxies and the client address they resolve.

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn cidr_membership() {
    let t: TrustedProxies = "10.0.0.0/8, 192.168.1.0/25, ::1".parse().unwrap();
    assert!(t.contains(ip("10.200.3.4")));
    assert!(t.contains(ip("192.168.1.127")));
    assert!(!t.contains(ip("192.168.1.128")));
    assert!(t.contains(ip("::1")));
    assert!(t.contains(ip("::ffff:10.1.2.3")));
    assert!(!t.contains(ip("11.0.0.1")));
    assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
    assert!("nonsense".parse::<TrustedProxies>().is_err());
}

#[test]
fn rightmost_untrusted_is_the_client() {
    let t: TrustedProxies = "10.0.0.0/8".parse().unwrap();
    let peer = ip("10.0.0.1");
    assert_eq!(
        resolve(peer, b"6.6.6.6, 1.2.3.4, 10.0.0.9", &t),
        ip("1.2.3.4")
    );
    // An unreadable element fails closed: not the trusted proxy next to it.
    assert_eq!(resolve(peer, b"1.2.3.4, junk, 10.0.0.9", &t), ip("0.0.0.0"));
    assert_eq!(resolve(peer, b"10.0.0.7, 10.0.0.9", &t), ip("10.0.0.7"));
    assert_eq!(resolve(peer, b"[::1]:80", &t), ip("::1"));
}
