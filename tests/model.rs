//! The one-Redis lock protocol as a model, checked exhaustively with `stateright`
//! (issue 16). Not a test of the code's text: a test of the protocol the code follows,
//! with every interleaving of the steps below explored up to the bounds.
//!
//! What is modelled, and where it lives in `src/`:
//!
//! | model step | code |
//! |---|---|
//! | `Arrive`: a request joins its process's line, or gets the turn | `line::Line::enter` |
//! | `Send`: the turn-holder sends an acquire with its token | `locker::acquire::from_backend` → `LockBackend::try_acquire` |
//! | `Exec(Acquire)`: Redis runs the acquire script atomically: `SET NX PX`, or our own token (lease reset), each taking a fencing token (`scripts::FENCE_LUA`: strictly above the stored one, modelled as `INCR`; the counter does not expire within the model); otherwise "held" | `backend/scripts.rs` `ACQUIRE` |
//! | `Deliver` / `Drop`: the reply arrives, or is lost | the multiplexed connection |
//! | `Timeout`: the client stops waiting for a reply (the message stays in the network and may still run later) and tries again with the same token | `from_backend`'s error path (`in_doubt`) |
//! | a reply `Acquired` sets the lease deadline `sent + ttl − margin`; a deadline already past means "lost" | `Held::new`, `lease::lease_end`, the watchdog's first poll |
//! | `Renew`: extend if our token holds the key (atomic; may find it lost) | `locker::watchdog` → `EXTEND` |
//! | `Finish`: hand the lock to the next local waiter (cap, lease still good), or send a release | `locker::guard::LockGuard::release` → `try_hand_off` / `RELEASE` |
//! | the taker of a hand-off re-acquires with the same token (fencing: a new token is due); "held" → a fresh token, like the first in line | `locker::acquire::take_over` |
//! | `Exec(Release)`: compare-and-delete, whenever the message gets there | `RELEASE` |
//! | `Tick`: time passes; Redis expires keys by it; a client that takes no step meanwhile is paused | `tokio::time`, `PX` |
//!
//! Abstracted away: notifications and backoff (they only change *when* a waiter sends),
//! the waiter marks (they only decide publishing and step-aside), cancellation, and the
//! client's clock drift, which is folded into the margin: Redis starts a lease when it
//! runs the script, never before the client sent it, so a client deadline of `sent + ttl −
//! margin` is never later than Redis's expiry.
//!
//! Properties: (1) no two requests hold the lock at once while each believes its lease
//! valid; (2) fencing tokens grow strictly in the order holders enter; (3) some run reaches
//! the state where every request is done (the protocol can make progress).

use std::collections::BTreeMap;

use stateright::{Checker, Model, Property};

/// Lease length and drift margin, in ticks.
const TTL: u8 = 3;
const MARGIN: u8 = 1;
/// Hand-offs in a row before a real release.
const MAX_HAND_OFFS: u8 = 1;
/// Exploration bounds: acquire calls per asker, messages in flight.
const MAX_ATTEMPTS: u8 = 2;
const MAX_IN_FLIGHT: u8 = 2;

