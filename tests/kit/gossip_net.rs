//! A gossip network the tests own: one UDP relay in front of each node's gossip
//! socket, so a test can cut gossip between node *processes* on 127.0.0.1 without
//! network namespaces or packet filters.
//!
//! Each node listens on its own port `L` and advertises its relay's port `R` (the
//! node's `--gossip-advertise`); seeds are relay ports too. So every gossip packet
//! between two nodes crosses the relay of the node it is sent to:
//!
//! ```text
//!   node Y (socket L_Y) ── datagram ──▶ relay of X (R_X) ── via U_Y ──▶ node X (L_X)
//!   node X (L_X) ── reply to U_Y ──▶ relay of X ── from R_X ──▶ node Y (L_Y)
//! ```
//!
//! The relay keeps one upstream socket `U_Y` per sender so that X's replies (which
//! chitchat sends to the datagram's source address) find their way back to Y.
//! Senders are told apart by their listen port (chitchat sends from the socket it
//! listens on). A cut between two sets of nodes drops datagrams in both directions
//! at the relays; healing lets them through again. Datagrams are dropped, not held
//! back, as a real partition would.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// The set of cut links, shared by every relay of one test. Links are directed
/// pairs of node *listen* ports; [`GossipNet::cut`] inserts both directions.
/// Dropping it stops every relay.
#[derive(Default)]
pub struct GossipNet {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    blocked: Mutex<BTreeSet<(u16, u16)>>,
    stop: CancellationToken,
}

impl Inner {
    fn is_cut(&self, from: u16, to: u16) -> bool {
        self.blocked.lock().unwrap().contains(&(from, to))
    }
}

impl GossipNet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cut every link between a node in `a` and a node in `b` (listen ports).
    pub fn cut(&self, a: &[u16], b: &[u16]) {
        let mut blocked = self.inner.blocked.lock().unwrap();
        for x in a {
            for y in b {
                blocked.insert((*x, *y));
                blocked.insert((*y, *x));
            }
        }
    }

    /// Restore every link.
    pub fn heal(&self) {
        self.inner.blocked.lock().unwrap().clear();
    }

    /// Whether any link is cut.
    pub fn is_partitioned(&self) -> bool {
        !self.inner.blocked.lock().unwrap().is_empty()
    }

    /// Start the relay for the node listening on `127.0.0.1:listen`; returns the
    /// relay's port, the address that node must advertise.
    pub async fn relay(&self, listen: u16) -> u16 {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind gossip relay"));
        let port = front.local_addr().unwrap().port();
        let node: SocketAddr = ([127, 0, 0, 1], listen).into();
        let net = self.inner.clone();
        tokio::spawn(async move {
            let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, from) = tokio::select! {
                    _ = net.stop.cancelled() => return,
                    r = front.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
                };
                if net.is_cut(from.port(), listen) {
                    continue;
                }
                let up = match upstream.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                        let u = Arc::new(u);
                        upstream.insert(from, u.clone());
                        // Replies from the node to this sender go back through the front socket.
                        let (u2, front2, net2) = (u.clone(), front.clone(), net.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65_536];
                            loop {
                                let n = tokio::select! {
                                    _ = net2.stop.cancelled() => return,
                                    r = u2.recv_from(&mut buf) => match r { Ok((n, _)) => n, Err(_) => continue },
                                };
                                if !net2.is_cut(listen, from.port()) {
                                    let _ = front2.send_to(&buf[..n], from).await;
                                }
                            }
                        });
                        u
                    }
                };
                let _ = up.send_to(&buf[..n], node).await;
            }
        });
        port
    }
}

impl Drop for GossipNet {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}
