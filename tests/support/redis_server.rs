//! Spawns throwaway `redis-server` processes on free loopback ports, for tests and
//! benchmarks. Each server is stopped by pid when its handle drops.
//!
//! It needs only std and the `redis` crate (through `deadpool_redis`), so examples can
//! include this file too (`#[path]`).

#![allow(dead_code)]

use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use deadpool_redis::redis;

/// How long a fresh server gets to answer PING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One `redis-server` process owned by the test that spawned it.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Arguments beyond the defaults (cluster mode, a data directory).
    extra_args: Vec<String>,
    /// The default user's password (`--requirepass`): the admin connections send it.
    password: Option<String>,
    /// The TLS port, when the server listens for TLS too.
    tls_port: Option<u16>,
    /// A configuration file, given first (Sentinels need one they can rewrite).
    config_file: Option<PathBuf>,
}

/// The files a TLS server is started with (PEM): its certificate and key, and the CA that
/// signed them.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl RedisServer {
    /// Starts a server on a free port, with persistence off, and waits until it answers.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed (with the command that installs it), or
    /// when no server comes up after a few ports.
    pub fn spawn() -> Self {
        Self::spawn_with(&[])
    }

    /// [`spawn`](Self::spawn) with more arguments (`--replicaof`, `--maxmemory`…).
    pub fn spawn_with(args: &[&str]) -> Self {
        Self::try_spawn(args, None, false).unwrap_or_else(|err| panic!("{err}"))
    }

    /// A server with AOF persistence (`appendfsync always`) in `dir`, which it owns: a
    /// [`restart`](Self::restart) reloads every write it acknowledged; emptying `dir`
    /// between [`kill`](Self::kill) and `restart` starts it empty instead.
    pub fn spawn_durable(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("create the server's data directory");
        let dir = dir.display().to_string();
        let args = [
            "--dir",
            &dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ];
        Self::spawn_with(&args)
    }

    /// A server whose default user needs `password` (`--requirepass`); [`url`](Self::url)
    /// carries it.
    pub fn spawn_with_password(password: &str) -> Self {
        Self::try_spawn(&["--requirepass", password], Some(password), false)
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// A server that listens for TLS on a port of its own (see [`tls_url`](Self::tls_url))
    /// with the certificate in `files`, besides the plain port the admin connections use.
    /// Clients need no certificate of their own.
    ///
    /// `Err` (which callers skip on) only for a `redis-server` built without TLS (the PyPI
    /// wheels' are): Redis 6.2 then does not know `tls-port`, Valkey has no TLS
    /// connection type.
    ///
    /// # Panics
    ///
    /// When a server with TLS does not start: a test must not skip on a broken set-up.
    pub fn spawn_tls(files: &TlsFiles) -> Result<Self, String> {
        Self::spawn_tls_server(files).map_err(|err| {
            let without_tls = ["Bad directive", "TLS support", "tls-port"]
                .iter()
                .any(|words| err.contains(words));
            assert!(without_tls, "a TLS redis-server did not start: {err}");
            err
        })
    }

    fn spawn_tls_server(files: &TlsFiles) -> Result<Self, String> {
        let path = |path: &Path| path.display().to_string();
        let (cert, key, ca) = (path(&files.cert), path(&files.key), path(&files.ca));
        let args = [
            "--tls-cert-file",
            cert.as_str(),
            "--tls-key-file",
            key.as_str(),
            "--tls-ca-cert-file",
            ca.as_str(),
            "--tls-auth-clients",
            "no",
        ];
        Self::try_spawn(&args, None, true)
    }

    fn try_spawn(args: &[&str], password: Option<&str>, tls: bool) -> Result<Self, String> {
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let tls_port = tls.then(free_port);
            let mut extra_args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
            if let Some(tls_port) = tls_port {
                extra_args.extend(["--tls-port".to_owned(), tls_port.to_string()]);
            }
            let mut server = RedisServer {
                port,
                child: None,
                extra_args,
                password: password.map(str::to_owned),
                tls_port,
                config_file: None,
            };
            match server.start() {
                Ok(()) => return Ok(server),
                // A server that refuses its arguments does so on every port.
                Err(err) if err.contains("exited") && !err.contains("in use") => return Err(err),
                Err(err) => last_error = err,
            }
        }
        Err(format!("could not start redis-server: {last_error}"))
    }

    /// `redis-server --version`, e.g. `Redis server v=7.0.15 sha=…`.
    pub fn version() -> String {
        Command::new("redis-server")
            .arg("--version")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_else(|err| format!("redis-server --version failed: {err}"))
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`, with the default user's password if it has one: the
    /// admin's URL.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// `redis://<user>:<password>@127.0.0.1:<port>`: the plain port as `user`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// `rediss://localhost:<tls port>` of a server from [`spawn_tls`](Self::spawn_tls)
    /// (`localhost` is the name in the test certificate).
    ///
    /// # Panics
    ///
    /// When the server does not listen for TLS.
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("not a TLS server");
        format!("rediss://localhost:{port}")
    }

    /// The pid of the running process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is not running").id()
    }

    /// Whether the server process is running (not killed).
    pub fn pid_alive(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process (SIGKILL) and waits for it: connections are refused afterwards.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new, empty server on the same port after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            // The port can stay busy for a moment after the old process died.
            match self.start() {
                Ok(()) => return,
                Err(err) if Instant::now() > deadline => panic!("restart failed: {err}"),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Freezes the process (SIGSTOP): it accepts connections but never answers.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// A plain synchronous connection, for test set-up and checks.
    pub fn connection(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).expect("redis url");
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to redis");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set read timeout");
        conn
    }

    /// Runs one command on a fresh connection (`server.query(redis::cmd("DBSIZE"))`).
    pub fn query<T: redis::FromRedisValue>(&self, command: &mut redis::Cmd) -> T {
        command
            .query(&mut self.connection())
            .expect("redis command")
    }

    /// Calls of `command` since the server started, from `INFO commandstats` (calls made
    /// inside scripts included).
    pub fn command_calls(&self, command: &str) -> u64 {
        let info: String = self.query(redis::cmd("INFO").arg("commandstats"));
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// The field `name` of `INFO stats` (`total_connections_received`, say).
    pub fn stat(&self, name: &str) -> u64 {
        let info: String = self.query(redis::cmd("INFO").arg("stats"));
        let prefix = format!("{name}:");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `--dir <temp> --dbfilename trl-<pid>-<port>.rdb`, except for Sentinels (their
    /// configuration file decides).
    fn rdb_args(&self) -> Vec<String> {
        if self.config_file.is_some() {
            return Vec::new();
        }
        vec![
            "--dir".into(),
            std::env::temp_dir().display().to_string(),
            "--dbfilename".into(),
            format!("trl-{}-{}.rdb", std::process::id(), self.port),
        ]
    }

    /// Where the server's log goes while it starts (removed once it answers).
    fn log_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!(
            "trl-redis-{}-{}.log",
            std::process::id(),
            self.port
        ))
    }

    /// The last lines of the start-up log, to say why a server did not come up.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    fn start(&mut self) -> Result<(), String> {
        let log = File::create(self.log_path()).map_err(|err| format!("server log: {err}"))?;
        let result = self.start_logging_to(log);
        let _ = std::fs::remove_file(self.log_path());
        result
    }

    fn start_logging_to(&mut self, log: File) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(&self.config_file)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            // An RDB file of its own, outside the repository: a replica writes the one it
            // syncs, and another server version must never load it at start-up.
            .args(self.rdb_args())
            .args(&self.extra_args)
            // Only start-up is logged: the file is removed once the server answers.
            .stderr(
                log.try_clone()
                    .map_err(|err| format!("server log: {err}"))?,
            )
            .stdout(log)
            .spawn()
            .map_err(|err| {
                if err.kind() == std::io::ErrorKind::NotFound {
                    panic!(
                        "redis-server is not installed; tests need a real Redis. \
                         Install it with `apt-get install -y redis-server` \
                         (scripts/test.sh does this for you)"
                    )
                }
                format!("spawn redis-server: {err}")
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "redis-server ({}) on port {} exited with {status}: {}",
                    Self::version(),
                    self.port,
                    self.log_tail()
                ));
            }
            if self.ping() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(format!(
            "redis-server on port {} did not answer PING",
            self.port
        ))
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut conn).is_ok()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused process ignores nothing but SIGKILL; resume first so it can die
            // cleanly either way.
            signal(child.id(), "CONT");
        }
        self.kill();
    }
}

