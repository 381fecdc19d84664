//! Who is online and who watches whom: the maps every session consults to relay a
//! message or announce presence, and the handle through which one session hands a
//! message to another.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::ids::UserName;
use crate::signal::protocol::CloseReason;

/// A message queued for a session, with the share of its byte budget and of its
/// sender's allowance it holds until it is written.
pub(super) struct Outgoing {
    pub(super) text: Utf8Bytes,
    pub(super) _budget: OwnedSemaphorePermit,
    _share: Share,
}

/// Why a message could not be handed to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Undelivered {
    /// The session has ended.
    Gone,
    /// Its queue, or the part of it one sender may fill, is full: the message is
    /// dropped, and only the sender is told.
    Busy,
}

/// What each sender has queued for one session: messages and bytes.
type Shares = Arc<Mutex<HashMap<u64, (usize, usize)>>>;

/// One message's part of its sender's allowance; given back when the message is
/// written or dropped.
struct Share {
    shares: Shares,
    from: u64,
    bytes: usize,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut shares = lock(&self.shares);
        if let Some(entry) = shares.get_mut(&self.from) {
            entry.0 -= 1;
            entry.1 -= self.bytes;
            if entry.0 == 0 {
                shares.remove(&self.from);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters only: a panic elsewhere cannot leave them worse than slightly off.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The part of a session's queue (in messages and in bytes) any one sender may fill:
/// a sender that sends faster than the recipient reads loses its own messages, and
/// the others still get through.
const SENDER_SHARE: usize = 4;

/// How other sessions reach one session.
pub(super) struct ConnHandle {
    pub(super) id: u64,
    pub(super) user: UserName,
    /// Messages for this session, written by its task. Bounded in count here and in
    /// bytes by `budget`, and per sender by `shares`: what does not fit is refused to
    /// its sender, never buffered. (A session that stops reading is closed by its own
    /// task when a write times out.)
    tx: mpsc::Sender<Outgoing>,
    /// Bytes this session may have queued.
    budget: Arc<Semaphore>,
    /// What each sender has queued, within `max_share`.
    shares: Shares,
    /// Most messages and bytes one sender may have queued.
    max_share: (usize, usize),
    /// Tells the session's task to close (replaced, lagging).
    kick: watch::Sender<Option<CloseReason>>,
    /// The generation of the token the session holds (see `Claims::generation`).
    generation: std::sync::atomic::AtomicU64,
}

impl ConnHandle {
    pub(super) fn new(
        id: u64,
        user: UserName,
        tx: mpsc::Sender<Outgoing>,
        budget_bytes: usize,
        kick: watch::Sender<Option<CloseReason>>,
        generation: u64,
    ) -> Self {
        let max_share = (
            (tx.max_capacity() / SENDER_SHARE).max(1),
            (budget_bytes / SENDER_SHARE).max(1),
        );
        Self {
            id,
            user,
            tx,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            shares: Shares::default(),
            max_share,
            kick,
            generation: generation.into(),
        }
    }

    /// The generation of the session's token.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The session refreshed its token with one of `generation`.
    pub(super) fn set_generation(&self, generation: u64) {
        self.generation
            .store(generation, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues `text`, sent by session `from`, for this session without waiting.
    pub(super) fn deliver(&self, from: u64, text: Utf8Bytes) -> Result<(), Undelivered> {
        if self.tx.is_closed() {
            return Err(Undelivered::Gone);
        }
        let share = {
            let mut shares = lock(&self.shares);
            let entry = shares.entry(from).or_default();
            if entry.0 >= self.max_share.0 || entry.1 + text.len() > self.max_share.1 {
                if entry.0 == 0 {
                    shares.remove(&from);
                }
                return Err(Undelivered::Busy);
            }
            entry.0 += 1;
            entry.1 += text.len();
            Share {
                shares: self.shares.clone(),
                from,
                bytes: text.len(),
            }
        };
        let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
        let Ok(budget) = self.budget.clone().try_acquire_many_owned(len) else {
            return Err(Undelivered::Busy);
        };
        match self.tx.try_send(Outgoing {
            text,
            _budget: budget,
            _share: share,
        }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Undelivered::Gone),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Undelivered::Busy),
        }
    }

    /// Asks the session to close with `reason`.
    pub(super) fn kick(&self, reason: CloseReason) {
        self.kick.send_replace(Some(reason));
    }
}

/// The maps. Sessions own their handles; the router holds clones.
#[derive(Default)]
pub(super) struct Router {
    /// The current session of each online user.
    online: HashMap<UserName, Arc<ConnHandle>>,
    /// For each watched user, the sessions watching it, by session id.
    watchers: HashMap<UserName, HashMap<u64, Arc<ConnHandle>>>,
}

impl Router {
    /// Makes `handle` its user's current session. Returns the session it replaces, if
    /// any, and otherwise the watchers to tell the user came online.
    pub(super) fn connect(
        &mut self,
        handle: Arc<ConnHandle>,
    ) -> (Option<Arc<ConnHandle>>, Vec<Arc<ConnHandle>>) {
        let user = handle.user.clone();
        match self.online.insert(user.clone(), handle) {
            Some(old) => (Some(old), Vec::new()),
            None => (None, self.watchers_of(&user)),
        }
    }

    /// Forgets session `handle` and its watches. Returns the watchers to tell its user
    /// went away, unless a newer session of the same user has replaced it.
    pub(super) fn disconnect(
        &mut self,
        handle: &ConnHandle,
        watched: &HashSet<UserName>,
    ) -> Vec<Arc<ConnHandle>> {
        for user in watched {
            self.unwatch(handle.id, user);
        }
        match self.online.get(&handle.user) {
            Some(current) if current.id == handle.id => {
                self.online.remove(&handle.user);
                self.watchers_of(&handle.user)
            }
            _ => Vec::new(),
        }
    }

    /// The current session of `user`.
    pub(super) fn lookup(&self, user: &UserName) -> Option<Arc<ConnHandle>> {
        self.online.get(user).cloned()
    }

    /// `watcher` watches `user` from now on; returns whether `user` is online.
    pub(super) fn watch(&mut self, watcher: &Arc<ConnHandle>, user: &UserName) -> bool {
        self.watchers
            .entry(user.clone())
            .or_default()
            .insert(watcher.id, watcher.clone());
        self.online.contains_key(user)
    }

    /// Session `watcher_id` no longer watches `user`.
    pub(super) fn unwatch(&mut self, watcher_id: u64, user: &UserName) {
        if let Some(set) = self.watchers.get_mut(user) {
            set.remove(&watcher_id);
            if set.is_empty() {
                self.watchers.remove(user);
            }
        }
    }

    fn watchers_of(&self, user: &UserName) -> Vec<Arc<ConnHandle>> {
        self.watchers
            .get(user)
            .map(|set| set.values().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(id: u64, user: &str) -> (Arc<ConnHandle>, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(16);
        let (kick, _) = watch::channel(None);
        (
            Arc::new(ConnHandle::new(
                id,
                UserName::new(user).unwrap(),
                tx,
                100,
                kick,
                0,
            )),
            rx,
        )
    }

    #[test]
    fn replacement_keeps_the_user_online_for_watchers() {
        let mut router = Router::default();
        let (watcher, _w) = handle(1, "bob");
        let alice = UserName::new("alice").unwrap();
        assert!(!router.watch(&watcher, &alice));
        let (a1, _r1) = handle(2, "alice");
        let (replaced, told) = router.connect(a1.clone());
        assert!(replaced.is_none());
        assert_eq!(told.len(), 1);
        let (a2, _r2) = handle(3, "alice");
        let (replaced, told) = router.connect(a2.clone());
        assert_eq!(replaced.unwrap().id, 2);
        assert!(told.is_empty());
        // The replaced session ending does not take its successor offline.
        assert!(router.disconnect(&a1, &HashSet::new()).is_empty());
        assert_eq!(router.lookup(&alice).unwrap().id, 3);
        assert_eq!(router.disconnect(&a2, &HashSet::new()).len(), 1);
        assert!(router.lookup(&alice).is_none());
    }

    #[test]
    fn a_sender_beyond_its_share_is_refused_and_the_recipient_keeps_its_session() {
        let (h, mut rx) = handle(1, "bob");
        let (flooder, other) = (7, 8);
        for _ in 0..4 {
            assert_eq!(h.deliver(flooder, "x".into()), Ok(()));
        }
        assert_eq!(h.deliver(flooder, "x".into()), Err(Undelivered::Busy));
        // Another sender still gets through, and nobody kicked the recipient.
        assert_eq!(h.deliver(other, "y".into()), Ok(()));
        assert_eq!(*h.kick.borrow(), None);
        // A message written gives its share back.
        drop(rx.try_recv().unwrap());
        assert_eq!(h.deliver(flooder, "x".into()), Ok(()));
        // Bytes count too: a quarter of the budget per sender.
        assert_eq!(
            h.deliver(other, "y".repeat(30).into()),
            Err(Undelivered::Busy)
        );
        assert_eq!(h.deliver(other, "y".repeat(20).into()), Ok(()));
        drop(rx);
        assert_eq!(h.deliver(other, "w".into()), Err(Undelivered::Gone));
    }
}
