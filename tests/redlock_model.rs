//! Redlock's majority and validity rule as a model, checked exhaustively with `stateright`
//! (issue 16), for 3 and 5 nodes.
//!
//! | model step | code (`src/backend/redlock.rs`) |
//! |---|---|
//! | `Start`: an attempt sends `SET NX` with its token to every node | `try_acquire` → `on_all` |
//! | `Exec` / `Deliver`: a node runs the command (atomically) whenever it gets there; its reply arrives, or never does within the bound (lost) | `RedisBackend::try_acquire`, the node timeout |
//! | `GiveUp(node)`: the attempt stops waiting for a node (node timeout); the command may still run later | `on_nodes`' timeout |
//! | `Decide`: a majority granted and the validity (sent + ttl − margin) is not over → holding; otherwise undo on every node that granted or did not answer, and try again with a **fresh** token (the fix of issue 11; `reuse_tokens` models the old code) | `try_acquire`, `LockBackend::retry_with_same_token` |
//! | `Exec(Undo/Release)`: compare-and-delete, whenever it gets there (late, possibly after a later attempt) | `RedisBackend::undo`, `release` |
//! | `Restart(node)`: a node comes back empty (no persistence) | — |
//! | `Tick`: time; nodes expire keys by it | `PX` |
//!
//! Property: no two clients hold the lock while each believes its validity not over.
//!
//! What is checked here: that one node restarted empty lets a second holder in on 3 nodes
//! (the limit `RedlockBackend`'s docs state), found in 39 thousand states. The healthy-node
//! case, and retries with fresh tokens against the old reuse of tokens, grow past what this
//! checker explores in minutes on two cores; `tests/redlock.rs` covers those sequences
//! against real servers.

use stateright::{Checker, Model, Property};

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
    Reply {
        node: usize,
        client: usize,
        attempt: u8,
        granted: bool,
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
    Deliver(usize),
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
        for (i, msg) in s.net.iter().enumerate() {
            // A message never delivered within the time bound is a lost one: no `Lose`
            // step is needed (the client's `GiveUp` stands for its timeout).
            match msg {
                Msg::Reply { .. } => actions.push(Action::Deliver(i)),
                _ => actions.push(Action::Exec(i)),
            }
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
                    s.send(Msg::Reply {
                        node,
                        client,
                        attempt,
                        granted,
                    });
                }
                Msg::Delete { node, token } => {
                    if s.live(node) == Some(token) {
                        s.keys[node] = None;
                    }
                }
                Msg::Reply { .. } => return None,
            },
            Action::Deliver(i) => {
                let Msg::Reply {
                    node,
                    client,
                    attempt,
                    granted,
                } = s.net.remove(i)
                else {
                    return None;
                };
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
    let checker = model.checker().spawn_dfs().join();
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
