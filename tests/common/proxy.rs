//! A TCP proxy between two nodes (or a node and its database) that a test can cut, stall
//! and restore: one link of the mesh.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub struct Proxy {
    pub listen: SocketAddr,
    target: String,
    tasks: Option<JoinSet<()>>,
    /// While set, no byte is forwarded either way, but every connection stays open: to both
    /// ends the other has gone silent, as in a network partition.
    stalled: Arc<AtomicBool>,
}

impl Proxy {
    /// Starts forwarding a free loopback port to `target`.
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap();
        let mut proxy = Self {
            listen,
            target: target.to_owned(),
            tasks: None,
            stalled: Arc::new(AtomicBool::new(false)),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target.clone();
        let stalled = self.stalled.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let target = target.clone();
                let stalled = stalled.clone();
                connections.spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&target).await {
                        let (from_in, to_in) = inbound.into_split();
                        let (from_out, to_out) = outbound.into_split();
                        tokio::join!(
                            forward(from_in, to_out, stalled.clone()),
                            forward(from_out, to_in, stalled)
                        );
                    }
                });
            }
        });
        self.tasks = Some(tasks);
    }

    /// Cuts the link: open connections drop, new ones are refused.
    pub async fn cut(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Restores the link on the same port.
    pub async fn restore(&mut self) {
        let listener = TcpListener::bind(self.listen).await.unwrap();
        self.serve(listener);
    }

    /// Stops forwarding without closing anything (see `stalled`).
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Forwards again what was held back, and everything after.
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either closes, holding bytes back while `stalled`.
async fn forward(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, stalled: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
