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
    /// One-shot delays triggered by what a request contains.
    rules: Mutex<Vec<Rule>>,
}

/// Holds back, once, the first request whose bytes contain `pattern` (`Request`) or the
/// replies that follow it on its connection (`Reply`).
struct Rule {
    pattern: Vec<u8>,
    delay: Duration,
    target: Target,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Request,
    Reply,
}

impl Faults {
    /// The delay of the first unspent rule for `target` that `chunk` matches, spending it.
    fn take_rule(&self, target: Target, chunk: &[u8]) -> Option<Duration> {
        let mut rules = self.rules.lock().unwrap();
        let index = rules.iter().position(|rule| {
            rule.target == target
                && chunk
                    .windows(rule.pattern.len())
                    .any(|window| window == rule.pattern)
        })?;
        Some(rules.remove(index).delay)
    }
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

    /// The first request from now on that contains `pattern` reaches the server `delay`
    /// late (it runs then; what follows it on its connection waits behind it).
    pub fn delay_request_containing(&self, pattern: &str, delay: Duration) {
        self.add_rule(pattern, delay, Target::Request);
    }

    /// The first request from now on that contains `pattern` runs at once, but the replies
    /// after it on its connection reach the client `delay` late.
    pub fn delay_reply_to_request_containing(&self, pattern: &str, delay: Duration) {
        self.add_rule(pattern, delay, Target::Reply);
    }

    /// [`delay_reply_to_request_containing`](Self::delay_reply_to_request_containing), for
    /// a pattern in bytes (a script's SHA, a command name).
    pub fn delay_reply_to(&self, pattern: &[u8], delay: Duration) {
        self.faults.rules.lock().unwrap().push(Rule {
            pattern: pattern.to_vec(),
            delay,
            target: Target::Reply,
        });
    }

    fn add_rule(&self, pattern: &str, delay: Duration, target: Target) {
        self.faults.rules.lock().unwrap().push(Rule {
            pattern: pattern.as_bytes().to_vec(),
            delay,
            target,
        });
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
    // A reply delay armed by a rule, in ms (taken by the next reply chunk).
    let reply_rule_ms = Arc::new(AtomicU64::new(0));
    let upstream = {
        let (faults, cut, reply_rule_ms) = (faults.clone(), cut.clone(), reply_rule_ms.clone());
        async move {
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let Ok(n) = client_read.read(&mut buffer).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                if let Some(delay) = faults.take_rule(Target::Request, &buffer[..n]) {
                    tokio::time::sleep(delay).await;
                }
                if let Some(delay) = faults.take_rule(Target::Reply, &buffer[..n]) {
                    reply_rule_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
                }
                if server_write.write_all(&buffer[..n]).await.is_err() {
                    return;
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
            let delay = faults
                .reply_delay_ms
                .load(Ordering::SeqCst)
                .max(reply_rule_ms.swap(0, Ordering::SeqCst));
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
