//! The owner's outgoing messages, one queue per member and priority, each sent
//! by a task of its own. Putting a message in a queue never waits, so a member
//! that stops reading (its link's send buffer full) holds up only its own
//! queues: the tree's changes still go out to the other members at once, and
//! the loop that handles what peers send never waits for anyone's link.
//!
//! A queue is bounded in bytes. Messages that must go whole whatever the size
//! (the chunks of a snapshot, a refusal) are pushed uncounted; the engine sends
//! at most one snapshot of a group to a member at a time, which bounds them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::ids::UserName;
use crate::sync::engine::{Link, Priority, Reach};

/// Most bytes of counted messages waiting in a member's control queue
/// (changes): a member further behind is dropped and subscribes again.
pub const QUEUE_BYTES: usize = 12 << 20;

/// Most bytes of counted messages waiting in a member's queue of blocks: a few
/// blocks keep its link busy, and no more are read ahead of what it takes (a
/// member whose requests time out across a cut asks again, and what is queued
/// would then go twice).
pub const BLOCK_QUEUE_BYTES: usize = 1 << 20;

/// The bound of a queue of `priority`.
pub fn limit(priority: Priority) -> usize {
    match priority {
        Priority::Control => QUEUE_BYTES,
        Priority::Interactive | Priority::Bulk => BLOCK_QUEUE_BYTES,
    }
}

/// Called once a message has left (`Ok`), or with why it could not be sent:
/// what the link said, or that the queue was cleared.
pub type OnDone = Box<dyn FnOnce(Result<(), String>) + Send>;

/// The queue is full: the member is too far behind to catch up by messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the member's queue is full")]
pub struct Full;

/// One message waiting.
struct Item {
    payload: Vec<u8>,
    /// Whether it counts toward [`QUEUE_BYTES`].
    counted: bool,
    on_done: Option<OnDone>,
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    /// Bytes of counted items waiting.
    counted: usize,
    /// Whether a task is sending from this queue.
    draining: bool,
    /// Bumped each time the queue is cleared: an answer to a request taken
    /// before is not queued (see [`Outbox::generation`]).
    generation: u64,
}

#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    /// Woken when counted bytes leave the queue.
    room: Notify,
}

