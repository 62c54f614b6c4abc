//! Listening sockets for every listener the broker has (AMQP, AMQPS, HTTP).
//!
//! RabbitMQ listens on both address families by default, so a client whose
//! `localhost` resolves to `::1` reaches it as well as one that uses
//! `127.0.0.1`. Warren's default addresses are IPv6's unspecified address,
//! `[::]`, bound as a dual-stack socket: one socket accepts both families,
//! whatever the host's `net.ipv6.bindv6only` says. On a host without IPv6
//! the same default falls back to `0.0.0.0`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tracing::warn;

/// Connections waiting to be accepted, as tokio's own `bind` asks for.
const ACCEPT_BACKLOG: i32 = 1024;

/// Binds a listener on `address`; `[::]` accepts IPv4 as well as IPv6.
/// Must be called within a tokio runtime.
pub async fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    if address.ip() != Ipv6Addr::UNSPECIFIED {
        return TcpListener::bind(address).await;
    }
    match bind_dual_stack(address) {
        Ok(listener) => Ok(listener),
        Err(DualStack::Unavailable(error)) => {
            let ipv4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), address.port());
            warn!(%address, %error, fallback = %ipv4, "IPv6 is not available; listening on IPv4 only");
            TcpListener::bind(ipv4).await
        }
        Err(DualStack::Failed(error)) => Err(error),
    }
}

enum DualStack {
    /// The host has no IPv6: the socket cannot be made (EAFNOSUPPORT) or
    /// `[::]` is not an address of this host (EADDRNOTAVAIL).
    Unavailable(io::Error),
    Failed(io::Error),
}

fn bind_dual_stack(address: SocketAddr) -> Result<TcpListener, DualStack> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))
        .map_err(DualStack::Unavailable)?;
    let configure = || -> io::Result<()> {
        socket.set_only_v6(false)?;
        // As tokio's bind does: a restarted broker can take its port back
        // while the previous process's connections are in TIME_WAIT.
        socket.set_reuse_address(true)
    };
    configure().map_err(DualStack::Failed)?;
    socket.bind(&address.into()).map_err(|error| {
        if error.kind() == io::ErrorKind::AddrNotAvailable {
            DualStack::Unavailable(error)
        } else {
            DualStack::Failed(error)
        }
    })?;
    socket.listen(ACCEPT_BACKLOG).map_err(DualStack::Failed)?;
    socket.set_nonblocking(true).map_err(DualStack::Failed)?;
    TcpListener::from_std(socket.into()).map_err(DualStack::Failed)
}

/// A peer's address as a person reads it: an IPv4 client of a dual-stack
/// listener arrives as `::ffff:a.b.c.d` and is reported as `a.b.c.d`.
pub fn canonical_peer(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}
