//! What the link costs in bytes on the wire.
//!
//! The kernel counts it for us: `TCP_INFO` on the broker connection gives the
//! bytes TCP carried (TLS records, retransmissions and the handshake included) and
//! the segments it sent and received (pure ACKs, SYN and FIN included), so the
//! bytes on the wire are those plus one TCP/IP header per segment (IPv4 or IPv6,
//! with the timestamp option when it was negotiated). rumqttc owns the socket, so
//! the link finds it once per connection, right after CONNACK, among the process's
//! descriptors (a TCP socket whose peer is the broker's port, the one that just
//! received data) and reads it after every event; the last reading of a connection
//! is kept when it ends. Where `TCP_INFO` is not available (qemu-user, for one),
//! the wire is estimated from the MQTT packets: one header per packet and one per
//! ACK segment.
//!
//! MQTT packets are also counted by what they are: connects (everything up to
//! CONNACK plus SUBSCRIBE/SUBACK), keepalive (PINGREQ/PINGRESP), the link's own
//! presence publishes, and the rest (the caller's publishes, which the caller
//! attributes itself).

use std::os::fd::RawFd;

/// Bytes on the wire and MQTT packet bytes, since the link started. Monotonic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkUsage {
    /// Bytes on the wire, TCP/IP headers included.
    pub wire_up: u64,
    pub wire_down: u64,
    /// Of those, spent connecting: TCP and TLS handshakes, CONNECT/CONNACK,
    /// SUBSCRIBE/SUBACK.
    pub connect_up: u64,
    pub connect_down: u64,
    /// MQTT bytes of PINGREQ/PINGRESP and one TCP/IP header each.
    pub keepalive_up: u64,
    pub keepalive_down: u64,
    /// The link's own presence publishes (on connect) and their PUBACKs.
    pub presence_up: u64,
    pub presence_down: u64,
    /// Connections made.
    pub connects: u64,
    /// Whether the wire figures of the last connection were read from the kernel
    /// (`TCP_INFO`) rather than estimated.
    pub measured: bool,
}

/// TCP/IP header bytes per segment: IPv4 (20) or IPv6 (40), TCP (20), and the
/// timestamp option (12) when negotiated.
fn header_bytes(v6: bool, timestamps: bool) -> u64 {
    (if v6 { 40 } else { 20 }) + 20 + if timestamps { 12 } else { 0 }
}

/// The estimate used without `TCP_INFO`: IPv4 with timestamps, Linux's default.
const EST_HEADER: u64 = 52;

/// One reading of a connection: TCP bytes and segments each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Reading {
    bytes_up: u64,
    bytes_down: u64,
    segs_up: u64,
    segs_down: u64,
    header: u64,
}

impl Reading {
    fn wire(&self) -> (u64, u64) {
        (
            self.bytes_up + self.segs_up * self.header,
            self.bytes_down + self.segs_down * self.header,
        )
    }
}

/// The broker socket of the current connection, as found after CONNACK.
#[derive(Debug)]
struct Socket {
    fd: RawFd,
    inode: u64,
    v6: bool,
}

/// The link thread's counters; [`Meter::usage`] is what the handles see.
#[derive(Debug, Default)]
pub(super) struct Meter {
    usage: LinkUsage,
    socket: Option<Socket>,
    /// Wire bytes of closed connections.
    closed_up: u64,
    closed_down: u64,
    /// The current connection: its last reading (kernel or estimate).
    last: Reading,
    /// MQTT packets of the current connection, for the estimate.
    est: Reading,
    /// SUBSCRIBE/SUBACK of this connection still to be counted as connecting.
    connecting: bool,
}

impl Meter {
    pub(super) fn usage(&self) -> LinkUsage {
        let (up, down) = self.last.wire();
        LinkUsage {
            wire_up: self.closed_up + up,
            wire_down: self.closed_down + down,
            ..self.usage
        }
    }