/// The outgoing queues of one client's owner side.
pub struct Outbox {
    link: Arc<dyn Link>,
    queues: Mutex<HashMap<(UserName, Priority), Arc<Queue>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its state consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Outbox {
    /// Queues that send over `link`.
    pub fn new(link: Arc<dyn Link>) -> Arc<Self> {
        Arc::new(Self {
            link,
            queues: Mutex::new(HashMap::new()),
        })
    }

    fn queue(&self, to: &UserName, priority: Priority) -> Arc<Queue> {
        lock(&self.queues)
            .entry((to.clone(), priority))
            .or_default()
            .clone()
    }

    /// Queues `payload` for `to`, counted toward the bound: [`Full`] if it
    /// does not fit. Never waits.
    pub fn push(
        self: &Arc<Self>,
        to: &UserName,
        priority: Priority,
        payload: Vec<u8>,
        on_done: Option<OnDone>,
    ) -> Result<(), Full> {
        let queue = self.queue(to, priority);
        let mut state = lock(&queue.state);
        if state.counted > 0 && state.counted + payload.len() > limit(priority) {
            return Err(Full);
        }
        state.counted += payload.len();
        self.enqueue(to, priority, &queue, state, payload, true, on_done);
        Ok(())
    }

    /// Queues `payload` for `to` whatever the bound (snapshot chunks, refusals).
    pub fn push_always(
        self: &Arc<Self>,
        to: &UserName,
        priority: Priority,
        payload: Vec<u8>,
        on_done: Option<OnDone>,
    ) {
        let queue = self.queue(to, priority);
        let state = lock(&queue.state);
        self.enqueue(to, priority, &queue, state, payload, false, on_done);
    }

    /// The queue's generation now: the queue of blocks of a peer is cleared
    /// when a send to it fails (its link is lost), and what was asked over
    /// that link is then not sent over the next one, where the peer asks again.
    pub fn generation(&self, to: &UserName, priority: Priority) -> u64 {
        lock(&self.queue(to, priority).state).generation
    }

    /// Queues `payload` for `to` once it fits, waiting for room meanwhile: for
    /// senders of their own, such as a block being served, which then hold up
    /// only themselves. Dropped (with `on_done`, untold) if the queue was
    /// cleared since `generation`.
    pub async fn push_waiting(
        self: &Arc<Self>,
        to: &UserName,
        priority: Priority,
        payload: Vec<u8>,
        generation: u64,
        on_done: Option<OnDone>,
    ) {
        let queue = self.queue(to, priority);
        loop {
            let room = queue.room.notified();
            {
                let mut state = lock(&queue.state);
                if state.generation != generation {
                    return;
                }
                if state.counted == 0 || state.counted + payload.len() <= limit(priority) {
                    state.counted += payload.len();
                    return self.enqueue(to, priority, &queue, state, payload, true, on_done);
                }
            }
            room.await;
        }
    }

    /// Waits until `len` more counted bytes fit in the queue of `to` on
    /// `priority` (room may be gone again by the time the caller pushes).
    pub async fn wait_room(&self, to: &UserName, priority: Priority, len: usize) {
        let queue = self.queue(to, priority);
        loop {
            let room = queue.room.notified();
            {
                let state = lock(&queue.state);
                if state.counted == 0 || state.counted + len <= limit(priority) {
                    return;
                }
            }
            room.await;
        }
    }

    /// Drops everything still waiting for `to` on `priority`.
    pub fn clear(&self, to: &UserName, priority: Priority) {
        let queue = self.queue(to, priority);
        let dropped: Vec<Item> = {
            let mut state = lock(&queue.state);
            state.counted = 0;
            state.generation += 1;
            state.items.drain(..).collect()
        };
        queue.room.notify_waiters();
        for f in dropped.into_iter().filter_map(|i| i.on_done) {
            f(Err("dropped: the member fell behind".into()));
        }
    }

    /// Bytes waiting for `to` on `priority`, counted or not.
    pub fn waiting(&self, to: &UserName, priority: Priority) -> usize {
        let queue = lock(&self.queues).get(&(to.clone(), priority)).cloned();
        queue.map_or(0, |q| {
            lock(&q.state).items.iter().map(|i| i.payload.len()).sum()
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        self: &Arc<Self>,
        to: &UserName,
        priority: Priority,
        queue: &Arc<Queue>,
        mut state: std::sync::MutexGuard<'_, State>,
        payload: Vec<u8>,
        counted: bool,
        on_done: Option<OnDone>,
    ) {
        state.items.push_back(Item {
            payload,
            counted,
            on_done,
        });
        if state.draining {
            return;
        }
        state.draining = true;
        drop(state);
        let outbox = self.clone();
        let queue = queue.clone();
        let to = to.clone();
        tokio::spawn(async move { outbox.drain(to, priority, queue).await });
    }

    /// Sends what the queue holds, in order, until it is empty.
    async fn drain(&self, to: UserName, priority: Priority, queue: Arc<Queue>) {
        loop {
            let item = {
                let mut state = lock(&queue.state);
                match state.items.pop_front() {
                    Some(item) => {
                        if item.counted {
                            state.counted -= item.payload.len();
                        }
                        item
                    }
                    None => {
                        state.draining = false;
                        return;
                    }
                }
            };
            if item.counted {
                queue.room.notify_waiters();
            }
            // An owner sends to members over the links they set up; it never
            // waits for one to a member that is away (which resyncs when back).
            let sent = self
                .link
                .send(&to, priority, Reach::Linked, item.payload)
                .await;
            // Blocks asked over a lost link are asked again over the next: what
            // is queued of them goes.
            if sent.is_err() && priority != Priority::Control {
                self.clear(&to, priority);
            }
            if let Some(f) = item.on_done {
                f(sent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::engine::BoxFuture;

    /// A link whose sends to "stuck" never end; the rest are recorded.
    #[derive(Default)]
    struct TestLink {
        sent: Mutex<Vec<(String, Vec<u8>)>>,
    }

    impl Link for TestLink {
        fn send<'a>(
            &'a self,
            to: &'a UserName,
            _priority: Priority,
            _reach: Reach,
            payload: Vec<u8>,
        ) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                if to.as_str() == "stuck" {
                    std::future::pending::<()>().await;
                }
                if to.as_str() == "gone" {
                    return Err("ENODEST".into());
                }
                lock(&self.sent).push((to.to_string(), payload));
                Ok(())
            })
        }
    }

    fn user(name: &str) -> UserName {
        UserName::new(name).unwrap()
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if cond() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Fills the queue of `to` (whose sends never end) up to the bound.
    async fn fill(outbox: &Arc<Outbox>, to: &UserName, priority: Priority) {
        // The first message leaves the queue for the send that never ends.
        outbox.push(to, priority, vec![0; 1 << 20], None).unwrap();
        until("the first in its send", || {
            outbox.waiting(to, priority) == 0
        })
        .await;
        let mut pushed = 0;
        while outbox.push(to, priority, vec![0; 1 << 20], None).is_ok() {
            pushed += 1;
            assert!(pushed < 100, "the queue never fills");
        }
        assert_eq!(pushed, limit(priority) / (1 << 20));
    }

    #[tokio::test]
    async fn a_stuck_member_fills_only_its_own_queue() {
        let link = Arc::new(TestLink::default());
        let outbox = Outbox::new(link.clone());
        let (stuck, bob) = (user("stuck"), user("bob"));
        fill(&outbox, &stuck, Priority::Control).await;
        for i in 0..10u8 {
            outbox.push(&bob, Priority::Control, vec![i], None).unwrap();
        }
        until("bob's messages", || lock(&link.sent).len() == 10).await;
        let sent: Vec<u8> = lock(&link.sent).iter().map(|(_, p)| p[0]).collect();
        assert_eq!(sent, (0..10).collect::<Vec<u8>>(), "in order");
        // Uncounted messages still go in; clearing makes room again.
        outbox.push_always(&stuck, Priority::Control, vec![1; 1 << 20], None);
        assert!(
            outbox
                .push(&stuck, Priority::Control, vec![1], None)
                .is_err()
        );
        outbox.clear(&stuck, Priority::Control);
        assert_eq!(outbox.waiting(&stuck, Priority::Control), 0);
        assert!(
            outbox
                .push(&stuck, Priority::Control, vec![1], None)
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_waiting_push_waits_for_room_and_is_dropped_if_the_queue_was_cleared() {
        let link = Arc::new(TestLink::default());
        let outbox = Outbox::new(link.clone());
        let stuck = user("stuck");
        fill(&outbox, &stuck, Priority::Bulk).await;
        let before = outbox.generation(&stuck, Priority::Bulk);
        let waiter = {
            let outbox = outbox.clone();
            let stuck = stuck.clone();
            tokio::spawn(async move {
                outbox
                    .push_waiting(&stuck, Priority::Bulk, vec![7; 10], before, None)
                    .await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "pushed without room");
        // Cleared (its link lost): what was asked before is not queued.
        outbox.clear(&stuck, Priority::Bulk);
        waiter.await.unwrap();
        assert_eq!(outbox.waiting(&stuck, Priority::Bulk), 0);
        let now = outbox.generation(&stuck, Priority::Bulk);
        assert_ne!(now, before);
        outbox
            .push_waiting(&stuck, Priority::Bulk, vec![7; 10], now, None)
            .await;
        assert_eq!(outbox.waiting(&stuck, Priority::Bulk), 10);
        // A send that fails calls its handler; a failed block send clears its
        // queue.
        let gone = user("gone");
        let (tx, rx) = tokio::sync::oneshot::channel();
        outbox
            .push(
                &gone,
                Priority::Control,
                vec![1],
                Some(Box::new(move |r| {
                    let _ = tx.send(r);
                })),
            )
            .unwrap();
        assert_eq!(rx.await.unwrap(), Err("ENODEST".to_string()));
        let before = outbox.generation(&gone, Priority::Bulk);
        outbox.push(&gone, Priority::Bulk, vec![1], None).unwrap();
        until("the failed send to clear the queue", || {
            outbox.generation(&gone, Priority::Bulk) != before
        })
        .await;
    }
}
