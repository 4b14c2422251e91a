//! A TCP link with network faults on demand, between a client under test and a real
//! server of the stack.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::{AbortHandle, JoinSet};

use crate::error::{Error, Result};

/// A local TCP forwarder to a real server, which can stop answering without closing
/// (a half-open connection, as after a partition or a dead host) or cut every connection.
///
/// Point the client under test at [`FaultyLink::addr`] instead of the server. While the
/// link is [frozen](FaultyLink::freeze), bytes in either direction are read and dropped:
/// both ends keep their connections open and hear nothing, exactly what a peer that
/// vanished looks like until a timeout fires. A client that closes its end still closes
/// the server's end, so the server sees the session end as soon as the client gives up.
///
/// ```no_run
/// # async fn demo() -> dbps_testkit::Result<()> {
/// let link = dbps_testkit::FaultyLink::start("127.0.0.1:25432".parse().unwrap()).await?;
/// // connect the client to link.addr() ...
/// link.freeze();
/// // ... the client must detect the silence within its own timeouts ...
/// link.thaw();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FaultyLink {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl FaultyLink {
    /// Listens on a free local port and forwards each connection to `upstream`.
    ///
    /// # Errors
    ///
    /// The local port cannot be bound.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(Error::Link)?;
        let addr = listener.local_addr().map_err(Error::Link)?;
        let frozen = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn(accept_loop(listener, upstream, frozen.clone(), connections.clone())).abort_handle();
        Ok(Self {
            addr,
            frozen,
            connections,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` (a `scheme://user:password@host:port/...` URL) with its host and port
    /// replaced by the link's.
    pub fn url(&self, url: &str) -> String {
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.to_owned();
        };
        let (authority, tail) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
        match userinfo {
            Some(userinfo) => format!("{scheme}://{userinfo}@{}{tail}", self.addr),
            None => format!("{scheme}://{}{tail}", self.addr),
        }
    }

    /// Stops forwarding: from now on every byte is dropped, and no connection closes.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Forwards again. Bytes dropped meanwhile stay lost, so a connection that was
    /// waiting for an answer keeps waiting; new connections work.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Closes every connection through the link at once (both ends); new ones work.
    pub async fn reset(&self) {
        for connection in self.connections.lock().await.drain(..) {
            connection.abort();
        }
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut connections) = self.connections.try_lock() {
            for connection in connections.drain(..) {
                connection.abort();
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    frozen: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
) {
    while let Ok((client, _)) = listener.accept().await {
        let frozen = frozen.clone();
        let handle = tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let mut pumps = JoinSet::new();
            pumps.spawn(pump(client_read, server_write, frozen.clone()));
            pumps.spawn(pump(server_read, client_write, frozen));
            // Both directions end (each closes the far side when its own side closes);
            // an abort of this task drops both sockets.
            while pumps.join_next().await.is_some() {}
        })
        .abort_handle();
        let mut list = connections.lock().await;
        list.retain(|c| !c.is_finished());
        list.push(handle);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if frozen.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buffer[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn url_points_at_the_link() {
        let link = FaultyLink::start("127.0.0.1:9".parse().unwrap()).await.unwrap();
        let port = link.addr().port();
        assert_eq!(
            link.url("postgres://u:p@127.0.0.1:25432/db?x=1"),
            format!("postgres://u:p@127.0.0.1:{port}/db?x=1")
        );
        assert_eq!(link.url("postgres://h:1"), format!("postgres://127.0.0.1:{port}"));
    }
}
