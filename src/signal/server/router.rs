//! Who is online and who watches whom: the maps every session consults to relay a
//! message or announce presence, and the handle through which one session hands a
//! message to another.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::lock;

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
///
/// A session's `watch` list declares the users it needs (an owner its members, a
/// member the owners of groups it joined). Presence is revealed only between two
/// users who declared each other: a user nobody declared back learns nothing about
/// who is online.
#[derive(Default)]
pub(super) struct Router {
    /// The current session of each online user.
    online: HashMap<UserName, Arc<ConnHandle>>,
    /// For each watched user, the sessions watching it, by session id.
    watchers: HashMap<UserName, HashMap<u64, Arc<ConnHandle>>>,
}

impl Router {
    /// Makes `handle` its user's current session. Returns the session it replaces, if
    /// any. Nobody is told yet: the new session has declared nobody so far.
    pub(super) fn connect(&mut self, handle: Arc<ConnHandle>) -> Option<Arc<ConnHandle>> {
        let user = handle.user.clone();
        self.online.insert(user, handle)
    }

    /// Forgets session `handle` and its watches. Returns the sessions to tell its user
    /// went away (those it saw, and that saw it), unless a newer session of the same
    /// user has replaced it.
    pub(super) fn disconnect(
        &mut self,
        handle: &ConnHandle,
        watched: &HashSet<UserName>,
    ) -> Vec<Arc<ConnHandle>> {
        let current = self
            .online
            .get(&handle.user)
            .is_some_and(|current| current.id == handle.id);
        let mut told = Vec::new();
        for user in watched {
            if current && let Some(other) = self.declaring(user, &handle.user) {
                told.push(other);
            }
            self.unwatch_id(handle.id, user);
        }
        if current {
            self.online.remove(&handle.user);
        }
        told
    }

    /// The current session of `user`.
    pub(super) fn lookup(&self, user: &UserName) -> Option<Arc<ConnHandle>> {
        self.online.get(user).cloned()
    }

    /// `watcher` declares `user` from now on. Returns whether `user` is online and
    /// declared `watcher`'s user too, and if so `user`'s session, to be told that
    /// `watcher`'s user is online.
    pub(super) fn watch(
        &mut self,
        watcher: &Arc<ConnHandle>,
        user: &UserName,
    ) -> Option<Arc<ConnHandle>> {
        self.watchers
            .entry(user.clone())
            .or_default()
            .insert(watcher.id, watcher.clone());
        self.declaring(user, &watcher.user)
    }

    /// `watcher` no longer declares `user`. Returns `user`'s session if it saw
    /// `watcher`'s user until now, to be told it went away.
    pub(super) fn unwatch(
        &mut self,
        watcher: &ConnHandle,
        user: &UserName,
    ) -> Option<Arc<ConnHandle>> {
        let mutual = self.declaring(user, &watcher.user).filter(|_| {
            self.online
                .get(&watcher.user)
                .is_some_and(|current| current.id == watcher.id)
        });
        self.unwatch_id(watcher.id, user);
        mutual
    }

    fn unwatch_id(&mut self, watcher_id: u64, user: &UserName) {
        if let Some(set) = self.watchers.get_mut(user) {
            set.remove(&watcher_id);
            if set.is_empty() {
                self.watchers.remove(user);
            }
        }
    }

    /// `user`'s current session, if it is online and declares `other`.
    fn declaring(&self, user: &UserName, other: &UserName) -> Option<Arc<ConnHandle>> {
        let session = self.online.get(user)?;
        self.watchers
            .get(other)?
            .contains_key(&session.id)
            .then(|| session.clone())
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
    fn presence_is_shown_only_between_users_who_declared_each_other() {
        let mut router = Router::default();
        let alice = UserName::new("alice").unwrap();
        let bob = UserName::new("bob").unwrap();
        let (a, _ra) = handle(1, "alice");
        let (b, _rb) = handle(2, "bob");
        assert!(router.connect(a.clone()).is_none());
        assert!(router.connect(b.clone()).is_none());
        // bob declares alice: alice has not declared bob, so bob sees nothing.
        assert!(router.watch(&b, &alice).is_none());
        // alice declares bob back: bob is shown to alice, and alice to bob.
        assert_eq!(router.watch(&a, &bob).map(|h| h.id), Some(2));
        // alice leaves: bob (who saw her) is told; alice's watch is gone.
        let told = router.disconnect(&a, &HashSet::from([bob.clone()]));
        assert_eq!(told.iter().map(|h| h.id).collect::<Vec<_>>(), vec![2]);
        assert!(router.lookup(&alice).is_none());
        // A replaced session leaving tells nobody and keeps the newer one.
        let (a2, _r2) = handle(3, "alice");
        let (a3, _r3) = handle(4, "alice");
        router.connect(a2.clone());
        router.watch(&a2, &bob);
        assert_eq!(router.connect(a3.clone()).map(|h| h.id), Some(3));
        assert!(
            router
                .disconnect(&a2, &HashSet::from([bob.clone()]))
                .is_empty()
        );
        assert_eq!(router.lookup(&alice).unwrap().id, 4);
        // Unwatching a mutual declaration tells the other side.
        router.watch(&a3, &bob);
        assert_eq!(router.unwatch(&b, &alice).map(|h| h.id), Some(4));
        assert!(router.unwatch(&a3, &bob).is_none());
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