    /// CONNACK arrived: find the socket, and count everything so far as connecting.
    pub(super) fn connected(&mut self, port: u16, connect_packet: u64, connack: u64) {
        self.usage.connects += 1;
        self.connecting = true;
        self.socket = find_socket(port);
        self.usage.measured = self.socket.is_some();
        self.est = Reading {
            bytes_up: connect_packet,
            bytes_down: connack,
            // SYN, ACK of the SYN-ACK, CONNECT; SYN-ACK, CONNACK.
            segs_up: 3,
            segs_down: 2,
            header: EST_HEADER,
        };
        self.last = Reading::default();
        self.sample();
        let (up, down) = self.last.wire();
        self.usage.connect_up += up;
        self.usage.connect_down += down;
    }

    /// An MQTT packet of `n` bytes went out (`up`) or came in.
    pub(super) fn packet(&mut self, kind: Packet, up: bool, n: u64) {
        let wire = n + EST_HEADER;
        let (mine_up, mine_down) = match kind {
            Packet::Subscribe if self.connecting => {
                (&mut self.usage.connect_up, &mut self.usage.connect_down)
            }
            Packet::Ping => (&mut self.usage.keepalive_up, &mut self.usage.keepalive_down),
            Packet::Presence => (&mut self.usage.presence_up, &mut self.usage.presence_down),
            _ => {
                self.count_est(up, n);
                return;
            }
        };
        if up {
            *mine_up += wire;
        } else {
            *mine_down += wire;
        }
        if kind == Packet::Subscribe && !up {
            // The SUBACK ends the connect.
            self.connecting = false;
        }
        self.count_est(up, n);
    }

    fn count_est(&mut self, up: bool, n: u64) {
        // One segment for the packet, one ACK coming back.
        if up {
            self.est.bytes_up += n;
            self.est.segs_up += 1;
            self.est.segs_down += 1;
        } else {
            self.est.bytes_down += n;
            self.est.segs_down += 1;
            self.est.segs_up += 1;
        }
    }

    /// Reads the kernel's counters of the current connection (or takes the
    /// estimate). Cheap: one `fstat` and one `getsockopt`.
    pub(super) fn sample(&mut self) {
        match &self.socket {
            // Not found at connect: the estimate is all there is.
            None => self.last = self.est,
            Some(socket) => {
                // Gone (closed under us): the last reading stands.
                if let Some(r) = read_socket(socket) {
                    self.last = r;
                }
            }
        }
    }

    /// The connection ended: keep what it cost.
    pub(super) fn disconnected(&mut self) {
        self.sample();
        let (up, down) = self.last.wire();
        self.closed_up += up;
        self.closed_down += down;
        self.last = Reading::default();
        self.est = Reading::default();
        self.socket = None;
        self.connecting = false;
    }
}

/// What an MQTT packet was, for [`Meter::packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Packet {
    Subscribe,
    Ping,
    Presence,
    Other,
}

/// The bytes of `struct tcp_info` read, as far as `tcpi_bytes_sent` (Linux 4.19).
const TCP_INFO_LEN: usize = 216;

fn find_socket(port: u16) -> Option<Socket> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    let mut best: Option<(u32, Socket)> = None;
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        let Some((peer_port, v6)) = peer_of(fd) else {
            continue;
        };
        if peer_port != port {
            continue;
        }
        let Some(info) = tcp_info(fd) else { continue };
        // ESTABLISHED, and the one that received data most recently: the CONNACK.
        if info[0] != 1 {
            continue;
        }
        let last_recv = u32_at(&info, 52);
        let Some(inode) = inode_of(fd) else { continue };
        if best.as_ref().is_none_or(|(t, _)| last_recv < *t) {
            best = Some((last_recv, Socket { fd, inode, v6 }));
        }
    }
    best.map(|(_, s)| s)
}

