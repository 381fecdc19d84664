//! Content hashing: every regular file is cut into fixed-size blocks and each block
//! is hashed with BLAKE3. Hashing runs on a background thread fed after a file is
//! closed, never on the FUSE hot path. [`cache`] holds members' blocks.

pub mod cache;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

use crate::ids::{BlockHash, Ino};

/// Size of one block: the unit of hashing, transfer and caching.
pub const BLOCK_SIZE: u64 = 256 * 1024;

/// Files of at least this many blocks are hashed by several threads at once.
const PARALLEL_MIN_BLOCKS: u64 = 16;
/// Most threads hashing one file.
const PARALLEL_MAX_THREADS: usize = 4;

/// Hashes of every block of `file` (its current length), in order. A large file
/// is cut into as many runs of blocks as there are CPUs (up to four), hashed side
/// by side: a one-byte change to a 1 GiB file rehashes all of it, and that time
/// is part of how soon members see the change.
pub fn hash_file(file: &File) -> std::io::Result<Vec<(BlockHash, u32)>> {
    let len = file.metadata()?.len();
    let blocks = len.div_ceil(BLOCK_SIZE);
    let threads = if blocks >= PARALLEL_MIN_BLOCKS {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(PARALLEL_MAX_THREADS)
    } else {
        1
    };
    if threads <= 1 {
        return hash_blocks(file, len, 0..blocks);
    }
    let per = blocks.div_ceil(threads as u64);
    std::thread::scope(|s| {
        // Threads made here share the caller's (background) priority.
        let runs: Vec<_> = (0..threads as u64)
            .map(|t| {
                let run = t * per..((t + 1) * per).min(blocks);
                s.spawn(move || hash_blocks(file, len, run))
            })
            .collect();
        let mut out = Vec::with_capacity(blocks as usize);
        for run in runs {
            let hashed = run
                .join()
                .map_err(|_| std::io::Error::other("a hashing thread panicked"))?;
            out.extend(hashed?);
        }
        Ok(out)
    })
}

/// Hashes blocks `run` of `file`, whose length was `len`.
fn hash_blocks(
    file: &File,
    len: u64,
    run: std::ops::Range<u64>,
) -> std::io::Result<Vec<(BlockHash, u32)>> {
    let mut out = Vec::with_capacity((run.end - run.start) as usize);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut off = run.start * BLOCK_SIZE;
    let end = (run.end * BLOCK_SIZE).min(len);
    while off < end {
        let want = (len - off).min(BLOCK_SIZE) as usize;
        let mut got = 0;
        while got < want {
            let n = file.read_at(&mut buf[got..want], off + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        out.push((hash_block(&buf[..got]), got as u32));
        off += want as u64;
    }
    Ok(out)
}

/// BLAKE3 of one block.
pub fn hash_block(data: &[u8]) -> BlockHash {
    BlockHash(*blake3::hash(data).as_bytes())
}

/// Called with each finished hash: the file, the content sequence it was asked
/// for, and its blocks.
pub type OnHashed = Box<dyn Fn(Ino, u64, Vec<(BlockHash, u32)>) + Send + Sync>;

/// Opens a file's bytes for hashing, by inode.
pub type OpenFile = Box<dyn Fn(Ino) -> std::io::Result<File> + Send + Sync>;

/// A background worker that (re)hashes files after they change. Requests for the
/// same file coalesce while they wait; the newest content sequence wins.
#[derive(Clone)]
pub struct Hasher {
    inner: Arc<HasherInner>,
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher")
    }
}

/// Files waiting to be hashed, in order, with their sequences.
#[derive(Default)]
struct Queue {
    order: std::collections::VecDeque<Ino>,
    jobs: std::collections::HashMap<Ino, u64>,
    stop: bool,
}

struct HasherInner {
    /// The queue. The worker sleeps on `wake` while it is empty.
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The worker thread, joined by [`Hasher::stop`] once it has drained the queue.
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Hasher {
    /// Starts the worker thread, which reads files through `open`; each result
    /// goes to `on_hashed`.
    pub fn start(open: OpenFile, on_hashed: OnHashed) -> Self {
        let inner = Arc::new(HasherInner {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            worker: Mutex::new(None),
        });
        let worker = inner.clone();
        // The hashing thread: lives until `stop`; owns no state but the queue.
        let spawned = std::thread::Builder::new()
            .name("hasher".into())
            .spawn(move || {
                background_priority();
                run(&worker, &open, &on_hashed)
            });
        match spawned {
            Ok(handle) => *inner.worker.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle),
            Err(e) => tracing::error!(cause = ?e, "cannot start the block hasher"),
        }
        Self { inner }
    }

    /// Asks for `ino`'s blocks to be hashed, for content sequence `seq`.
    pub fn enqueue(&self, ino: Ino, seq: u64) {
        let Ok(mut q) = self.inner.queue.lock() else {
            return;
        };
        if q.jobs.insert(ino, seq).is_none() {
            q.order.push_back(ino);
            // Only an idle worker needs waking; a busy one drains the queue.
            if q.order.len() == 1 {
                self.inner.wake.notify_one();
            }
        }
    }

    /// Stops the worker once it has hashed every file already queued, and
    /// returns when it has: every result has been handed to `on_hashed` by then,
    /// so whatever records them can be closed after this.
    pub fn stop(&self) {
        {
            let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.stop = true;
            self.inner.wake.notify_all();
        }
        let worker = self
            .inner
            .worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(worker) = worker {
            let _ = worker.join();
        }
    }
}

/// Lowers the calling thread's CPU and I/O priority: background work must not
/// slow down the programs using the filesystem.
pub fn background_priority() {
    // SAFETY: setpriority and ioprio_set on the calling thread (tid 0 = self);
    // failure only leaves the default priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        // IOPRIO_CLASS_BE (2) at the lowest level (7), for this thread (WHO_PROCESS = 1).
        libc::syscall(libc::SYS_ioprio_set, 1, 0, (2 << 13) | 7);
    }
}

