//! A TCP proxy of the tests' own between the client and Redis, to make the network slow
//! or cut it at the worst moment.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[derive(Default)]
struct Faults {
    reply_delay_ms: AtomicU64,
    /// Forward the next request, let the server run it, then cut the connection before
    /// the reply gets through.
    drop_next_reply: AtomicBool,
    /// Once: the next request whose bytes contain this pattern has its reply held back
    /// by `(pattern, delay)`.
    delay_reply_to: Mutex<Option<(Vec<u8>, Duration)>>,
    /// Set when such a request went through: the next reply waits this long (ms).
    delay_next_reply_ms: AtomicU64,
}

/// A proxy on a free loopback port in front of `127.0.0.1:<target>`.
pub struct Proxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
}

impl Proxy {
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let shared = faults.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue; // the client sees its connection close
                };
                tokio::spawn(relay(client, server, shared.clone()));
            }
        });
        Self { addr, faults }
    }

    /// `redis://127.0.0.1:<proxy port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Holds every reply back this long.
    pub fn delay_replies(&self, delay: Duration) {
        self.faults
            .reply_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Once: the reply to the next request that contains `pattern` (a script's SHA, a
    /// command name) is held back `delay`; the server runs the request at once.
    pub fn delay_reply_to(&self, pattern: &[u8], delay: Duration) {
        *self.faults.delay_reply_to.lock().unwrap() = Some((pattern.to_vec(), delay));
    }

    /// The next request reaches the server, its reply never reaches the client.
    pub fn drop_next_reply(&self) {
        self.faults.drop_next_reply.store(true, Ordering::SeqCst);
    }
}

async fn relay(client: TcpStream, server: TcpStream, faults: Arc<Faults>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let cut = Arc::new(AtomicBool::new(false));
    let upstream = {
        let (faults, cut) = (faults.clone(), cut.clone());
        async move {
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let Ok(n) = client_read.read(&mut buffer).await else {
                    return;
                };
                if n == 0 || server_write.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
                let armed = {
                    let mut armed = faults.delay_reply_to.lock().unwrap();
                    let hit = armed.as_ref().is_some_and(|(pattern, _)| {
                        buffer[..n].windows(pattern.len()).any(|w| w == pattern)
                    });
                    if hit { armed.take() } else { None }
                };
                if let Some((_, delay)) = armed {
                    faults
                        .delay_next_reply_ms
                        .store(delay.as_millis() as u64, Ordering::SeqCst);
                }
                if faults.drop_next_reply.swap(false, Ordering::SeqCst) {
                    cut.store(true, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await; // the server runs it
                    return;
                }
            }
        }
    };
    let downstream = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let Ok(n) = server_read.read(&mut buffer).await else {
                return;
            };
            if n == 0 || cut.load(Ordering::SeqCst) {
                return;
            }
            let delay = faults.reply_delay_ms.load(Ordering::SeqCst)
                + faults.delay_next_reply_ms.swap(0, Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if cut.load(Ordering::SeqCst) || client_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either side ending ends both: the client sees the connection drop.
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}
