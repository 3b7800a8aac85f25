//! Who owns the other end of a loopback TCP connection: one netlink
//! `NETLINK_SOCK_DIAG` query (`SOCK_DIAG_BY_FAMILY` with an
//! `inet_diag_req_v2` naming the exact 4-tuple, as `ss` does) answers with
//! the peer socket's `inet_diag_msg`: its owner uid and inode.
//!
//! No `unsafe`: the request and the answer are built and parsed as bytes
//! (the kernel ABI is fixed: `linux/netlink.h`, `linux/inet_diag.h`,
//! `linux/sock_diag.h`), and the socket calls are nix's safe wrappers.
//!
//! Only sockets in a live state count: a TIME_WAIT or request socket is a
//! kernel pseudo-socket that reports uid 0, and a listener could be found
//! by the lookup when the connection is gone, so both are refused, as is
//! an answer whose 4-tuple is not exactly the one asked for.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x01;
const NLMSG_ERROR: u16 = 0x02;
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`.
const REQ_LEN: usize = 56;
/// `sizeof(struct inet_diag_msg)`.
const MSG_LEN: usize = 72;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// TCP states (`include/net/tcp_states.h`) in which a socket is a real one
/// held by a process: ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT,
/// LAST_ACK, CLOSING.
const LIVE_STATES: [u8; 6] = [1, 4, 5, 8, 9, 11];

/// The owner of a TCP socket as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    /// `idiag_uid`: the uid that created the socket.
    pub uid: u32,
    /// `idiag_inode` of the socket.
    pub inode: u32,
}

/// Why no owner was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SockDiagError {
    #[error("the addresses are not both IPv4 or both IPv6")]
    MixedFamilies,
    #[error("no live TCP socket has this 4-tuple")]
    NotFound,
    #[error("sock_diag netlink query failed: {0}")]
    Sys(#[from] nix::Error),
    #[error("sock_diag answered something unexpected: {0}")]
    Protocol(&'static str),
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The 16 address bytes of `inet_diag_sockid` (IPv4 in the first 4).
fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

/// The netlink message asking for the socket whose own address is `src`
/// and whose remote address is `dst`.
fn request(src: SocketAddr, dst: SocketAddr, seq: u32) -> Result<Vec<u8>, SockDiagError> {
    let family = match (canonical(src.ip()), canonical(dst.ip())) {
        (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
        _ => return Err(SockDiagError::MixedFamilies),
    };
    let total = NLMSG_HDRLEN + REQ_LEN;
    let mut m = Vec::with_capacity(total);
    // struct nlmsghdr (host byte order)
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
                                              // struct inet_diag_req_v2
    m.push(family);
    m.push(IPPROTO_TCP);
    m.push(0); // idiag_ext: no extensions
    m.push(0); // pad
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: all
                                                  // struct inet_diag_sockid (ports and addresses in network order)
    m.extend_from_slice(&src.port().to_be_bytes());
    m.extend_from_slice(&dst.port().to_be_bytes());
    m.extend_from_slice(&addr_bytes(canonical(src.ip())));
    m.extend_from_slice(&addr_bytes(canonical(dst.ip())));
    m.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if: any
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    debug_assert_eq!(m.len(), total);
    Ok(m)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Parses the kernel's answer to [`request`] and checks it names exactly
/// the socket asked for, in a live state.
fn parse(
    buf: &[u8],
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
) -> Result<SocketOwner, SockDiagError> {
    let bad = SockDiagError::Protocol;
    let len = u32_at(buf, 0).ok_or(bad("short header"))? as usize;
    let kind = u16_at(buf, 4).ok_or(bad("short header"))?;
    if len < NLMSG_HDRLEN || len > buf.len() {
        return Err(bad("bad length"));
    }
    if u32_at(buf, 8) != Some(seq) {
        return Err(bad("sequence number mismatch"));
    }
    let body = &buf[NLMSG_HDRLEN..len];
    if kind == NLMSG_ERROR {
        let errno = u32_at(body, 0).ok_or(bad("short error"))? as i32;
        return match -errno {
            0 => Err(bad("acknowledgement without an answer")),
            e if e == nix::libc::ENOENT => Err(SockDiagError::NotFound),
            e => Err(SockDiagError::Sys(nix::Error::from_raw(e))),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY || body.len() < MSG_LEN {
        return Err(bad("not an inet_diag_msg"));
    }
    // struct inet_diag_msg: family, state, timer, retrans, sockid (48),
    // expires, rqueue, wqueue, uid, inode.
    let (family, state) = (body[0], body[1]);
    let sport = u16::from_be_bytes([body[4], body[5]]);
    let dport = u16::from_be_bytes([body[6], body[7]]);
    let ip = |raw: &[u8]| -> IpAddr {
        let mut a = [0u8; 16];
        a.copy_from_slice(raw);
        if family == AF_INET {
            IpAddr::from([a[0], a[1], a[2], a[3]])
        } else {
            canonical(IpAddr::V6(Ipv6Addr::from(a)))
        }
    };
    let (s_ip, d_ip) = (ip(&body[8..24]), ip(&body[24..40]));
    if (s_ip, sport) != (canonical(src.ip()), src.port())
        || (d_ip, dport) != (canonical(dst.ip()), dst.port())
    {
        return Err(SockDiagError::NotFound);
    }
    if !LIVE_STATES.contains(&state) {
        return Err(SockDiagError::NotFound);
    }
    Ok(SocketOwner {
        uid: u32_at(body, 64).ok_or(bad("short message"))?,
        inode: u32_at(body, 68).ok_or(bad("short message"))?,
    })
}

/// The owner of the live TCP socket whose local address is `src` and whose
/// remote address is `dst` (for a connection accepted by us: `src` = the
/// peer's address, `dst` = our local address). Blocking (one netlink round
/// trip, at most 2 s).
pub fn tcp_owner(src: SocketAddr, dst: SocketAddr) -> Result<SocketOwner, SockDiagError> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let msg = request(src, dst, seq)?;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(2, 0))?;
    sendto(
        fd.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = [0u8; 8192];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    parse(&buf[..n], src, dst, seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn own_uid() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn finds_both_ends_of_a_loopback_connection_v4_and_v6() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = TcpListener::bind(host) else {
                continue; // no IPv6 loopback here
            };
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, peer) = l.accept().unwrap();
            let local = s.local_addr().unwrap();
            // The client's socket, seen from the server side.
            let o = tcp_owner(peer, local).unwrap();
            assert_eq!(o.uid, own_uid());
            assert!(o.inode > 0);
            // The server's own socket, the other way round.
            let o2 = tcp_owner(local, peer).unwrap();
            assert_ne!(o.inode, o2.inode);
            // A port off by one is not this connection.
            let other = SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
            assert!(matches!(
                tcp_owner(other, local),
                Err(SockDiagError::NotFound)
            ));
            drop(c);
        }
    }

    #[test]
    fn a_closed_client_is_not_found() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        // The client closes first: its socket goes to TIME_WAIT after our
        // close, a pseudo-socket reporting uid 0 — never an identity.
        drop(c);
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
        assert!(tcp_owner(peer, local).is_err());
    }

    #[test]
    fn mixed_families_are_refused() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "[::1]:2".parse().unwrap();
        assert!(matches!(tcp_owner(a, b), Err(SockDiagError::MixedFamilies)));
    }

    #[test]
    fn request_layout() {
        let a: SocketAddr = "127.0.0.1:4660".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:80".parse().unwrap();
        let m = request(a, b, 7).unwrap();
        assert_eq!(m.len(), 72);
        assert_eq!(&m[16..18], &[AF_INET, IPPROTO_TCP]);
        assert_eq!(&m[24..26], &[0x12, 0x34]);
        assert_eq!(&m[26..28], &[0, 80]);
        assert_eq!(&m[28..32], &[127, 0, 0, 1]);
        assert_eq!(&m[44..48], &[127, 0, 0, 2]);
    }
}
