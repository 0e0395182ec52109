//! Redis servers on hosts of the tests' own: each in a network namespace, joined to the
//! test process (in the root namespace) by a veth pair on a private /24, so a test can
//! cut a host off the network and heal it again.
//!
//! A partition takes the host's end of the link down. Packets to it are then dropped in
//! silence, as on a real network split: commands on open connections get no answer (the
//! client's timeouts must end them), new connections fail once address resolution gives
//! up (about a second), and what the kernel had queued is retransmitted once the link is
//! back, so commands sent during the split may still run on the server after it heals.
//! The kernel here has no `netem` qdisc (no `sch_netem`, no modules), so delays are the
//! TCP proxy's job (`proxy.rs`), not the namespace's.

use std::{
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use deadpool_redis::redis;

/// Hosts made by this test process so far: part of every name and subnet, so that tests
/// running at once never share one.
static HOSTS: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` (or `ip netns exec <ns> …`) and fails the test, saying why, when it fails.
fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run `ip` ({err}): install iproute2"));
    assert!(
        output.status.success(),
        "`ip {}` failed: {}. Network-namespace tests need root (CAP_NET_ADMIN) and iproute2; \
         CI runs as root.",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// A Redis server alone in a network namespace, reachable from the test process at
/// `10.<a>.<b>.2:6379` over a veth pair; removed (server, namespace, link) on drop.
pub struct NetHost {
    namespace: String,
    /// The test process's end of the link; down while partitioned.
    host_side: String,
    address: String,
    server: Option<Child>,
}

impl NetHost {
    /// Makes the namespace and its link and starts `redis-server` in it
    /// (`--save "" --appendonly no`), waiting until it answers.
    pub fn spawn() -> Self {
        let n = HOSTS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names have at most 15 bytes: "tr" + 5 digits + 3 digits + 1.
        let tag = format!("{:05}{:03}", pid % 100_000, n % 1000);
        let namespace = format!("trl-{tag}");
        let host_side = format!("tr{tag}h");
        let inside = format!("tr{tag}n");
        // 10.64.0.0/10 is private to this sandbox; the pid spreads concurrent test binaries.
        let subnet = format!("10.{}.{}", 64 + pid % 64, n % 250);
        let address = format!("{subnet}.2");

        ip(&["netns", "add", &namespace]);
        let mut host = NetHost {
            namespace,
            host_side,
            address,
            server: None,
        };
        ip(&[
            "link",
            "add",
            &host.host_side,
            "type",
            "veth",
            "peer",
            "name",
            &inside,
        ]);
        ip(&["link", "set", &inside, "netns", &host.namespace]);
        ip(&[
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            &host.host_side,
        ]);
        ip(&["link", "set", &host.host_side, "up"]);
        let ns = host.namespace.clone();
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&[
            "addr",
            "add",
            &format!("{address}/24", address = host.address),
            "dev",
            &inside,
        ]);
        in_ns(&["link", "set", &inside, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        host.start_server();
        host
    }

    fn start_server(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespace, "redis-server"])
            .args(["--bind", &self.address, "--port", "6379"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: apt-get install -y redis-server");
        // `ip netns exec` execs the server: this pid is the server's.
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = redis::Client::open(self.url())
                .and_then(|client| client.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn));
            if ready.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server in {} never answered",
                self.namespace
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://10.x.y.2:6379`.
    pub fn url(&self) -> String {
        format!("redis://{}:6379", self.address)
    }

    /// Cuts the host off: packets to it are dropped without an answer until [`heal`].
    ///
    /// [`heal`]: Self::heal
    pub fn partition(&self) {
        ip(&["link", "set", &self.host_side, "down"]);
    }

    /// Joins the host to the network again; queued packets are retransmitted.
    pub fn heal(&self) {
        ip(&["link", "set", &self.host_side, "up"]);
    }

    /// Whether a fresh connection gets a `PONG` within half a second.
    pub fn reachable(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_millis(500)))
            .and_then(|mut conn| {
                conn.set_read_timeout(Some(Duration::from_millis(500)))?;
                redis::cmd("PING").query::<String>(&mut conn)
            })
            .is_ok()
    }

    /// Runs a command on the server, over a fresh connection (the host must be reachable).
    pub fn query<T: redis::FromRedisValue>(&self, command: &mut redis::Cmd) -> T {
        let client = redis::Client::open(self.url()).expect("valid url");
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|err| panic!("cannot reach {}: {err}", self.url()));
        command
            .query(&mut conn)
            .unwrap_or_else(|err| panic!("query on {} failed: {err}", self.url()))
    }

    /// The lock keys on the server (`lock:*`).
    pub fn lock_keys(&self) -> Vec<String> {
        self.query(redis::cmd("KEYS").arg("lock:*"))
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        // Anything else still running in the namespace (there should be nothing).
        if let Ok(output) = Command::new("ip")
            .args(["netns", "pids", &self.namespace])
            .output()
        {
            for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        // Deleting the namespace also deletes the veth pair (both ends).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
    }
}
