//! The byte stream under a connection, plain TCP or TLS, split into the
//! halves its reader and writer tasks own. The rest of the server does not
//! know which it has, except for the name a verified client certificate
//! carries (for EXTERNAL).

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

/// One dynamic call per read or write system call: nothing next to the
/// system call itself, and it spares the connection code a type parameter.
pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

pub(crate) struct Transport {
    pub(crate) reader: ReadHalf,
    pub(crate) writer: WriteHalf,
    /// The listener's address this connection came in on.
    pub(crate) local: SocketAddr,
    /// The common name of the client's certificate, verified by the TLS
    /// handshake against the configured CAs.
    pub(crate) certificate_name: Option<String>,
}

impl Transport {
    pub(crate) fn tcp(socket: TcpStream, peer: SocketAddr) -> Self {
        let _ = socket.set_nodelay(true);
        let local = socket.local_addr().unwrap_or(peer);
        let (reader, writer) = socket.into_split();
        Self {
            reader: Box::new(reader),
            writer: Box::new(writer),
            local,
            certificate_name: None,
        }
    }

    /// Any byte stream (an in-memory pipe in tests and fuzzing).
    pub(crate) fn stream<S>(stream: S, local: SocketAddr) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        Self {
            reader: Box::new(reader),
            writer: Box::new(writer),
            local,
            certificate_name: None,
        }
    }

    /// Runs the TLS handshake. A client certificate, when there is one,
    /// has been verified by rustls before this returns.
    pub(crate) async fn tls(
        socket: TcpStream,
        peer: SocketAddr,
        acceptor: &TlsAcceptor,
    ) -> std::io::Result<Self> {
        let _ = socket.set_nodelay(true);
        let local = socket.local_addr().unwrap_or(peer);
        let stream = acceptor.accept(socket).await?;
        let certificate_name = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(crate::tls::common_name);
        let (reader, writer) = tokio::io::split(stream);
        Ok(Self {
            reader: Box::new(reader),
            writer: Box::new(writer),
            local,
            certificate_name,
        })
    }
}
