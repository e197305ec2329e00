//! Point-in-time reading of a sled store while it is written: the
//! copy-on-write behind backups and online verification.
//!
//! sled has no snapshots. A capture makes one: a [`Reader`] walks the trees
//! in key order, a chunk at a time, and every write first keeps the value
//! it is about to replace of each key the reader has not reached, so the
//! reader finds every key as it was when the capture began. Writers and the
//! reader take turns on one lock: a write waits at most for one chunk, and
//! never fails because of a capture. A capture whose kept values outgrow
//! its bound is abandoned, and the reader told why.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use sled::IVec;

use super::StoreError;

use super::layout::TREES;

/// Keys a reader copies per turn on the lock.
const CHUNK: usize = 256;
/// What a kept value costs beyond its key and bytes (map node, handles).
const ENTRY_OVERHEAD: usize = 64;

/// The capture under way, if any, shared by a store's handles.
pub(super) type Shared = Arc<Mutex<Option<Capture>>>;

pub(super) fn lock(shared: &Shared) -> MutexGuard<'_, Option<Capture>> {
    // The state is a cursor and a map, sound whatever panicked holding it.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a reader stands and what the writes since it began replaced.
#[derive(Debug)]
pub(super) struct Capture {
    /// The tree the reader is in; every tree before it is copied.
    tree: usize,
    /// The last key copied in `tree` (none: not started on it).
    copied_through: Option<IVec>,
    /// The value when the capture began (`None`: there was none) of each
    /// key written since that the reader has not reached.
    kept: [BTreeMap<IVec, Option<IVec>>; TREES],
    kept_bytes: usize,
    limit_bytes: usize,
    abandoned: Option<String>,
}

impl Capture {
    fn new(limit_bytes: usize) -> Self {
        Self { tree: 0, copied_through: None, kept: Default::default(), kept_bytes: 0, limit_bytes, abandoned: None }
    }

    fn copied(&self, tree: usize, key: &[u8]) -> bool {
        tree < self.tree || (tree == self.tree && self.copied_through.as_deref().is_some_and(|last| key <= last))
    }

    /// Called by every write, holding the lock, before it changes `key` in
    /// `tree` (index `index`): keeps the value the reader must still see.
    pub(super) fn before_write(&mut self, index: usize, tree: &sled::Tree, key: &[u8]) {
        if self.abandoned.is_some() || self.copied(index, key) || self.kept[index].contains_key(key) {
            return;
        }
        match tree.get(key) {
            Ok(old) => {
                self.kept_bytes += key.len() + old.as_ref().map_or(0, |v| v.len()) + ENTRY_OVERHEAD;
                if self.kept_bytes > self.limit_bytes {
                    self.abandon(format!(
                        "the store changed faster than it could be read: what the writes replaced meanwhile \
                         passed {} MiB",
                        self.limit_bytes >> 20
                    ));
                } else {
                    self.kept[index].insert(IVec::from(key), old);
                }
            }
            Err(e) => self.abandon(format!("keeping a value for it failed: {e}")),
        }
    }

    fn abandon(&mut self, why: String) {
        self.abandoned = Some(why);
        self.kept = Default::default();
        self.kept_bytes = 0;
    }
}

/// A batch for one tree that keeps, for a capture under way, what it
/// replaces.
pub(super) struct Changes<'a> {
    batch: sled::Batch,
    tree: &'a sled::Tree,
    index: usize,
    capture: &'a mut Option<Capture>,
}

impl<'a> Changes<'a> {
    pub(super) fn new(tree: &'a sled::Tree, index: usize, capture: &'a mut Option<Capture>) -> Self {
        Self { batch: sled::Batch::default(), tree, index, capture }
    }

    pub(super) fn into_batch(self) -> sled::Batch {
        self.batch
    }
}

impl super::layout::Changes for Changes<'_> {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        if let Some(capture) = self.capture.as_mut() {
            capture.before_write(self.index, self.tree, &key);
        }
        self.batch.insert(key, value);
    }

    fn remove(&mut self, key: Vec<u8>) {
        if let Some(capture) = self.capture.as_mut() {
            capture.before_write(self.index, self.tree, &key);
        }
        self.batch.remove(key);
    }
}

/// One key as it was when the capture began, with the tree it is in.
pub(super) type Entry = (usize, IVec, IVec);

/// Reads the trees as they were when it began; ends the capture when
/// dropped.
pub(super) struct Reader {
    shared: Shared,
    trees: [sled::Tree; TREES],
}

impl Reader {
    /// Begins a capture, then, holding the lock (no write between), calls
    /// `at_start` to read what the reading covers.
    pub(super) fn begin<T>(
        shared: &Shared,
        trees: [sled::Tree; TREES],
        limit_bytes: usize,
        at_start: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<(Self, T), StoreError> {
        let mut guard = lock(shared);
        if guard.is_some() {
            return Err(StoreError::Conflict(
                "another backup or verification is reading the store; retry when it ends".into(),
            ));
        }
        let start = at_start()?;
        *guard = Some(Capture::new(limit_bytes));
        drop(guard);
        Ok((Self { shared: shared.clone(), trees }, start))
    }

    /// The next keys in order, as they were when the capture began (maybe
    /// none in a turn); `None` once every tree is read.
    pub(super) fn next_chunk(&mut self) -> Result<Option<Vec<Entry>>, StoreError> {
        let mut guard = lock(&self.shared);
        let capture = guard.as_mut().ok_or_else(|| StoreError::Conflict("the capture ended".into()))?;
        if let Some(why) = &capture.abandoned {
            return Err(StoreError::Conflict(why.clone()));
        }
        let index = capture.tree;
        let Some(tree) = self.trees.get(index) else { return Ok(None) };
        let lower = capture.copied_through.clone().map_or(Bound::Unbounded, Bound::Excluded);
        let mut now: Vec<(IVec, IVec)> = Vec::with_capacity(CHUNK);
        for item in tree.range::<IVec, _>((lower, Bound::Unbounded)).take(CHUNK) {
            now.push(item.map_err(|e| StoreError::Engine(e.to_string()))?);
        }
        // Every key kept is past what was copied; those up to the last key
        // read now belong to this chunk (all of them once the tree ends).
        let kept = &mut capture.kept[index];
        let last = if now.len() == CHUNK { now.last().map(|(k, _)| k.clone()) } else { None };
        let mine = match &last {
            Some(last) => {
                let mut later = kept.split_off(last);
                if let Some(value) = later.remove(last) {
                    kept.insert(last.clone(), value);
                }
                std::mem::replace(kept, later)
            }
            None => std::mem::take(kept),
        };
        for (k, v) in &mine {
            capture.kept_bytes =
                capture.kept_bytes.saturating_sub(k.len() + v.as_ref().map_or(0, |v| v.len()) + ENTRY_OVERHEAD);
        }
        let mut chunk: BTreeMap<IVec, IVec> = now.into_iter().filter(|(k, _)| !mine.contains_key(k)).collect();
        chunk.extend(mine.into_iter().filter_map(|(k, v)| Some((k, v?))));
        match last {
            Some(last) => capture.copied_through = Some(last),
            None => {
                capture.tree += 1;
                capture.copied_through = None;
            }
        }
        Ok(Some(chunk.into_iter().map(|(k, v)| (index, k, v)).collect()))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        *lock(&self.shared) = None;
    }
}
