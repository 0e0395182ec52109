//! Spawns throwaway `redis-server` processes on free loopback ports, for tests and
//! benchmarks. Each server is stopped by pid when its handle drops.
//!
//! It needs only std and the `redis` crate (through `deadpool_redis`), so examples can
//! include this file too (`#[path]`).

#![allow(dead_code)]

use std::{
    net::TcpListener,
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
}

impl RedisServer {
    /// Starts a server on a free port, with persistence off, and waits until it answers.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed (with the command that installs it), or
    /// when no server comes up after a few ports.
    pub fn spawn() -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer { port, child: None };
            match server.start() {
                Ok(()) => return server,
                Err(err) => last_error = err,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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

    fn start(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
                    "redis-server on port {} exited with {status}",
                    self.port
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

fn signal(pid: u32, signal: &str) {
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
