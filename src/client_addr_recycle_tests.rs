//! Tests of `client_addr`'s map recycling (`recycle`, `insert_scoped`).

use super::*;

fn addr(port: u16) -> ClientAddr {
    ClientAddr(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Recycles `first`'s map, checks it was taken, and gives the next request's map with the
/// address of port 2 in it (the recycled one, in the server).
fn recycle_for_next(first: &mut Extensions) -> Extensions {
    recycle(first);
    assert!(first.is_empty(), "taken for the next request");
    let mut next = Extensions::new();
    insert_client_addr(&mut next, addr(2));
    assert_eq!(next.get::<ClientAddr>(), Some(&addr(2)));
    next
}

#[test]
fn a_reused_map_carries_the_new_address_and_nothing_else() {
    let mut first = Extensions::new();
    insert_client_addr(&mut first, addr(1));
    let next = recycle_for_next(&mut first);
    assert_eq!(next.len(), 1);
}

#[test]
fn a_map_holding_more_than_the_address_is_left_to_its_request() {
    let mut ext = Extensions::new();
    insert_client_addr(&mut ext, addr(1));
    ext.insert(7u32);
    recycle(&mut ext);
    assert_eq!(ext.len(), 2);
    assert_eq!(ext.get::<u32>(), Some(&7));
    // A request whose map is not empty gets its address inserted as usual.
    let mut busy = Extensions::new();
    busy.insert(8u64);
    insert_client_addr(&mut busy, addr(3));
    assert_eq!(busy.get::<ClientAddr>(), Some(&addr(3)));
    assert_eq!(busy.get::<u64>(), Some(&8));
}
#[derive(Clone, Debug, PartialEq)]
struct Scope1(u8);
#[derive(Clone, Debug, PartialEq)]
struct Scope2(u8);

#[test]
fn a_map_holding_scoped_values_too_is_taken_without_them() {
    let mut first = Extensions::new();
    insert_client_addr(&mut first, addr(1));
    insert_scoped(&mut first, Scope1(1));
    insert_scoped(&mut first, Scope2(2));
    let mut next = recycle_for_next(&mut first);
    // The previous request's values do not leak into the next one.
    assert!(next.get::<Scope1>().is_none());
    assert!(next.get::<Scope2>().is_none());
    // ... and the next one's go round the same way.
    insert_scoped(&mut next, Scope1(3));
    recycle(&mut next);
    assert!(next.is_empty());
}

#[test]
fn a_map_holding_scoped_values_and_anything_else_keeps_all_of_it() {
    let mut ext = Extensions::new();
    insert_client_addr(&mut ext, addr(1));
    insert_scoped(&mut ext, Scope1(1));
    ext.insert(7u32);
    recycle(&mut ext);
    assert_eq!(ext.get::<Scope1>(), Some(&Scope1(1)));
    assert_eq!(ext.get::<u32>(), Some(&7));
}

#[test]
fn a_scoped_value_replaced_by_a_foreign_one_keeps_the_foreign_one() {
    let mut ext = Extensions::new();
    insert_client_addr(&mut ext, addr(1));
    insert_scoped(&mut ext, Scope1(1));
    insert_scoped(&mut ext, Scope2(2));
    ext.remove::<Scope2>();
    ext.insert(7u32);
    recycle(&mut ext);
    assert_eq!(ext.get::<u32>(), Some(&7), "someone else's value stays");
    assert!(ext.get::<ClientAddr>().is_some());
}

#[test]
fn a_map_without_the_servers_address_lists_nothing() {
    let mut ext = Extensions::new();
    insert_scoped(&mut ext, Scope1(1));
    assert_eq!(ext.len(), 1, "no list: one allocation fewer a request");
    assert_eq!(ext.get::<Scope1>(), Some(&Scope1(1)));
}

#[test]
fn under_another_server_nothing_is_listed_or_taken() {
    // A fresh thread: this crate's server never ran here (axum's server, with
    // `ClientAddrLayer` putting the address as a plain extension).
    std::thread::spawn(|| {
        let mut ext = Extensions::new();
        ext.insert(addr(1));
        insert_scoped(&mut ext, Scope1(1));
        assert_eq!(ext.len(), 2, "no list: one allocation fewer a request");
        recycle(&mut ext);
        assert_eq!(ext.len(), 2, "nobody takes a spare on this thread");
        assert_eq!(ext.get::<Scope1>(), Some(&Scope1(1)));
    })
    .join()
    .unwrap();
}

#[test]
fn more_scoped_values_than_listed_keep_the_map() {
    #[derive(Clone)]
    struct S3;
    #[derive(Clone)]
    struct S4;
    #[derive(Clone)]
    struct S5;
    let mut ext = Extensions::new();
    insert_client_addr(&mut ext, addr(1));
    insert_scoped(&mut ext, Scope1(1));
    insert_scoped(&mut ext, Scope2(2));
    insert_scoped(&mut ext, S3);
    insert_scoped(&mut ext, S4);
    insert_scoped(&mut ext, S5);
    recycle(&mut ext);
    assert!(ext.get::<S5>().is_some(), "not listed: the map stays");
}