type Token = u8;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Req {
    /// Not arrived yet.
    Idle,
    /// Waiting in its process's line (arrival order: `seq`).
    Queued {
        seq: u8,
    },
    /// Has the turn (or a hand-off): asks Redis with `token`. `attempt` tags the call
    /// waited for (`pending`); `take_over`: "held" means the handed-off lease is gone.
    Asking {
        token: Token,
        attempt: u8,
        pending: bool,
        take_over: bool,
    },
    /// Holds the lock (as it believes until `deadline`), with fencing token `fence`.
    Holding {
        token: Token,
        deadline: u8,
        fence: u8,
    },
    Done,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Answer {
    Acquired { fence: u8 },
    Held,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Msg {
    Acquire {
        req: usize,
        token: Token,
        attempt: u8,
        sent: u8,
    },
    Reply {
        req: usize,
        attempt: u8,
        sent: u8,
        answer: Answer,
    },
    Release {
        token: Token,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    now: u8,
    /// The lock key: owner token and expiry.
    key: Option<(Token, u8)>,
    fence_counter: u8,
    next_token: Token,
    next_seq: u8,
    reqs: Vec<Req>,
    /// Messages in flight, as a multiset.
    net: BTreeMap<Msg, u8>,
    hand_offs: Vec<u8>,
    /// The largest fencing token a holder entered with.
    last_fence: u8,
    fence_went_back: bool,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Action {
    Arrive(usize),
    Send(usize),
    Timeout(usize),
    Exec(Msg),
    Deliver(Msg),
    Drop(Msg),
    Renew(usize),
    Finish(usize),
    Tick,
}

/// Requests and the process each belongs to.
struct Protocol {
    process_of: Vec<usize>,
    processes: usize,
    /// Time bound of the exploration, in ticks.
    max_time: u8,
}

impl State {
    fn live_key(&self) -> Option<Token> {
        self.key
            .filter(|&(_, expires)| self.now < expires)
            .map(|(token, _)| token)
    }

    fn send(&mut self, msg: Msg) {
        *self.net.entry(msg).or_default() += 1;
    }

    fn take(&mut self, msg: Msg) -> bool {
        match self.net.get_mut(&msg) {
            Some(count) => {
                *count -= 1;
                if *count == 0 {
                    self.net.remove(&msg);
                }
                true
            }
            None => false,
        }
    }

    fn fresh_token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }
}

impl Protocol {
    /// Whether someone of `process` has the turn or the lock.
    fn busy(&self, state: &State, process: usize) -> bool {
        state.reqs.iter().enumerate().any(|(i, r)| {
            self.process_of[i] == process && matches!(r, Req::Asking { .. } | Req::Holding { .. })
        })
    }

    /// The first queued request of `process`.
    fn next_in_line(&self, state: &State, process: usize) -> Option<usize> {
        state
            .reqs
            .iter()
            .enumerate()
            .filter(|(i, _)| self.process_of[*i] == process)
            .filter_map(|(i, r)| match r {
                Req::Queued { seq } => Some((*seq, i)),
                _ => None,
            })
            .min()
            .map(|(_, i)| i)
    }

    /// The turn passes to the next in line, who asks with a token of its own.
    fn pass_turn(&self, state: &mut State, process: usize) {
        state.hand_offs[process] = 0;
        if let Some(next) = self.next_in_line(state, process) {
            let token = state.fresh_token();
            state.reqs[next] = Req::Asking {
                token,
                attempt: 0,
                pending: false,
                take_over: false,
            };
        }
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            now: 0,
            key: None,
            fence_counter: 0,
            next_token: 0,
            next_seq: 0,
            reqs: vec![Req::Idle; self.process_of.len()],
            net: BTreeMap::new(),
            hand_offs: vec![0; self.processes],
            last_fence: 0,
            fence_went_back: false,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        for (i, req) in state.reqs.iter().enumerate() {
            match req {
                Req::Idle => actions.push(Action::Arrive(i)),
                Req::Asking { pending: false, .. } => actions.push(Action::Send(i)),
                Req::Asking { pending: true, .. } => actions.push(Action::Timeout(i)),
                Req::Holding { .. } => {
                    actions.push(Action::Renew(i));
                    actions.push(Action::Finish(i));
                }
                Req::Queued { .. } | Req::Done => {}
            }
        }
        for msg in state.net.keys() {
            match msg {
                Msg::Acquire { .. } | Msg::Release { .. } => actions.push(Action::Exec(*msg)),
                Msg::Reply { .. } => {
                    actions.push(Action::Deliver(*msg));
                    actions.push(Action::Drop(*msg));
                }
            }
        }
        if state.now < self.max_time {
            actions.push(Action::Tick);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Arrive(i) => {
                let process = self.process_of[i];
                if self.busy(&s, process) {
                    s.next_seq += 1;
                    s.reqs[i] = Req::Queued { seq: s.next_seq };
                } else {
                    let token = s.fresh_token();
                    s.reqs[i] = Req::Asking {
                        token,
                        attempt: 0,
                        pending: false,
                        take_over: false,
                    };
                }
            }
            Action::Send(i) => {
                let Req::Asking {
                    token,
                    attempt,
                    take_over,
                    ..
                } = s.reqs[i]
                else {
                    return None;
                };
                let attempt = attempt + 1;
                s.reqs[i] = Req::Asking {
                    token,
                    attempt,
                    pending: true,
                    take_over,
                };
                s.send(Msg::Acquire {
                    req: i,
                    token,
                    attempt,
                    sent: s.now,
                });
            }
            Action::Timeout(i) => {
                let Req::Asking { token, attempt, .. } = s.reqs[i] else {
                    return None;
                };
                // In doubt: the same token again, so that a grant that did land is ours.
                s.reqs[i] = Req::Asking {
                    token,
                    attempt,
                    pending: false,
                    take_over: false,
                };
            }
            Action::Exec(msg) => {
                if !s.take(msg) {
                    return None;
                }
                match msg {
                    Msg::Acquire {
                        req,
                        token,
                        attempt,
                        sent,
                    } => {
                        let answer = match s.live_key() {
                            None => {
                                s.key = Some((token, s.now + TTL));
                                s.fence_counter += 1;
                                Answer::Acquired {
                                    fence: s.fence_counter,
                                }
                            }
                            Some(owner) if owner == token => {
                                s.key = Some((token, s.now + TTL));
                                s.fence_counter += 1;
                                Answer::Acquired {
                                    fence: s.fence_counter,
                                }
                            }
                            Some(_) => Answer::Held,
                        };
                        s.send(Msg::Reply {
                            req,
                            attempt,
                            sent,
                            answer,
                        });
                    }
                    Msg::Release { token } => {
                        if s.live_key() == Some(token) {
                            s.key = None;
                        }
                    }
                    Msg::Reply { .. } => return None,
                }
            }
            Action::Drop(msg) => {
                if !s.take(msg) {
                    return None;
                }
            }
            Action::Deliver(msg) => {
                let Msg::Reply {
                    req,
                    attempt,
                    sent,
                    answer,
                } = msg
                else {
                    return None;
                };
                if !s.take(msg) {
                    return None;
                }
                let Req::Asking {
                    token,
                    attempt: waited_for,
                    pending: true,
                    take_over,
                } = s.reqs[req]
                else {
                    return Some(s); // a reply nobody waits for any more
                };
                if attempt != waited_for {
                    return Some(s);
                }
                match answer {
                    Answer::Acquired { fence } => {
                        let deadline = (sent + TTL).saturating_sub(MARGIN);
                        if s.now >= deadline {
                            // Lost before it could be used: the guard releases.
                            s.reqs[req] = Req::Done;
                            s.send(Msg::Release { token });
                            self.pass_turn(&mut s, self.process_of[req]);
                        } else {
                            if fence <= s.last_fence {
                                s.fence_went_back = true;
                            }
                            s.last_fence = s.last_fence.max(fence);
                            s.reqs[req] = Req::Holding {
                                token,
                                deadline,
                                fence,
                            };
                        }
                    }
                    Answer::Held if take_over => {
                        let token = s.fresh_token();
                        s.reqs[req] = Req::Asking {
                            token,
                            attempt: 0,
                            pending: false,
                            take_over: false,
                        };
                    }
                    Answer::Held => {
                        s.reqs[req] = Req::Asking {
                            token,
                            attempt: waited_for,
                            pending: false,
                            take_over: false,
                        };
                    }
                }
            }
            Action::Renew(i) => {
                let Req::Holding {
                    token,
                    deadline,
                    fence,
                } = s.reqs[i]
                else {
                    return None;
                };
                if s.now >= deadline {
                    return None; // the watchdog reports the loss instead
                }
                if s.live_key() == Some(token) {
                    s.key = Some((token, s.now + TTL));
                    s.reqs[i] = Req::Holding {
                        token,
                        deadline: (s.now + TTL).saturating_sub(MARGIN),
                        fence,
                    };
                } else {
                    // Taken: the holder stops (Abort) and its guard releases.
                    s.reqs[i] = Req::Done;
                    s.send(Msg::Release { token });
                    self.pass_turn(&mut s, self.process_of[i]);
                }
            }
            Action::Finish(i) => {
                let Req::Holding {
                    token, deadline, ..
                } = s.reqs[i]
                else {
                    return None;
                };
                let process = self.process_of[i];
                s.reqs[i] = Req::Done;
                let next = self.next_in_line(&s, process);
                match next {
                    Some(next) if s.hand_offs[process] < MAX_HAND_OFFS && s.now < deadline => {
                        s.hand_offs[process] += 1;
                        // Fencing is on: the taker re-acquires under the same token.
                        s.reqs[next] = Req::Asking {
                            token,
                            attempt: 0,
                            pending: false,
                            take_over: true,
                        };
                    }
                    _ => {
                        s.send(Msg::Release { token });
                        self.pass_turn(&mut s, process);
                    }
                }
            }
            Action::Tick => s.now += 1,
        }
        Some(s)
    }

    fn within_boundary(&self, s: &State) -> bool {
        s.net.values().copied().sum::<u8>() <= MAX_IN_FLIGHT
            && s.reqs.iter().all(|r| match r {
                Req::Asking { attempt, .. } => *attempt <= MAX_ATTEMPTS,
                _ => true,
            })
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("one holder with a valid lease", |_, s: &State| {
                s.reqs
                    .iter()
                    .filter(|r| matches!(r, Req::Holding { deadline, .. } if s.now < *deadline))
                    .count()
                    <= 1
            }),
            Property::always("fencing tokens grow in entry order", |_, s: &State| {
                !s.fence_went_back
            }),
            Property::sometimes("every request done", |_, s: &State| {
                s.reqs.iter().all(|r| *r == Req::Done)
            }),
        ]
    }
}

/// Two processes: the first with two requests (a local line and a hand-off), the second
/// with one. Lost replies, timeouts with late execution, releases that arrive late,
/// pauses and expiry are all explored, for `max_time` ticks (a lease is 3).
fn check(max_time: u8) {
    let model = Protocol {
        process_of: vec![0, 0, 1],
        processes: 2,
        max_time,
    };
    let checker = model.checker().threads(2).spawn_bfs().join();
    eprintln!(
        "model, {max_time} ticks: {} states explored",
        checker.unique_state_count()
    );
    checker.assert_properties();
}

#[test]
fn the_protocol_keeps_its_promises() {
    check(3);
}

/// About 8 million states: run it optimised, `cargo test --release --test model --
/// --ignored` (about a minute on two cores).
#[test]
#[ignore = "minutes unoptimised; run with --release -- --ignored"]
fn the_protocol_keeps_its_promises_over_more_time() {
    check(4);
}
