//! The offload worker: its own thread, fed by a command channel, answering with one completion
//! per (layer, block). It copies blocks from the host tier into fast-tier slot buffers (moved to
//! it with the command and back with the completion) and writes blocks to the spill file, which
//! it owns. The forward waits for a layer's completions just before that layer's attention.
//!
//! The host rows travel as `Arc<LayerKv>`: the worker drops its reference before it answers, and
//! the forward waits for a layer's answers before it appends to that layer, so the append finds
//! the cache unshared (`Arc::make_mut` would copy it otherwise: correct, only slower).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::cache::LayerKv;
use super::fast::SlotBuf;
use super::spill::{SpillFile, SpillRefusal};

/// A command for the worker.
pub enum Job {
    /// Copy `rows` of layer `layer`'s host cache (block `block`) into `buf`; read the spill
    /// file's copy instead when the block is there (the RAM copy if its CRC fails).
    Fetch {
        layer: usize,
        block: u32,
        slot: u32,
        src: Arc<LayerKv>,
        rows: Range<usize>,
        buf: SlotBuf,
    },
    /// Write `rows` of layer `layer`'s host cache (block `block`) to the spill file.
    Spill {
        layer: usize,
        block: u32,
        src: Arc<LayerKv>,
        rows: Range<usize>,
    },
    /// Test hook: flip a byte of every spilled block.
    CorruptSpill,
    /// Test hook: stop the thread, dropping every queued command.
    Die,
}

/// A completion.
pub enum Done {
    Fetched {
        layer: usize,
        block: u32,
        slot: u32,
        buf: SlotBuf,
        /// The spill copy was read and failed its CRC: the RAM copy was used.
        corrupt: bool,
        from_spill: bool,
    },
    Spilled {
        layer: usize,
        block: u32,
        refused: Option<SpillRefusal>,
    },
}

/// How the spill file came up.
pub enum SpillStart {
    Off,
    On { dir: PathBuf, cap: usize },
}

/// The worker thread has ended (died or was stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerGone;

pub struct Worker {
    tx: Sender<Job>,
    rx: Receiver<Done>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start the thread; with a spill file when asked and possible. The error string says why
    /// the spill file could not be created (the worker then runs without it).
    pub fn spawn(spill: SpillStart) -> (Self, Option<String>) {
        let (file, note) = match spill {
            SpillStart::Off => (None, None),
            SpillStart::On { dir, cap } => match SpillFile::create(&dir, cap) {
                Ok(f) => (Some(f), None),
                Err(e) => (
                    None,
                    Some(format!(
                        "spill file in {} not created ({e}): host tier stays in RAM",
                        dir.display()
                    )),
                ),
            },
        };
        let (tx, jobs) = channel::<Job>();
        let (done, rx) = channel::<Done>();
        let handle = std::thread::Builder::new()
            .name("kv-offload".into())
            .spawn(move || run(jobs, done, file))
            .expect("spawn the kv offload thread");
        (
            Self {
                tx,
                rx,
                handle: Some(handle),
            },
            note,
        )
    }

    /// Queue a command; gives it back if the thread is gone.
    pub fn send(&self, job: Job) -> Result<(), Job> {
        self.tx.send(job).map_err(|e| e.0)
    }

    /// A completion if one is ready.
    pub fn try_recv(&self) -> Option<Result<Done, WorkerGone>> {
        match self.rx.try_recv() {
            Ok(d) => Some(Ok(d)),
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(Err(WorkerGone)),
        }
    }

    /// The next completion; Err when the thread is gone.
    pub fn recv(&self) -> Result<Done, WorkerGone> {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(d) => return Ok(d),
                Err(RecvTimeoutError::Disconnected) => return Err(WorkerGone),
                Err(RecvTimeoutError::Timeout) => {
                    if self.handle.as_ref().is_none_or(|h| h.is_finished()) {
                        // the thread ended; answers it sent before are still queued
                        return self.rx.try_recv().map_err(|_| WorkerGone);
                    }
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.tx.send(Job::Die);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Copy `rows` of `src` into `buf` (the synchronous path uses it too).
pub fn copy_rows(src: &LayerKv, rows: Range<usize>, buf: &mut SlotBuf) {
    let kv_dim = if src.is_empty() {
        0
    } else {
        src.k.len() / src.len()
    };
    let span = rows.start * kv_dim..rows.end * kv_dim;
    let n = span.len();
    buf.k[..n].copy_from_slice(&src.k[span.clone()]);
    buf.v[..n].copy_from_slice(&src.v[span]);
    buf.rows = rows.len();
}

fn run(jobs: Receiver<Job>, done: Sender<Done>, mut spill: Option<SpillFile>) {
    for job in jobs {
        let answer = match job {
            Job::Fetch {
                layer,
                block,
                slot,
                src,
                rows,
                mut buf,
            } => {
                let (mut from_spill, mut corrupt) = (false, false);
                if let Some(f) = spill.as_ref().filter(|f| f.contains(layer, block)) {
                    let kv_dim = src.k.len() / src.len().max(1);
                    let n = rows.len() * kv_dim;
                    let (k, v) = (&mut buf.k[..n], &mut buf.v[..n]);
                    if f.read(layer, block, k, v) {
                        buf.rows = rows.len();
                        from_spill = true;
                    } else {
                        corrupt = true;
                    }
                }
                if !from_spill {
                    copy_rows(&src, rows, &mut buf);
                }
                drop(src); // before answering: the forward may append to this layer next
                Done::Fetched {
                    layer,
                    block,
                    slot,
                    buf,
                    corrupt,
                    from_spill,
                }
            }
            Job::Spill {
                layer,
                block,
                src,
                rows,
            } => {
                let kv_dim = src.k.len() / src.len().max(1);
                let span = rows.start * kv_dim..rows.end * kv_dim;
                let refused = match spill.as_mut() {
                    Some(f) => f
                        .write(layer, block, &src.k[span.clone()], &src.v[span])
                        .err(),
                    None => Some(SpillRefusal::CapReached),
                };
                drop(src);
                Done::Spilled {
                    layer,
                    block,
                    refused,
                }
            }
            Job::CorruptSpill => {
                if let Some(f) = spill.as_mut() {
                    f.corrupt_every_block();
                }
                continue;
            }
            Job::Die => return,
        };
        if done.send(answer).is_err() {
            return;
        }
    }
}
