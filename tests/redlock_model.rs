//! Redlock's majority and validity rule as a model, checked exhaustively with `stateright`
//! (issue 16), for 3 and 5 nodes.
//!
//! | model step | code (`src/backend/redlock.rs`) |
//! |---|---|
//! | `Start`: an attempt sends `SET NX` with its token to every node | `try_acquire` → `on_all` |
//! | `Exec`: a node runs the command (atomically) whenever it gets there, and the client has its answer, unless it gave up on that node before (a reply that comes late is a command that runs late; a lost one, a `GiveUp` before the command runs) | `RedisBackend::try_acquire`, the node timeout |
//! | `GiveUp(node)`: the attempt stops waiting for a node (node timeout); the command may still run later | `on_nodes`' timeout |
//! | `Decide`: a majority granted and the validity (sent + ttl − margin) is not over → holding; otherwise undo on every node that granted or did not answer, and try again with a **fresh** token (the fix of issue 11; `reuse_tokens` models the old code) | `try_acquire`, `LockBackend::retry_with_same_token` |
//! | `Exec(Undo/Release)`: compare-and-delete, whenever it gets there (late, possibly after a later attempt) | `RedisBackend::undo`, `release` |
//! | `Restart(node)`: a node comes back empty (no persistence) | — |
//! | `Tick`: time; nodes expire keys by it | `PX` |
//!
//! Property: no two clients hold the lock while each believes its validity not over.
//!
//! What is checked here (`cargo test --test redlock_model`, about 25 s unoptimised; node
//! renumberings are one state, see `Representative`):
//!
//! - with healthy nodes, 3 of them, two clients: never two holders (1.7 million states,
//!   every interleaving of late commands, lost replies and timeouts within the bound);
//! - the model can fail: with the old retry under the same token, a late undo of a failed
//!   attempt frees a later grant on a node and a second client gets a majority (issue 11's
//!   double grant, found in half a million states);
//! - one node restarted empty lets a second holder in on 3 nodes and on 5 (the limit
//!   `RedlockBackend`'s docs state).
//!
//! Five healthy nodes do not finish in five minutes here (release build); `tests/redlock.rs`
//! covers the sequences against real servers.

use stateright::{Checker, Model, Property, Representative};

const TTL: u8 = 3;
const MARGIN: u8 = 1;
const MAX_TIME: u8 = 3;
const CLIENTS: usize = 2;

