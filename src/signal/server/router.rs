//! Who is online and who watches whom: the maps every session consults to relay a
//! message or announce presence, and the handle through which one session hands a
//! message to another.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::ids::UserName;
use crate::signal::protocol::CloseReason;

/// A message queued for a session, with the share of its byte budget it holds until
/// it is written.
pub(super) struct Outgoing {
    pub(super) text: Utf8Bytes,
    pub(super) _budget: OwnedSemaphorePermit,
}

/// Why a message could not be handed to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Undelivered {
    /// The session has ended.
    Gone,
    /// Its queue is full: it was told to close as lagging.
    Lagging,
}

/// How other sessions reach one session.
pub(super) struct ConnHandle {
    pub(super) id: u64,
    pub(super) user: UserName,
    /// Messages for this session, written by its task. Bounded in count here and in
    /// bytes by `budget`: a session that does not keep up is dropped, never buffered.
    tx: mpsc::Sender<Outgoing>,
    /// Bytes this session may have queued.
    budget: Arc<Semaphore>,
    /// Tells the session's task to close (replaced, lagging).
    kick: watch::Sender<Option<CloseReason>>,
}

impl ConnHandle {
    pub(super) fn new(
        id: u64,
        user: UserName,
        tx: mpsc::Sender<Outgoing>,
        budget_bytes: usize,
        kick: watch::Sender<Option<CloseReason>>,
    ) -> Self {
        Self {
            id,
            user,
            tx,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            kick,
        }
    }

    /// Queues `text` for this session without waiting.
    pub(super) fn deliver(&self, text: Utf8Bytes) -> Result<(), Undelivered> {
        if self.tx.is_closed() {
            return Err(Undelivered::Gone);
        }
        let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
        let Ok(budget) = self.budget.clone().try_acquire_many_owned(len) else {
            self.kick(CloseReason::Lagging);
            return Err(Undelivered::Lagging);
        };
        match self.tx.try_send(Outgoing {
            text,
            _budget: budget,
        }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Undelivered::Gone),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kick(CloseReason::Lagging);
                Err(Undelivered::Lagging)
            }
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
        let (tx, rx) = mpsc::channel(2);
        let (kick, _) = watch::channel(None);
        (
            Arc::new(ConnHandle::new(
                id,
                UserName::new(user).unwrap(),
                tx,
                100,
                kick,
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
    fn a_full_queue_is_lagging_and_a_closed_one_gone() {
        let (h, rx) = handle(1, "bob");
        assert_eq!(h.deliver("x".into()), Ok(()));
        assert_eq!(h.deliver("y".into()), Ok(()));
        assert_eq!(h.deliver("z".into()), Err(Undelivered::Lagging));
        assert_eq!(*h.kick.borrow(), Some(CloseReason::Lagging));
        drop(rx);
        assert_eq!(h.deliver("w".into()), Err(Undelivered::Gone));
        let (h, _rx) = handle(2, "carol");
        assert_eq!(
            h.deliver("x".repeat(101).into()),
            Err(Undelivered::Lagging),
            "byte budget"
        );
    }
}