fn read_socket(s: &Socket) -> Option<Reading> {
    if inode_of(s.fd)? != s.inode {
        return None;
    }
    let info = tcp_info(s.fd)?;
    let timestamps = info[5] & 1 != 0;
    let bytes_sent = u64_at(&info, 200);
    Some(Reading {
        // tcpi_bytes_sent counts retransmissions; 0 on kernels before 4.19,
        // where bytes acknowledged is the next best.
        bytes_up: if bytes_sent > 0 {
            bytes_sent
        } else {
            u64_at(&info, 120)
        },
        bytes_down: u64_at(&info, 128),
        segs_up: u64::from(u32_at(&info, 136)),
        segs_down: u64::from(u32_at(&info, 140)),
        header: header_bytes(s.v6, timestamps),
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// `struct tcp_info` of a TCP socket, zero past what the kernel filled; `None`
/// if `fd` is not one or the call is not supported.
fn tcp_info(fd: RawFd) -> Option<[u8; TCP_INFO_LEN]> {
    // u64-aligned storage for the kernel's struct.
    let mut buf = [0u64; TCP_INFO_LEN / 8];
    let mut len = TCP_INFO_LEN as libc::socklen_t;
    // SAFETY: buf is writable for len bytes; the kernel writes at most len.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < 144 {
        return None;
    }
    let mut out = [0u8; TCP_INFO_LEN];
    for (i, word) in buf.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&word.to_ne_bytes());
    }
    Some(out)
}

/// The peer's port of a connected IPv4 or IPv6 socket, and whether it is IPv6.
fn peer_of(fd: RawFd) -> Option<(u16, bool)> {
    // SAFETY: sockaddr_storage is plain data, large enough for any address.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: addr is writable for len bytes.
    let rc = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let v4: &libc::sockaddr_in = unsafe { &*(&raw const addr).cast() };
            Some((u16::from_be(v4.sin_port), false))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let v6: &libc::sockaddr_in6 = unsafe { &*(&raw const addr).cast() };
            Some((u16::from_be(v6.sin6_port), true))
        }
        _ => None,
    }
}

fn inode_of(fd: RawFd) -> Option<u64> {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is writable.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    (rc == 0).then_some(st.st_ino as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_connection_is_found_and_read_from_the_kernel() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(&[0x20, 2, 0, 0]).unwrap();
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).unwrap();

        let mut meter = Meter::default();
        meter.connected(port, 20, 4);
        let usage = meter.usage();
        assert!(usage.measured, "TCP_INFO is readable on Linux");
        assert_eq!(usage.connects, 1);
        // Three segments of the handshake up, at least 52 bytes each, and the
        // four bytes down with their segment.
        assert!(usage.wire_up >= 3 * 52, "{usage:?}");
        assert!(usage.wire_down >= 4 + 2 * 52, "{usage:?}");
        assert_eq!(usage.connect_up, usage.wire_up);

        client.write_all(&[0xc0, 0]).unwrap();
        let mut ping = [0u8; 2];
        server.read_exact(&mut ping).unwrap();
        meter.packet(Packet::Ping, true, 2);
        meter.sample();
        let after = meter.usage();
        // The ping's segment (tcpi_bytes_sent counts the SYN as a byte, too).
        assert!(after.wire_up > usage.wire_up + 52, "{after:?}");
        assert_eq!(after.keepalive_up, 2 + EST_HEADER);

        drop(client);
        meter.disconnected();
        let closed = meter.usage();
        assert!(closed.wire_up >= after.wire_up);
        // A new connection adds to the old.
        meter.connected(port, 20, 4);
        assert!(meter.usage().wire_up >= closed.wire_up);
    }

    #[test]
    fn without_a_socket_the_wire_is_estimated_from_packets() {
        let mut meter = Meter::default();
        // No such connection: the estimate stands.
        meter.connected(1, 30, 4);
        let usage = meter.usage();
        assert!(!usage.measured);
        assert_eq!(usage.wire_up, 30 + 3 * EST_HEADER);
        assert_eq!(usage.wire_down, 4 + 2 * EST_HEADER);
        meter.packet(Packet::Other, true, 100);
        meter.sample();
        assert_eq!(meter.usage().wire_up, 130 + 4 * EST_HEADER);
        assert_eq!(meter.usage().wire_down, 4 + 3 * EST_HEADER);
    }
}