/// Sends `signal` (`STOP`, `CONT`, `KILL`…) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A port the kernel just handed out and released; free unless someone races for it,
/// which `spawn` survives by trying another.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis Cluster of `masters` primaries (and, from [`spawn_with_replicas`], replicas),
/// each a [`RedisServer`] with its own data directory, joined with
/// `redis-cli --cluster create`.
///
/// [`spawn_with_replicas`]: Self::spawn_with_replicas
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    dirs: Vec<std::path::PathBuf>,
}

impl RedisCluster {
    /// Starts the nodes and waits until the cluster says `cluster_state:ok`.
    pub fn spawn(masters: usize) -> Self {
        Self::spawn_with_replicas(masters, 0, Duration::from_secs(5))
    }

    /// `masters` primaries with `replicas` replicas each; a primary unreachable for
    /// `node_timeout` is failed over to one of its replicas.
    pub fn spawn_with_replicas(masters: usize, replicas: usize, node_timeout: Duration) -> Self {
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        while nodes.len() < masters * (1 + replicas) {
            let port = free_cluster_port();
            let dir =
                std::env::temp_dir().join(format!("trl-cluster-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("cluster node directory");
            let extra_args = vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                "nodes.conf".into(),
                "--cluster-node-timeout".into(),
                node_timeout.as_millis().to_string(),
                // A replica whose primary died before it ever synced would otherwise
                // refuse to take over ("disconnected from master for longer than
                // allowed"); the tests want the failover either way.
                "--cluster-replica-validity-factor".into(),
                "0".into(),
                "--dir".into(),
                dir.display().to_string(),
            ];
            let mut node = RedisServer {
                port,
                child: None,
                extra_args,
                password: None,
                tls_port: None,
                config_file: None,
            };
            if node.start().is_ok() {
                nodes.push(node);
                dirs.push(dir);
            }
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli is not installed: apt-get install -y redis-tools");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes, dirs };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Replicas in sync with their primaries, so a failover has the data to take over.
        while !cluster.nodes.iter().all(|node| {
            let info: String = node.query(redis::cmd("INFO").arg("replication"));
            info.contains("role:master") || info.contains("master_link_status:up")
        }) {
            assert!(Instant::now() < deadline, "the replicas never synced");
            thread::sleep(Duration::from_millis(100));
        }
        while !cluster.nodes.iter().all(|node| {
            let info: String = node.query(redis::cmd("CLUSTER").arg("INFO"));
            info.contains("cluster_state:ok")
        }) {
            assert!(Instant::now() < deadline, "the cluster never became ready");
            thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// `redis://127.0.0.1:<port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The hash slot of `key`.
    pub fn slot(&self, key: &str) -> u16 {
        self.any_live_node()
            .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
    }

    /// The index in [`nodes`](Self::nodes) of the primary serving `slot`, as a live node
    /// sees the cluster now.
    pub fn owner(&self, slot: u16) -> usize {
        let nodes: String = self
            .any_live_node()
            .query(redis::cmd("CLUSTER").arg("NODES"));
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let mut bounds = range.split('-').map(|n| n.parse::<u16>());
                match (bounds.next(), bounds.next()) {
                    (Some(Ok(start)), Some(Ok(end))) => (start..=end).contains(&slot),
                    (Some(Ok(only)), None) => only == slot,
                    _ => false, // a slot being migrated: `[slot->-id]`
                }
            });
            if serves {
                let port: u16 = fields[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|port| port.parse().ok())
                    .expect("node address");
                return self
                    .nodes
                    .iter()
                    .position(|node| node.port == port)
                    .expect("a node of this cluster");
            }
        }
        panic!("no primary serves slot {slot}:\n{nodes}");
    }

    /// The cluster's id of node `index`.
    pub fn node_id(&self, index: usize) -> String {
        self.nodes[index].query(redis::cmd("CLUSTER").arg("MYID"))
    }

    /// Moves `slot` from primary `from` to primary `to` with its keys (and their
    /// expiry), the way `redis-cli --cluster reshard` moves each slot: `IMPORTING` on the
    /// target, `MIGRATING` on the source, `MIGRATE` of the keys in batches, then the new
    /// owner announced to every primary. While it runs, a key still on the source is
    /// served there and one already moved gets an `ASK` redirect.
    pub fn migrate_slot(&self, slot: u16, from: usize, to: usize, between_batches: Duration) {
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let setslot = |node: usize, state: &str, id: &str| {
            let () = self.nodes[node].query(
                redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg(state)
                    .arg(id),
            );
        };
        setslot(to, "IMPORTING", &from_id);
        setslot(from, "MIGRATING", &to_id);
        loop {
            let keys: Vec<String> =
                self.nodes[from].query(redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(1));
            if keys.is_empty() {
                break;
            }
            let _: redis::Value = self.nodes[from].query(
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(self.nodes[to].port)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&keys),
            );
            thread::sleep(between_batches);
        }
        setslot(to, "NODE", &to_id);
        setslot(from, "NODE", &to_id);
        for node in 0..self.nodes.len() {
            if node != from && node != to && self.nodes[node].pid_alive() {
                let role: Vec<redis::Value> = self.nodes[node].query(&mut redis::cmd("ROLE"));
                if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                    setslot(node, "NODE", &to_id);
                }
            }
        }
    }

    /// Waits until every live node says `cluster_state:ok`; false after `within`.
    pub fn wait_ok(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().filter(|n| n.pid_alive()).all(|node| {
                let info: String = node.query(redis::cmd("CLUSTER").arg("INFO"));
                info.contains("cluster_state:ok")
            });
            if ok {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The lock keys (`lock:*`) on every live node, as `port:key`.
    pub fn lock_keys(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|node| node.pid_alive())
            .flat_map(|node| {
                let keys: Vec<String> = node.query(redis::cmd("KEYS").arg("lock:*"));
                keys.into_iter()
                    .map(move |key| format!("{}:{key}", node.port))
            })
            .collect()
    }

    fn any_live_node(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|node| node.pid_alive())
            .expect("a live cluster node")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear(); // stops the servers
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = 20_000 + fastrand_port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// A pseudo-random offset below 10,000, without a random-number crate.
fn fastrand_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(Instant::now()) % 10_000) as u16
}

