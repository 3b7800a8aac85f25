//! Hostile connections (issue 7, "bad input"), on the real keyseald:
//!
//! - 10,000 connections to the gRPC socket, opened in waves of 500 that
//!   are held (silent, a truncated HTTP/2 preface, or garbage) and then
//!   abandoned; between waves another client is served, and afterwards the
//!   daemon's open file descriptors return to where they were and writes
//!   still work.
//! - slowloris on the proxy gateway: 200 connections that trickle a request
//!   header a byte at a time; another client is answered meanwhile, and the
//!   slow ones are closed by the header timeout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::{TestDaemon, ROOT_POLICY};
use common::proxy::free_port;
use common::Backend;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits (at most 20 s) until keyseald holds at most `limit` descriptors.
fn wait_fds_at_most(pid: u32, limit: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = fd_count(pid);
        if n <= limit {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "keyseald still holds {n} descriptors (limit {limit}) 20 s after the clients left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ten_thousand_abandoned_connections() {
    const WAVES: usize = 20;
    const PER_WAVE: usize = 500;
    let mut d = TestDaemon::start(Backend::SoftHsm, ROOT_POLICY);
    d.put("hostile/x", b"v1");
    let pid = d.pid().unwrap();
    let before = fd_count(pid);
    let started = Instant::now();
    let mut peak = before;
    for wave in 0..WAVES {
        let mut held = Vec::with_capacity(PER_WAVE);
        for i in 0..PER_WAVE {
            let mut s = UnixStream::connect(&d.socket)
                .unwrap_or_else(|e| panic!("wave {wave}, connection {i}: connect: {e}"));
            match i % 3 {
                0 => {}
                1 => {
                    let _ = s.write_all(b"PRI * HTTP/2.0\r\n");
                }
                _ => {
                    let _ = s.write_all(&[0xff; 64]);
                }
            }
            held.push(s);
        }
        peak = peak.max(fd_count(pid));
        // Another client is served while these are held.
        assert_eq!(d.get("hostile/x"), b"v1", "wave {wave}");
        drop(held);
    }
    let after = wait_fds_at_most(pid, before + 8);
    assert!(d.pid().is_some(), "keyseald exited");
    d.put("hostile/x", b"v2");
    assert_eq!(d.get("hostile/x"), b"v2");
    println!(
        "hostile_conns: {} connections opened and abandoned in {:.1} s; keyseald fds before {before}, peak {peak}, after {after}",
        WAVES * PER_WAVE,
        started.elapsed().as_secs_f64()
    );
    d.stop();
}

#[test]
fn slowloris_on_the_proxy_gateway() {
    const SLOW: usize = 200;
    let gw = free_port();
    let d = TestDaemon::start_with(
        Backend::SoftHsm,
        ROOT_POLICY,
        &format!("[proxy]\ngateway_listen = \"127.0.0.1:{gw}\"\nheader_timeout_secs = 2\n"),
    );
    let pid = d.pid().unwrap();
    let before = fd_count(pid);
    let started = Instant::now();
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let mut s = TcpStream::connect(("127.0.0.1", gw)).unwrap();
        s.write_all(b"GET /p/none/x HTTP/1.1\r\nHost: localhost\r\n")
            .unwrap();
        slow.push(s);
    }
    // Trickle one header byte per connection every 200 ms for ~6 s, well
    // past the 2 s header timeout, while another client is answered.
    let mut answered_meanwhile = None;
    let mut closed = [false; SLOW];
    for tick in 0..30 {
        for (i, s) in slow.iter_mut().enumerate() {
            if !closed[i] && s.write_all(b"X").is_err() {
                closed[i] = true;
            }
        }
        if tick == 5 {
            let t = Instant::now();
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
                .arg(format!("http://127.0.0.1:{gw}/p/none/x"))
                .output()
                .unwrap();
            let code = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                code.starts_with('4'),
                "a normal request during the slowloris got {code:?}"
            );
            answered_meanwhile = Some((code, t.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every slow connection has been closed by the server: a read gives
    // EOF or an error (hyper may answer 408 first), never blocks.
    let mut by_server = 0;
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => by_server += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => by_server += 1,
        }
    }
    assert_eq!(
        by_server, SLOW,
        "only {by_server} of {SLOW} slow connections were closed by the header timeout"
    );
    drop(slow);
    let after = wait_fds_at_most(pid, before + 8);
    let (code, took) = answered_meanwhile.unwrap();
    println!(
        "hostile_conns: slowloris {SLOW} connections over {:.1} s: all closed by the 2 s header timeout; a normal request meanwhile got {code} in {} ms; keyseald fds before {before}, after {after}",
        started.elapsed().as_secs_f64(),
        took.as_millis()
    );
}
