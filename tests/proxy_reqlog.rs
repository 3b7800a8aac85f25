//! The proxy request log's move out of sled: a store written by an earlier
//! build (entries in the `proxy_log` tree) opens with every entry moved
//! into the log files, queryable as before, and the tree gone.

mod common;

use std::sync::Arc;

use common::{Backend, Fixture};
use keyseal::proxy::store::LogEntry;
use keyseal::proxy::ProxyStore;

fn entry(proxy: &str, t: u64) -> LogEntry {
    LogEntry {
        time_us: t,
        proxy: proxy.into(),
        caller: "key:k1".into(),
        method: "GET".into(),
        path: format!("/v1/{t}"),
        status: 200,
        latency_us: 7,
        bytes_in: 0,
        bytes_out: 2,
        decision: "allow".into(),
        rule: Some("r1".into()),
    }
}

#[test]
fn old_sled_request_log_is_moved_to_the_log_files() {
    let (fx, s) = Fixture::new(Backend::SoftHsm);
    {
        // As the earlier build keyed it: proxy || 0 || time BE || seq BE.
        let old = s.store().db.open_tree("proxy_log").unwrap();
        for (i, (p, t)) in [("a", 30u64), ("a", 10), ("b", 20), ("a", 20)]
            .into_iter()
            .enumerate()
        {
            let mut k = p.as_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(&t.to_be_bytes());
            k.extend_from_slice(&(i as u64).to_be_bytes());
            old.insert(k, postcard::to_stdvec(&entry(p, t)).unwrap())
                .unwrap();
        }
        old.insert(b"a\0garbage", vec![0xff; 3]).unwrap();
    }
    let s = Arc::new(s);
    let p = ProxyStore::open(s.clone()).unwrap();
    let a = p.query_log("a", 0, 0, 100).unwrap();
    assert_eq!(a, vec![entry("a", 10), entry("a", 20), entry("a", 30)]);
    assert_eq!(p.query_log("b", 0, 0, 100).unwrap(), vec![entry("b", 20)]);
    assert!(!s
        .store()
        .db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == b"proxy_log"));
    // New entries join the moved ones; all survive a reopen.
    p.log(entry("a", 15));
    drop(p);
    let p = ProxyStore::open(s.clone()).unwrap();
    let times: Vec<u64> = p
        .query_log("a", 0, 0, 100)
        .unwrap()
        .iter()
        .map(|e| e.time_us)
        .collect();
    assert_eq!(times, [10, 15, 20, 30]);
    assert!(fx.store_path().join("proxy-log").is_dir());
}