/// How long the hasher lets requests gather after waking, so that a burst of
/// closed files costs one wake-up rather than one per file.
const DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(20);

fn run(inner: &HasherInner, open: &OpenFile, on_hashed: &OnHashed) {
    loop {
        // Sleep until there is work (or we are told to stop with nothing left).
        {
            let Ok(mut q) = inner.queue.lock() else {
                return;
            };
            while q.order.is_empty() {
                if q.stop {
                    return;
                }
                q = match inner.wake.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        }
        // Let a burst gather, then hash everything queued.
        std::thread::sleep(DEBOUNCE);
        loop {
            let job = match inner.queue.lock() {
                Ok(mut q) => {
                    let ino = q.order.pop_front();
                    ino.and_then(|ino| q.jobs.remove(&ino).map(|seq| (ino, seq)))
                }
                Err(_) => return,
            };
            let Some((ino, seq)) = job else {
                break;
            };
            match open(ino).and_then(|f| hash_file(&f)) {
                Ok(blocks) => on_hashed(ino, seq, blocks),
                // The file was removed meanwhile: nothing to index.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(%ino, cause = ?e, "hashing failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn blocks_cover_the_file_exactly() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(BLOCK_SIZE * 2 + 5)).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let blocks = hash_file(&f).unwrap();
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[2].1, 5);
        assert_eq!(
            blocks[1].0,
            hash_block(&data[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize])
        );
        assert_ne!(blocks[0].0, blocks[1].0);
    }

    #[test]
    fn large_files_hashed_in_parallel_runs_give_every_block_in_order() {
        let mut f = tempfile::tempfile().unwrap();
        // 37 blocks and a short one: runs of uneven length, one ending short.
        let len = BLOCK_SIZE * 37 + 1000;
        let data: Vec<u8> = (0..len).map(|i| ((i / 7) % 253) as u8).collect();
        f.write_all(&data).unwrap();
        let blocks = hash_file(&f).unwrap();
        let want: Vec<(BlockHash, u32)> = data
            .chunks(BLOCK_SIZE as usize)
            .map(|c| (hash_block(c), c.len() as u32))
            .collect();
        assert_eq!(blocks, want);
    }
}
