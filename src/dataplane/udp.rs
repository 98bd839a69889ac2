//! The WireGuard UDP port: one dual-stack socket, batched receive, and sends that wait for room.
//!
//! quinn-udp does the syscalls (`recvmmsg` with GRO on receive, `sendmsg` on send); this module
//! owns the socket's lifetime (so `wg set listen-port` can swap it), the blocking-with-timeout
//! behaviour the dataplane threads want, and the IPv4-mapped address handling of a dual-stack
//! socket. It knows nothing of WireGuard.

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Datagrams one `sendmmsg` call carries in [`UdpPort::send_many`].
pub const SEND_BATCH: usize = 64;
/// Datagrams one receive call can return.
pub const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;
/// Socket buffer size we ask for: enough for a burst at several Gbit/s.
const SOCKET_BUFFER: usize = 4 << 20;

/// Gives the socket `wanted` bytes of buffer each way ([`SOCKET_BUFFER`]). `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (with
/// CAP_NET_ADMIN, which meshd has for its TUN device) go past `net.core.rmem_max`/`wmem_max`,
/// whose Debian default (208 KiB) holds about 90 full-size datagrams: a burst of a few hundred
/// microseconds at 10 Gbit/s. Without the capability the plain options are used, which the
/// kernel caps at those limits; a buffer smaller than asked for is logged, with the fix.
fn size_buffers(socket: &UdpSocket, wanted: usize) {
    type Set = fn(&Socket, usize) -> io::Result<()>;
    type Get = fn(&Socket) -> io::Result<usize>;
    let sock = socket2::SockRef::from(socket);
    for (force, set, get, name, limit) in [
        (
            libc::SO_RCVBUFFORCE,
            Socket::set_recv_buffer_size as Set,
            Socket::recv_buffer_size as Get,
            "receive",
            "net.core.rmem_max",
        ),
        (
            libc::SO_SNDBUFFORCE,
            Socket::set_send_buffer_size,
            Socket::send_buffer_size,
            "send",
            "net.core.wmem_max",
        ),
    ] {
        if force_size(socket.as_raw_fd(), force, wanted).is_err() {
            let _ = set(&sock, wanted);
        }
        // The kernel reports twice what it grants (the doubling covers its bookkeeping).
        let got = get(&sock).map_or(0, |v| v / 2);
        if got < wanted {
            tracing::warn!(
                wanted,
                got,
                "the UDP port's {name} buffer is smaller than meshd asks for, so bursts may be \
                 dropped: give meshd CAP_NET_ADMIN or raise {limit} to at least {wanted}"
            );
        }
    }
}

/// Sets `SO_RCVBUFFORCE` or `SO_SNDBUFFORCE` (socket2 has only the capped options).
fn force_size(fd: RawFd, option: libc::c_int, value: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is an open socket; the option value is a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Why the UDP port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("listen port {port}/udp is already in use (another meshd, wireguard-go or WireGuard?): stop it or choose another port with listen_port / --listen-port")]
    InUse { port: u16 },
    #[error("cannot open UDP port {port}: {source}")]
    Other {
        port: u16,
        #[source]
        source: io::Error,
    },
}

/// A bound WireGuard port.
pub struct UdpPort {
    socket: UdpSocket,
    state: UdpSocketState,
    port: u16,
    /// An IPv4 socket, on a host without IPv6 (booted with `ipv6.disable=1`); otherwise
    /// dual-stack.
    ipv4_only: bool,
    closed: AtomicBool,
}

/// The form a dual-stack socket wants: IPv4 addresses as `::ffff:a.b.c.d`.
fn to_socket_form(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        v6 => v6,
    }
}

/// The form users and peers see: IPv4-mapped addresses back to plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Waits until `fd` has `events` (POLLIN, POLLOUT) or `timeout` passes; false on timeout or signal.
pub(crate) fn poll_fd(fd: i32, events: i16, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass a count of one.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(n > 0)
}