type Token = u8;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Answer {
    Waiting,
    Granted,
    Held,
    TimedOut,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Client {
    Idle,
    Attempting {
        token: Token,
        attempt: u8,
        sent: u8,
        answers: Vec<Answer>,
    },
    Holding {
        token: Token,
        deadline: u8,
    },
    Done,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Msg {
    Set {
        node: usize,
        client: usize,
        token: Token,
        attempt: u8,
    },
    Delete {
        node: usize,
        token: Token,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    now: u8,
    keys: Vec<Option<(Token, u8)>>,
    clients: Vec<Client>,
    net: Vec<Msg>,
    next_token: Token,
    restarts_left: u8,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Action {
    Start(usize),
    Exec(usize),
    GiveUp(usize, usize),
    Decide(usize),
    Finish(usize),
    Restart(usize),
    Tick,
}

struct Redlock {
    nodes: usize,
    /// Attempts per client (client 0 first).
    attempts: [u8; CLIENTS],
    restarts: u8,
    /// Retry with the failed attempt's token (the code before issue 11's fix).
    reuse_tokens: bool,
}

impl Redlock {
    fn quorum(&self) -> usize {
        self.nodes / 2 + 1
    }
}

impl State {
    fn live(&self, node: usize) -> Option<Token> {
        self.keys[node]
            .filter(|&(_, expires)| self.now < expires)
            .map(|(token, _)| token)
    }

    fn send(&mut self, msg: Msg) {
        self.net.push(msg);
        self.net.sort();
    }
}

/// Nodes are interchangeable (the quorum counts them, the property counts holders): a
/// state stands for every renumbering of its nodes. The representative orders the nodes
/// by everything the state says of each (its key, each client's answer from it, the
/// commands on their way to it), so renumberings of one state map to one representative;
/// nodes that tie are alike and their order does not matter.
impl Representative for State {
    fn representative(&self) -> Self {
        let nodes = self.keys.len();
        let signature = |node: usize| {
            let answers: Vec<Option<Answer>> = self
                .clients
                .iter()
                .map(|c| match c {
                    Client::Attempting { answers, .. } => Some(answers[node]),
                    _ => None,
                })
                .collect();
            let mut msgs: Vec<(u8, usize, Token, u8)> = self
                .net
                .iter()
                .filter_map(|m| match *m {
                    Msg::Set {
                        node: n,
                        client,
                        token,
                        attempt,
                    } if n == node => Some((0, client, token, attempt)),
                    Msg::Delete { node: n, token } if n == node => Some((1, 0, token, 0)),
                    _ => None,
                })
                .collect();
            msgs.sort();
            (self.keys[node], answers, msgs)
        };
        let mut order: Vec<usize> = (0..nodes).collect();
        order.sort_by_key(|&node| signature(node));
        // `order[new] = old`; `renumber[old] = new`.
        let mut renumber = vec![0; nodes];
        for (new, &old) in order.iter().enumerate() {
            renumber[old] = new;
        }
        let mut s = self.clone();
        s.keys = order.iter().map(|&old| self.keys[old]).collect();
        for client in &mut s.clients {
            if let Client::Attempting { answers, .. } = client {
                let old = answers.clone();
                *answers = order.iter().map(|&o| old[o]).collect();
            }
        }
        for msg in &mut s.net {
            match msg {
                Msg::Set { node, .. } | Msg::Delete { node, .. } => *node = renumber[*node],
            }
        }
        s.net.sort();
        s
    }
}

impl Model for Redlock {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            now: 0,
            keys: vec![None; self.nodes],
            clients: vec![Client::Idle; CLIENTS],
            net: Vec::new(),
            next_token: 0,
            restarts_left: self.restarts,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (c, client) in s.clients.iter().enumerate() {
            match client {
                Client::Idle => actions.push(Action::Start(c)),
                Client::Attempting { answers, .. } => {
                    if answers.iter().all(|a| *a != Answer::Waiting) {
                        actions.push(Action::Decide(c));
                    }
                    for (node, a) in answers.iter().enumerate() {
                        if *a == Answer::Waiting {
                            actions.push(Action::GiveUp(c, node));
                        }
                    }
                }
                Client::Holding { .. } => actions.push(Action::Finish(c)),
                Client::Done => {}
            }
        }
        for i in 0..s.net.len() {
            actions.push(Action::Exec(i));
        }
        if s.restarts_left > 0 {
            for node in 0..self.nodes {
                if s.keys[node].is_some() {
                    actions.push(Action::Restart(node));
                }
            }
        }
        if s.now < MAX_TIME {
            actions.push(Action::Tick);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Start(c) => {
                s.next_token += 1;
                let token = s.next_token;
                self.send_attempt(&mut s, c, token, 1);
            }
            Action::Exec(i) => match s.net.remove(i) {
                Msg::Set {
                    node,
                    client,
                    token,
                    attempt,
                } => {
                    let granted = match s.live(node) {
                        None => {
                            s.keys[node] = Some((token, s.now + TTL));
                            true
                        }
                        Some(owner) if owner == token => {
                            s.keys[node] = Some((token, s.now + TTL));
                            true
                        }
                        Some(_) => false,
                    };
                    // The reply, at once: a reply that comes late is the same as a
                    // command that runs late (the client decides later either way), and a
                    // lost one is the client's `GiveUp` before the command runs.
                    if let Client::Attempting {
                        attempt: current,
                        answers,
                        ..
                    } = &mut s.clients[client]
                        && *current == attempt
                        && answers[node] == Answer::Waiting
                    {
                        answers[node] = if granted {
                            Answer::Granted
                        } else {
                            Answer::Held
                        };
                    }
                }
                Msg::Delete { node, token } => {
                    if s.live(node) == Some(token) {
                        s.keys[node] = None;
                    }
                }
            },
            Action::GiveUp(c, node) => {
                let Client::Attempting { answers, .. } = &mut s.clients[c] else {
                    return None;
                };
                answers[node] = Answer::TimedOut;
            }
            Action::Decide(c) => {
                let Client::Attempting {
                    token,
                    attempt,
                    sent,
                    answers,
                } = s.clients[c].clone()
                else {
                    return None;
                };
                let granted = answers.iter().filter(|a| **a == Answer::Granted).count();
                let deadline = (sent + TTL).saturating_sub(MARGIN);
                if granted >= self.quorum() && s.now < deadline {
                    s.clients[c] = Client::Holding { token, deadline };
                } else {
                    for (node, a) in answers.iter().enumerate() {
                        if *a != Answer::Held {
                            s.send(Msg::Delete { node, token });
                        }
                    }
                    if attempt < self.attempts[c] {
                        let next = if self.reuse_tokens {
                            token
                        } else {
                            s.next_token += 1;
                            s.next_token
                        };
                        self.send_attempt(&mut s, c, next, attempt + 1);
                    } else {
                        s.clients[c] = Client::Done;
                    }
                }
            }
            Action::Finish(c) => {
                let Client::Holding { token, .. } = s.clients[c] else {
                    return None;
                };
                for node in 0..self.nodes {
                    s.send(Msg::Delete { node, token });
                }
                s.clients[c] = Client::Done;
            }
            Action::Restart(node) => {
                s.keys[node] = None;
                s.restarts_left -= 1;
            }
            Action::Tick => s.now += 1,
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![Property::always(
            "one holder with a valid lease",
            |_, s: &State| {
                s.clients
                    .iter()
                    .filter(|c| matches!(c, Client::Holding { deadline, .. } if s.now < *deadline))
                    .count()
                    <= 1
            },
        )]
    }
}

impl Redlock {
    fn send_attempt(&self, s: &mut State, c: usize, token: Token, attempt: u8) {
        for node in 0..self.nodes {
            s.send(Msg::Set {
                node,
                client: c,
                token,
                attempt,
            });
        }
        s.clients[c] = Client::Attempting {
            token,
            attempt,
            sent: s.now,
            answers: vec![Answer::Waiting; self.nodes],
        };
    }
}

/// Whether the model finds two holders at once.
fn finds_two_holders(model: Redlock) -> bool {
    let checker = model.checker().symmetry().spawn_dfs().join();
    eprintln!("redlock model: {} states", checker.unique_state_count());
    checker
        .discovery("one holder with a valid lease")
        .inspect(|path| eprintln!("two holders after {} steps", path.last_state().now))
        .is_some()
}

/// A node restarted empty while the lock is held on a bare majority hands that node to
/// the next client: two holders. What the backend's docs say to do about it (persistence,
/// or keep a crashed node down for a ttl) is the only defence.
#[test]
fn a_node_restarted_empty_can_let_a_second_holder_in() {
    let model = Redlock {
        nodes: 3,
        attempts: [1, 1],
        restarts: 1,
        reuse_tokens: false,
    };
    assert!(finds_two_holders(model));
}

/// With every node keeping its data, no interleaving of commands that run late, replies
/// that never come and timeouts gives two holders: the majority and validity rule holds.
#[test]
fn healthy_nodes_never_let_two_hold() {
    let model = Redlock {
        nodes: 3,
        attempts: [1, 1],
        restarts: 0,
        reuse_tokens: false,
    };
    assert!(!finds_two_holders(model));
}

/// The model can fail: the code before issue 11's fix retried a failed attempt with the
/// same token, so that the late undo of the first attempt could delete the grant of the
/// second on a node, and another client then found a majority.
#[test]
fn retries_with_the_same_token_let_two_hold() {
    let model = Redlock {
        nodes: 3,
        attempts: [2, 1],
        restarts: 0,
        reuse_tokens: true,
    };
    assert!(finds_two_holders(model));
}

/// Five nodes, one restarted empty: a bare majority of three loses one and the next client
/// finds three free, as on three nodes.
#[test]
fn five_nodes_one_restarted_empty_can_let_a_second_holder_in() {
    let model = Redlock {
        nodes: 5,
        attempts: [1, 1],
        restarts: 1,
        reuse_tokens: false,
    };
    assert!(finds_two_holders(model));
}