/// The name of the group a [`SentinelGroup`]'s Sentinels watch.
pub const MASTER_NAME: &str = "mymaster";

/// A primary, one replica and three Sentinels watching them (quorum 2; a primary that has
/// not answered for 1 s is down), each a [`RedisServer`]. The Sentinels run as
/// `redis-server <config> --sentinel`, so every server of the matrix brings its own.
#[derive(Debug)]
pub struct SentinelGroup {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
    dir: PathBuf,
}

impl SentinelGroup {
    /// Starts the servers and waits until the replica is in sync and every Sentinel knows
    /// the replica and the two other Sentinels (a failover needs all of it).
    pub fn spawn() -> Self {
        let primary = RedisServer::spawn();
        let primary_port = primary.port().to_string();
        let replica = RedisServer::spawn_with(&["--replicaof", "127.0.0.1", &primary_port]);
        let dir = std::env::temp_dir().join(format!(
            "trl-sentinel-{}-{}",
            std::process::id(),
            primary.port()
        ));
        std::fs::create_dir_all(&dir).expect("sentinel directory");
        let mut sentinels = Vec::new();
        while sentinels.len() < 3 {
            let port = free_port();
            // Sentinels rewrite their configuration file: one each.
            let config = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &config,
                format!(
                    "sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 10000\n"
                ),
            )
            .expect("sentinel configuration");
            let mut sentinel = RedisServer {
                port,
                child: None,
                extra_args: vec!["--sentinel".into()],
                password: None,
                tls_port: None,
                config_file: Some(config),
            };
            if sentinel.start().is_ok() {
                sentinels.push(sentinel);
            }
        }
        let group = SentinelGroup {
            primary,
            replica,
            sentinels,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !group.ready() {
            assert!(
                Instant::now() < deadline,
                "the Sentinel group never became ready"
            );
            thread::sleep(Duration::from_millis(100));
        }
        group
    }

    fn ready(&self) -> bool {
        let info: String = self.replica.query(redis::cmd("INFO").arg("replication"));
        if !info.contains("master_link_status:up") {
            return false;
        }
        self.sentinels.iter().all(|sentinel| {
            let replicas: Vec<redis::Value> =
                sentinel.query(redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME));
            let others: Vec<redis::Value> =
                sentinel.query(redis::cmd("SENTINEL").arg("SENTINELS").arg(MASTER_NAME));
            replicas.len() == 1 && others.len() == 2
        })
    }

    /// `redis://127.0.0.1:<port>` of every Sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// The port of the primary, as the Sentinels that answer see it (the first one's).
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|sentinel| {
            let addr: Option<(String, String)> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME)
                .query(&mut sentinel.connection())
                .ok()?;
            addr?.1.parse().ok()
        })
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        self.sentinels.clear(); // stops them
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