impl UdpPort {
    /// Binds `[::]:port` (IPv4 too). Port 0 picks a free port.
    pub fn bind(port: u16) -> Result<Self, BindError> {
        let other = |source| BindError::Other { port, source };
        // Dual-stack, unless the kernel has no IPv6 at all: then IPv4 alone.
        let (socket, addr, ipv4_only) =
            match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
                Ok(socket) => {
                    socket.set_only_v6(false).map_err(other)?;
                    (
                        socket,
                        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
                        false,
                    )
                }
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => (
                    Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(other)?,
                    SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
                    true,
                ),
                Err(e) => return Err(other(e)),
            };
        socket.bind(&addr.into()).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                BindError::InUse { port }
            } else {
                other(e)
            }
        })?;
        socket.set_nonblocking(true).map_err(other)?;
        let socket: UdpSocket = socket.into();
        let state = UdpSocketState::new(UdpSockRef::from(&socket)).map_err(other)?;
        size_buffers(&socket, SOCKET_BUFFER);
        let port = socket.local_addr().map_err(other)?.port();
        Ok(UdpPort {
            socket,
            state,
            port,
            ipv4_only,
            closed: AtomicBool::new(false),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// True on a host without IPv6: the port is IPv4 only, and IPv6 endpoints cannot be reached.
    pub fn is_ipv4_only(&self) -> bool {
        self.ipv4_only
    }

    /// `addr` as this socket takes it: IPv4-mapped on a dual-stack socket.
    fn socket_form(&self, addr: SocketAddr) -> SocketAddr {
        if self.ipv4_only {
            addr
        } else {
            to_socket_form(addr)
        }
    }

    /// Marks every datagram sent from now on with `mark` (`SO_MARK`, 0 for none), for policy
    /// routing (`wg set IFACE fwmark N`). Needs CAP_NET_ADMIN.
    pub fn set_mark(&self, mark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.socket).set_mark(mark)
    }

    /// Marks the port as replaced: its receive loop ends at its next wake-up.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// How many datagrams one [`UdpPort::send_segments`] call may carry (1 without UDP GSO).
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends one datagram, waiting (briefly) for socket buffer room rather than dropping.
    pub fn send_to(&self, payload: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.send_segments(payload, payload.len(), dst)
    }

    /// Sends `contents` as datagrams of `segment` bytes (the last may be shorter) in one
    /// `sendmsg` with UDP GSO. At most [`UdpPort::max_segments`] datagrams.
    pub fn send_segments(
        &self,
        contents: &[u8],
        segment: usize,
        dst: SocketAddr,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: self.socket_form(dst),
            ecn: None,
            contents,
            segment_size: (contents.len() > segment).then_some(segment),
            src_ip: None,
        };
        loop {
            match self
                .state
                .try_send(UdpSockRef::from(&self.socket), &transmit)
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !poll_fd(
                        self.socket.as_raw_fd(),
                        libc::POLLOUT,
                        Duration::from_millis(100),
                    )? {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    /// Sends datagrams, each to its own destination, in `sendmmsg` calls of up to [`SEND_BATCH`]:
    /// the path when UDP GSO is off. Waits (briefly) for buffer room like [`UdpPort::send_to`].
    /// Returns how many were sent before an error, with the error if there was one.
    pub fn send_many(&self, datagrams: &[(&[u8], SocketAddr)]) -> (usize, io::Result<()>) {
        let mut sent = 0;
        while sent < datagrams.len() {
            let chunk = &datagrams[sent..datagrams.len().min(sent + SEND_BATCH)];
            let unspecified = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
            let names: [SockAddr; SEND_BATCH] = std::array::from_fn(|i| {
                SockAddr::from(self.socket_form(chunk.get(i).map_or(unspecified, |d| d.1)))
            });
            let mut iovs: [libc::iovec; SEND_BATCH] = std::array::from_fn(|i| libc::iovec {
                iov_base: chunk
                    .get(i)
                    .map_or(std::ptr::null_mut(), |d| d.0.as_ptr() as *mut _),
                iov_len: chunk.get(i).map_or(0, |d| d.0.len()),
            });
            // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header.
            let mut msgs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
            for (i, msg) in msgs.iter_mut().enumerate().take(chunk.len()) {
                msg.msg_hdr.msg_name = names[i].as_ptr() as *mut libc::c_void;
                msg.msg_hdr.msg_namelen = names[i].len();
                msg.msg_hdr.msg_iov = &mut iovs[i];
                msg.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: `msgs[..chunk.len()]` point at `names` and `iovs`, which outlive the call,
            // and each iovec at a datagram borrowed for the whole function.
            let n = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    chunk.len() as u32,
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        match poll_fd(
                            self.socket.as_raw_fd(),
                            libc::POLLOUT,
                            Duration::from_millis(100),
                        ) {
                            Ok(true) => continue,
                            Ok(false) => return (sent, Err(err)),
                            Err(e) => return (sent, Err(e)),
                        }
                    }
                    _ => return (sent, Err(err)),
                }
            }
            sent += n as usize;
        }
        (sent, Ok(()))
    }

    /// Waits at most `timeout` for a datagram to receive; false when none came.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        poll_fd(self.socket.as_raw_fd(), libc::POLLIN, timeout)
    }

    /// Receives up to `bufs.len()` datagrams (GRO may merge several into one buffer: see
    /// `RecvMeta::stride`). Waits at most `timeout`; returns 0 when nothing arrived.
    pub fn recv_batch(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        timeout: Duration,
    ) -> io::Result<usize> {
        loop {
            match self.state.recv(UdpSockRef::from(&self.socket), bufs, meta) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wait(timeout)? {
                        return Ok(0);
                    }
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_round_trip() {
        let v4: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        assert_eq!(canonical(to_socket_form(v4)), v4);
        let v6: SocketAddr = "[fd00::2]:51820".parse().unwrap();
        assert_eq!(canonical(to_socket_form(v6)), v6);
    }

    #[test]
    fn socket_buffers_are_what_meshd_asks_for_even_above_the_sysctl_limits() {
        // The tests run as root, as meshd runs with CAP_NET_ADMIN: the forced options apply
        // above net.core.rmem_max / wmem_max (208 KiB on a stock Debian machine).
        let limit = |name: &str| -> usize {
            let path = format!("/proc/sys/net/core/{name}");
            std::fs::read_to_string(&path)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let wanted = 2 * limit("rmem_max").max(limit("wmem_max")).max(SOCKET_BUFFER);
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        size_buffers(&socket, wanted);
        let sock = socket2::SockRef::from(&socket);
        for granted in [sock.recv_buffer_size(), sock.send_buffer_size()] {
            assert_eq!(granted.unwrap(), 2 * wanted);
        }
        // And the port itself gets SOCKET_BUFFER.
        let port = UdpPort::bind(0).unwrap();
        let got = socket2::SockRef::from(&port.socket)
            .recv_buffer_size()
            .unwrap();
        assert_eq!(got, 2 * SOCKET_BUFFER);
    }

    #[test]
    fn port_in_use_is_named() {
        let first = UdpPort::bind(0).unwrap();
        let err = UdpPort::bind(first.port())
            .err()
            .expect("second bind must fail");
        let text = err.to_string();
        assert!(
            text.contains(&format!("listen port {}", first.port())),
            "{text}"
        );
        assert!(text.contains("--listen-port"), "{text}");
    }

    #[test]
    fn gso_send_arrives_as_separate_datagrams() {
        let a = UdpPort::bind(0).unwrap();
        let b = UdpPort::bind(0).unwrap();
        let dst: SocketAddr = format!("127.0.0.1:{}", b.port()).parse().unwrap();
        let segments = a.max_segments().min(3);
        let contents: Vec<u8> = (0..segments * 100 - 40).map(|i| (i / 100) as u8).collect();
        a.send_segments(&contents, 100, dst).unwrap();
        let mut storage = vec![[0u8; 4096]; RECV_BATCH];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); RECV_BATCH];
        let mut got = Vec::new();
        while got.iter().map(Vec::len).sum::<usize>() < contents.len() {
            let n = b
                .recv_batch(&mut bufs, &mut meta, Duration::from_secs(5))
                .unwrap();
            assert!(n > 0, "datagrams did not arrive");
            for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                got.extend(buf[..m.len].chunks(m.stride).map(<[u8]>::to_vec));
            }
        }
        let expected: Vec<Vec<u8>> = contents.chunks(100).map(<[u8]>::to_vec).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn send_many_reaches_several_destinations() {
        let a = UdpPort::bind(0).unwrap();
        let (b, c) = (UdpPort::bind(0).unwrap(), UdpPort::bind(0).unwrap());
        let to_b: SocketAddr = format!("127.0.0.1:{}", b.port()).parse().unwrap();
        let to_c: SocketAddr = format!("[::1]:{}", c.port()).parse().unwrap();
        let payloads: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let datagrams: Vec<(&[u8], SocketAddr)> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_slice(), if i % 2 == 0 { to_b } else { to_c }))
            .collect();
        let (sent, result) = a.send_many(&datagrams);
        result.unwrap();
        assert_eq!(sent, 100);
        for (port, parity) in [(&b, 0), (&c, 1)] {
            let mut storage = vec![[0u8; 2048]; RECV_BATCH];
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = vec![RecvMeta::default(); RECV_BATCH];
            let mut got = Vec::new();
            while got.len() < 50 {
                let n = port
                    .recv_batch(&mut bufs, &mut meta, Duration::from_secs(5))
                    .unwrap();
                assert!(n > 0, "datagrams did not arrive");
                for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                    got.extend(buf[..m.len].chunks(m.stride).map(<[u8]>::to_vec));
                }
            }
            let expected: Vec<Vec<u8>> = payloads.iter().skip(parity).step_by(2).cloned().collect();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn loopback_batch_receive() {
        let a = UdpPort::bind(0).unwrap();
        let b = UdpPort::bind(0).unwrap();
        let dst: SocketAddr = format!("127.0.0.1:{}", b.port()).parse().unwrap();
        a.send_to(b"one", dst).unwrap();
        a.send_to(b"two", dst).unwrap();
        let mut storage = vec![[0u8; 2048]; RECV_BATCH];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); RECV_BATCH];
        let mut got = Vec::new();
        while got.len() < 2 {
            let n = b
                .recv_batch(&mut bufs, &mut meta, Duration::from_secs(5))
                .unwrap();
            assert!(n > 0, "datagrams did not arrive");
            for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                for chunk in buf[..m.len].chunks(m.stride) {
                    got.push(chunk.to_vec());
                }
                assert_eq!(canonical(m.addr).ip(), dst.ip());
            }
        }
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
    }
}
