//! The two-tier KV manager: ties the block tables (`table`), the fast-tier slots (`fast`), the
//! offload worker (`worker`) and the optional spill file (`spill`) to the forward.
//!
//! What lives where (sliminfer.md §2; the host tier is a complete backing copy, the fast tier a
//! cache of what decode attends to):
//! - Layers that attend to every row (the preserve layers, or every layer of a dense run) have
//!   one copy, counted in the fast tier: the host cache itself.
//! - Slim layers keep every row in the host tier (the layer's `LayerKv`, RAM). Their fast tier
//!   holds the active blocks in slots plus the rows past the prompt (generated tokens), which are
//!   written to both. Decode attention reads the fast tier; prefill reads the host cache (its
//!   attention needs the whole pool: the transient a GPU would stage, reported apart).
//!
//! When data moves: after a slim layer's forward its active blocks are copied into slots by the
//! worker (overlapping the next layers); at a stage boundary, once the policy has gated the
//! stage's set, dropped blocks are evicted (their slot freed; the host copy stays) and new ones
//! are prefetched for every layer of the stage at once, overlapping the QKV/MLP work of the
//! layers in between. Each layer waits for its own copies just before it appends and attends
//! (the wait is the stall). A slim layer that chooses its own blocks (`decode_select = "layer"`,
//! the default) does so just before it attends, so no copy can overlap anything: its new blocks
//! take their slots at once, that one attention reads their rows from the host tier (counted as
//! `kv_host_reads`), and the step's copies of every layer run together at its end, on the
//! compute pool (counted as stall). Copying each layer's blocks before its attention, on the
//! engine thread, cost decode 4-11% against the resident run; this costs 1-5% (bench/NOTES.md).
//! If the worker dies, copies run on the engine thread and the metrics say so.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use super::cache::LayerKv;
use super::config::{Budget, KvConfig};
use super::fast::{FastLayer, SlotBuf};
use super::policy::{ActiveBlocks, LayerPolicy};
use super::stats::KvStats;
use super::table::{BlockTable, Residency, TableError};
use super::worker::{copy_rows, Done, Job, SpillStart, Worker, WorkerGone};
use crate::backend::decode_attention::KeyRun;
use crate::{Error, Result};

/// What one layer will hold in the fast tier during a request.
#[derive(Debug, Clone, Copy)]
pub struct LayerPlan {
    /// A slim layer (active blocks in slots) or a layer whose whole cache is fast.
    pub managed: bool,
    /// Slots (active blocks) for a slim layer.
    pub slots: usize,
    /// Rows stored outside slots: every row of an unmanaged layer, the rows past the prompt of a
    /// slim layer.
    pub rows: usize,
}

/// Who copies a block into its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copier {
    /// The offload worker, overlapping the forward (the layer waits just before it attends).
    Worker,
    /// The engine thread at the end of the step (`end_step`); the attention that needs the block
    /// is next and reads it from the host tier meanwhile.
    EndOfStep,
}

/// One layer's fast-tier state.
#[derive(Debug, Default)]
struct Layer {
    /// A slim layer: active blocks in slots, rows past the prompt in the tail.
    managed: bool,
    table: BlockTable,
    fast: FastLayer,
    /// Worker commands of this layer not yet answered.
    pending: usize,
    /// Blocks sent to the spill file (or refused).
    spill_sent: BTreeSet<u32>,
}

/// A block chosen by a layer just before it attended: its slot is taken (in flight) and the
/// attention read its rows from the host tier; the copy runs at the end of the step.
#[derive(Debug)]
struct Deferred {
    layer: usize,
    block: u32,
    slot: u32,
    rows: Range<usize>,
    buf: SlotBuf,
}

/// Counters since the last `take_stats`.
#[derive(Debug, Default)]
struct Counters {
    peak: usize,
    staging: usize,
    moved: usize,
    copied: usize,
    step_moved: usize,
    step_copied: usize,
    moved_per_step: Vec<usize>,
    copied_per_step: Vec<usize>,
    stall_s: f64,
    decode_stall_s: f64,
    misses: usize,
    /// Blocks a decode attention read from the host tier while their copy waited for the end
    /// of the step.
    host_reads: usize,
    spill_reads: usize,
    corrupt: usize,
}

pub struct KvManager {
    cfg: KvConfig,
    budget: Option<usize>,
    kv_dim: usize,
    block_size: usize,
    layers: Vec<Layer>,
    worker: Option<Worker>,
    spill_on: bool,
    spilled_blocks: usize,
    spill_bytes: usize,
    in_decode_step: bool,
    /// A "fast tier full" note was made this request.
    full_noted: bool,
    /// Positions below this are prompt blocks (from the policy).
    prompt_len: usize,
    counters: Counters,
    notes: Vec<String>,
    /// Copies of blocks chosen at attention this step, run together by `end_step`.
    deferred: Vec<Deferred>,
}

impl std::fmt::Debug for KvManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvManager")
            .field("budget", &self.budget)
            .field("worker_alive", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

/// Rows of `host` that hold prompt block `block`.
fn block_rows(host: &LayerKv, block: u32, bs: usize, prompt_len: usize) -> Range<usize> {
    let lo = block as usize * bs;
    let hi = ((block as usize + 1) * bs).min(prompt_len);
    let row = |pos: usize| host.positions.partition_point(|&p| (p as usize) < pos);
    row(lo)..row(hi)
}

impl KvManager {
    /// A manager for `n_layers` layers of `kv_dim`-wide rows, with its worker thread started.
    pub fn new(cfg: &KvConfig, n_layers: usize, kv_dim: usize) -> Result<Self> {
        cfg.validate().map_err(Error::Config)?;
        let spill = if cfg.spill {
            SpillStart::On {
                dir: cfg.spill_path(),
                cap: cfg.cap().map_err(Error::Config)?,
            }
        } else {
            SpillStart::Off
        };
        let (worker, note) = Worker::spawn(spill);
        Ok(Self {
            cfg: cfg.clone(),
            budget: None,
            kv_dim,
            block_size: 64,
            layers: (0..n_layers).map(|_| Layer::default()).collect(),
            worker: Some(worker),
            spill_on: cfg.spill && note.is_none(),
            spilled_blocks: 0,
            spill_bytes: 0,
            in_decode_step: false,
            full_noted: false,
            prompt_len: 0,
            counters: Counters::default(),
            notes: note.into_iter().collect(),
            deferred: Vec::new(),
        })
    }

    fn row_bytes(&self) -> usize {
        2 * self.kv_dim * 2
    }

    fn slot_bytes(&self) -> usize {
        self.block_size * self.row_bytes()
    }

    /// Check that a request's plan fits the budget and size every slim layer's slots; before
    /// the prefill, so that a budget too small is an error at the start, not mid-answer.
    pub fn plan(&mut self, block_size: usize, plan: &[LayerPlan]) -> Result<usize> {
        self.block_size = block_size;
        let (slot_bytes, row_bytes) = (self.slot_bytes(), self.row_bytes());
        let mut need = 0;
        let (mut whole, mut slots_bytes, mut tail) = (0, 0, 0);
        for (l, p) in self.layers.iter().zip(plan) {
            if p.managed {
                let slots = p.slots.max(l.table.in_use());
                slots_bytes += slots * slot_bytes;
                tail += p.rows * row_bytes;
            } else {
                whole += p.rows * row_bytes;
            }
        }
        need += whole + slots_bytes + tail;
        let budget = match self.cfg.budget().map_err(Error::Config)? {
            Budget::Auto => need,
            Budget::Bytes(b) => b,
            Budget::Tokens(t) => t * self.layers.len() * row_bytes,
        };
        if need > budget {
            return Err(Error::Config(format!(
                "[kv] fast_budget of {} is too small for this request: it needs {} (layers attending to every row {}, the slim layers' active blocks {}, rows past the prompt {}); raise [kv] fast_budget or lower [slim] decode_keep",
                mib(budget),
                mib(need),
                mib(whole),
                mib(slots_bytes),
                mib(tail)
            )));
        }
        for (l, p) in self.layers.iter_mut().zip(plan) {
            l.managed = p.managed;
            let slots = if p.managed { p.slots } else { 0 };
            let cap = slots.max(l.table.in_use());
            l.table
                .set_capacity(cap)
                .expect("capacity at least the slots in use");
        }
        self.budget = Some(budget);
        Ok(need)
    }

    /// Just before layer `layer` appends and attends: wait for its copies (the stall).
    pub fn before_layer(&mut self, layer: usize, hosts: &[Arc<LayerKv>]) {
        self.drain_ready(hosts);
        if self.layers[layer].pending > 0 {
            let t = Instant::now();
            self.wait_layer(layer, hosts);
            let s = t.elapsed().as_secs_f64();
            self.counters.stall_s += s;
            if self.in_decode_step {
                self.counters.decode_stall_s += s;
            }
        }
    }

    /// After layer `layer` appended rows at `positions` to its host cache: note the prompt
    /// blocks the host tier now holds, and copy rows past the prompt into the fast tier.
    pub fn after_append(
        &mut self,
        layer: usize,
        host: &LayerKv,
        positions: &[u32],
        active: Option<&ActiveBlocks>,
    ) {
        let Some(a) = active else {
            return;
        };
        self.prompt_len = a.prompt_len;
        let l = &mut self.layers[layer];
        l.managed = true;
        let bs = a.block_size as u32;
        let mut last = None;
        for &p in positions.iter().filter(|&&p| (p as usize) < a.prompt_len) {
            if last != Some(p / bs) {
                l.table.mark_host(p / bs);
                last = Some(p / bs);
            }
        }
        let tail = positions
            .iter()
            .filter(|&&p| p as usize >= a.prompt_len)
            .count();
        if tail > 0 {
            // rows past the prompt sort last in the host cache
            let (n, d) = (host.len(), self.kv_dim);
            let rows = (n - tail) * d..n * d;
            l.fast.append_tail(
                &host.k[rows.clone()],
                &host.v[rows],
                &host.positions[n - tail..],
            );
        }
    }

    /// The keys of a decode attention at slim layer `layer`, from the fast tier: the active
    /// blocks' slots in position order, then the rows past the prompt. None when the layer is
    /// not a slim layer or a block is missing (then the host tier is read; counted).
    pub fn runs<'a>(
        &'a self,
        layer: usize,
        active: Option<&ActiveBlocks>,
        host: &'a LayerKv,
    ) -> Option<Vec<KeyRun<'a>>> {
        let a = active?;
        let d = self.kv_dim;
        let l = &self.layers[layer];
        if !l.managed {
            return None;
        }
        let mut runs = Vec::with_capacity(a.blocks.len() + 1);
        for &b in a.blocks {
            let run = match l.table.state(b) {
                Residency::Fast(slot) => l.fast.slot_run(slot, d),
                Residency::InFlight(_) if self.is_deferred(layer, b) => {
                    let rows = block_rows(host, b, a.block_size, a.prompt_len);
                    Some(KeyRun {
                        k: &host.k[rows.start * d..rows.end * d],
                        v: &host.v[rows.start * d..rows.end * d],
                    })
                }
                _ => None,
            };
            match run {
                Some(r) => runs.push(r),
                None => return None,
            }
        }
        runs.push(l.fast.tail_run());
        Some(runs)
    }

    fn is_deferred(&self, layer: usize, block: u32) -> bool {
        (self.deferred.iter()).any(|c| c.layer == layer && c.block == block)
    }

    /// In decode, a set that covers one layer was chosen by that layer just before it attends
    /// (`decode_select = "layer"`): `before_attention` brings it in, and nothing else has to.
    fn chosen_at_attention(&self, layer: usize, a: &ActiveBlocks) -> bool {
        self.in_decode_step && a.stage_layers == (layer..layer + 1)
    }

    /// Layer `layer`'s policy chose its decode keys from its own queries just now: evict what
    /// left the set and give the new blocks their slots, their copies deferred to `end_step`
    /// (this attention reads them from the host tier). A no-op when the set did not change.
    pub fn before_attention(
        &mut self,
        layer: usize,
        hosts: &[Arc<LayerKv>],
        policy: &dyn LayerPolicy,
    ) -> Result<()> {
        // a prefill's attention reads the host tier; its slots are filled after the layer
        if !self.in_decode_step || !self.layers[layer].managed {
            return Ok(());
        }
        let Some(a) = policy.active_blocks(layer) else {
            return Ok(());
        };
        if !self.chosen_at_attention(layer, &a) {
            return Ok(());
        }
        // the attention that needs these blocks runs next, so nothing could overlap a copy: the
        // new blocks take their slots now, the attention reads their rows from the host tier
        // (counted), and the copies of every layer run together at the end of the step
        // (`end_step`), in one parallel section instead of one serial gap per layer
        let t = Instant::now();
        self.sync(layer, &a, hosts, Copier::EndOfStep)?;
        let s = t.elapsed().as_secs_f64();
        self.counters.stall_s += s;
        self.counters.decode_stall_s += s;
        Ok(())
    }

    /// After layer `layer` and its policy step: bring its fast tier in line with its active set
    /// (after a prefill this fills its slots), and when the next layer starts a stage whose set
    /// may have just changed, evict and prefetch for every layer of that stage at once. Sets a
    /// layer chooses before it attends are left to `before_attention`.
    pub fn after_layer(
        &mut self,
        layer: usize,
        rows: usize,
        hosts: &[Arc<LayerKv>],
        policy: &dyn LayerPolicy,
    ) -> Result<()> {
        if let Some(a) = policy.active_blocks(layer) {
            if rows > 1 {
                self.counters.staging = self.counters.staging.max(hosts[layer].bytes());
            }
            if !self.chosen_at_attention(layer, &a) {
                self.sync(layer, &a, hosts, Copier::Worker)?;
            }
        }
        if let Some(a) = policy.active_blocks(layer + 1) {
            if a.stage_layers.start == layer + 1 && !self.chosen_at_attention(layer + 1, &a) {
                for m in a.stage_layers.clone() {
                    self.sync(m, &a, hosts, Copier::Worker)?;
                }
            }
        }
        self.note_peak(hosts);
        Ok(())
    }

    /// Evict the held blocks of layer `m` that are not in `want`, fetch the wanted ones its host
    /// tier holds; send the others to the spill file when it is on.
    fn sync(
        &mut self,
        m: usize,
        a: &ActiveBlocks,
        hosts: &[Arc<LayerKv>],
        how: Copier,
    ) -> Result<()> {
        let (want, bs, prompt_len) = (a.blocks, a.block_size, a.prompt_len);
        self.prompt_len = prompt_len;
        let l = &self.layers[m];
        let drop: Vec<u32> = l
            .table
            .holding()
            .filter(|b| want.binary_search(b).is_err())
            .collect();
        if drop
            .iter()
            .any(|&b| matches!(l.table.state(b), Residency::InFlight(_)))
        {
            self.wait_layer(m, hosts);
        }
        for b in drop {
            self.layers[m].table.evict(b).map_err(kv_err)?;
            self.counters.step_moved += 1;
        }
        for &b in want {
            let state = self.layers[m].table.state(b);
            if matches!(state, Residency::InFlight(_) | Residency::Fast(_)) {
                continue;
            }
            let rows = block_rows(&hosts[m], b, bs, prompt_len);
            if rows.is_empty() {
                continue; // not computed at this layer yet
            }
            self.layers[m].table.mark_host(b);
            match self.fetch(m, b, rows, hosts, how) {
                Err(FetchError::Full(e)) => {
                    // the plan did not foresee this set (it grew mid-request): decode reads
                    // the host tier for the blocks that did not fit (same result), and says so
                    if !self.full_noted {
                        push_note(
                            &mut self.notes,
                            format!("layer {m}: {e}; decode reads those blocks from the host tier"),
                        );
                        self.full_noted = true;
                    }
                }
                Err(FetchError::Other(e)) => return Err(e),
                Ok(()) => {}
            }
        }
        if self.spill_on && hosts[m].len() > 1 {
            self.spill_inactive(m, want, bs, prompt_len, hosts);
        }
        Ok(())
    }

    /// Copy block `b` of layer `m` into a slot: through the worker (`Copier::Worker`, unless it is
    /// gone; then here, from the RAM copy), or at the end of the step (`Copier::EndOfStep`).
    fn fetch(
        &mut self,
        m: usize,
        b: u32,
        rows: Range<usize>,
        hosts: &[Arc<LayerKv>],
        how: Copier,
    ) -> std::result::Result<(), FetchError> {
        let (bs, d) = (self.block_size, self.kv_dim);
        let bytes = rows.len() * self.row_bytes();
        let l = &mut self.layers[m];
        let slot = match l.table.start_fetch(b) {
            Ok(s) => s,
            Err(e @ TableError::Exhausted { .. }) => return Err(FetchError::Full(e)),
            Err(e) => return Err(FetchError::Other(kv_err(e))),
        };
        let mut buf = l.fast.take_slot(slot, bs, d);
        self.counters.moved += 1;
        self.counters.copied += bytes;
        self.counters.step_moved += 1;
        self.counters.step_copied += bytes;
        if let (Some(w), Copier::Worker) = (&self.worker, how) {
            let job = Job::Fetch {
                layer: m,
                block: b,
                slot,
                src: Arc::clone(&hosts[m]),
                rows: rows.clone(),
                buf,
            };
            match w.send(job) {
                Ok(()) => {
                    self.layers[m].pending += 1;
                    return Ok(());
                }
                Err(Job::Fetch { buf: back, .. }) => buf = back,
                Err(_) => unreachable!("the job sent is the job returned"),
            }
            self.worker_lost(hosts);
        }
        if how == Copier::EndOfStep {
            self.counters.host_reads += 1;
            self.deferred.push(Deferred {
                layer: m,
                block: b,
                slot,
                rows,
                buf,
            });
            return Ok(());
        }
        copy_rows(&hosts[m], rows, &mut buf);
        let l = &mut self.layers[m];
        l.table
            .complete(b)
            .map_err(|e| FetchError::Other(kv_err(e)))?;
        l.fast.put_slot(slot, buf);
        Ok(())
    }

    /// Run the copies deferred this step, spread over the compute pool, and complete their
    /// blocks (the time is stall: nothing else runs meanwhile).
    fn flush_deferred(&mut self, hosts: &[Arc<LayerKv>]) {
        if self.deferred.is_empty() {
            return;
        }
        let t = Instant::now();
        let mut copies = std::mem::take(&mut self.deferred);
        copies
            .par_iter_mut()
            .for_each(|c| copy_rows(&hosts[c.layer], c.rows.clone(), &mut c.buf));
        for c in copies {
            let l = &mut self.layers[c.layer];
            if l.table.complete(c.block).is_ok() {
                l.fast.put_slot(c.slot, c.buf);
            }
        }
        let s = t.elapsed().as_secs_f64();
        self.counters.stall_s += s;
        self.counters.decode_stall_s += s;
    }

    fn spill_inactive(
        &mut self,
        m: usize,
        want: &[u32],
        bs: usize,
        prompt_len: usize,
        hosts: &[Arc<LayerKv>],
    ) {
        let Some(w) = &self.worker else {
            return;
        };
        let l = &mut self.layers[m];
        let host = &hosts[m];
        let mut blocks: Vec<u32> = host
            .positions
            .iter()
            .take_while(|&&p| (p as usize) < prompt_len)
            .map(|&p| p / bs as u32)
            .collect();
        blocks.dedup();
        for b in blocks {
            if want.binary_search(&b).is_ok() || l.spill_sent.contains(&b) {
                continue;
            }
            l.spill_sent.insert(b);
            let rows = block_rows(host, b, bs, prompt_len);
            let job = Job::Spill {
                layer: m,
                block: b,
                src: Arc::clone(host),
                rows,
            };
            if w.send(job).is_err() {
                return; // the worker is gone: noticed at the next wait
            }
            l.pending += 1;
        }
    }

    /// Apply the completions that are ready, without waiting.
    fn drain_ready(&mut self, hosts: &[Arc<LayerKv>]) {
        loop {
            let Some(w) = &self.worker else {
                return;
            };
            match w.try_recv() {
                Some(Ok(done)) => self.apply(done),
                Some(Err(WorkerGone)) => return self.worker_lost(hosts),
                None => return,
            }
        }
    }

    /// Wait until layer `m` has no command in flight (deferred copies included).
    fn wait_layer(&mut self, m: usize, hosts: &[Arc<LayerKv>]) {
        self.flush_deferred(hosts);
        while self.layers[m].pending > 0 {
            let Some(w) = &self.worker else {
                return;
            };
            match w.recv() {
                Ok(done) => self.apply(done),
                Err(WorkerGone) => return self.worker_lost(hosts),
            }
        }
    }

    /// Wait for every layer (before a reset, a truncation, or the end of a request).
    pub fn wait_all(&mut self, hosts: &[Arc<LayerKv>]) {
        for m in 0..self.layers.len() {
            self.wait_layer(m, hosts);
        }
    }

    fn apply(&mut self, done: Done) {
        match done {
            Done::Fetched {
                layer,
                block,
                slot,
                buf,
                corrupt,
                from_spill,
            } => {
                let l = &mut self.layers[layer];
                l.pending -= 1;
                if l.table.complete(block).is_ok() {
                    l.fast.put_slot(slot, buf);
                }
                if from_spill {
                    self.counters.spill_reads += 1;
                }
                if corrupt {
                    if self.counters.corrupt == 0 {
                        push_note(&mut self.notes, format!(
                            "spill: block {block} of layer {layer} failed its CRC and was read from RAM instead"
                        ));
                    }
                    self.counters.corrupt += 1;
                }
            }
            Done::Spilled { layer, refused, .. } => {
                self.layers[layer].pending -= 1;
                match refused {
                    None => {
                        self.spilled_blocks += 1;
                        self.spill_bytes += self.slot_bytes();
                    }
                    Some(_) => {
                        if self.spill_on {
                            push_note(
                                &mut self.notes,
                                format!(
                                    "spill: cap of {} reached; further blocks stay in RAM only",
                                    self.cfg.spill_cap
                                ),
                            );
                        }
                        self.spill_on = false;
                    }
                }
            }
        }
    }

    /// The worker thread is gone: finish its lost copies here and copy synchronously from now on.
    fn worker_lost(&mut self, hosts: &[Arc<LayerKv>]) {
        if self.worker.take().is_none() {
            return;
        }
        push_note(
            &mut self.notes,
            "offload worker stopped: KV copies now run on the engine thread (synchronously)",
        );
        if self.spill_on || self.spilled_blocks > 0 {
            push_note(
                &mut self.notes,
                "spill file closed with the worker: blocks are read from RAM",
            );
        }
        self.spill_on = false;
        let (bs, d) = (self.block_size, self.kv_dim);
        for (m, l) in self.layers.iter_mut().enumerate() {
            let lost: Vec<u32> = l.table.in_flight().collect();
            for b in lost {
                let Residency::InFlight(slot) = l.table.state(b) else {
                    continue;
                };
                let mut buf = l.fast.take_slot(slot, bs, d);
                // the prompt length is not needed: a block's rows are found by its positions
                let host = &hosts[m];
                let lo = host
                    .positions
                    .partition_point(|&p| (p as usize) < b as usize * bs);
                let hi = host
                    .positions
                    .partition_point(|&p| (p as usize) < (b as usize + 1) * bs)
                    .min(lo + bs);
                copy_rows(host, lo..hi, &mut buf);
                let _ = l.table.complete(b);
                l.fast.put_slot(slot, buf);
            }
            l.pending = 0;
        }
    }

    /// A decode attention of a slim layer read the host tier instead of the fast tier.
    pub fn note_miss(&mut self) {
        self.counters.misses += 1;
    }

    /// Test hook: stop the worker thread as if it had died.
    #[doc(hidden)]
    pub fn kill_worker(&mut self) {
        if let Some(w) = &self.worker {
            let _ = w.send(Job::Die);
        }
    }

    /// Test hook: corrupt every block in the spill file.
    #[doc(hidden)]
    pub fn corrupt_spill(&mut self) {
        if let Some(w) = &self.worker {
            let _ = w.send(Job::CorruptSpill);
        }
    }

    pub fn begin_step(&mut self) {
        self.in_decode_step = true;
        self.counters.step_moved = 0;
        self.counters.step_copied = 0;
    }

    pub fn end_step(&mut self, hosts: &[Arc<LayerKv>]) {
        self.flush_deferred(hosts);
        self.in_decode_step = false;
        let c = &mut self.counters;
        c.moved_per_step.push(std::mem::take(&mut c.step_moved));
        c.copied_per_step.push(std::mem::take(&mut c.step_copied));
    }

    /// Whether layer `i` is a slim layer (fast tier = active blocks + rows past the prompt).
    pub fn is_managed(&self, i: usize) -> bool {
        self.layers[i].managed
    }

    /// Fast-tier bytes of slim layer `i`.
    pub fn layer_fast_bytes(&self, i: usize) -> usize {
        let l = &self.layers[i];
        l.fast.bytes(l.table.created(), self.slot_bytes())
    }

    /// Fast-tier bytes now.
    fn fast_bytes(&self, hosts: &[Arc<LayerKv>]) -> Vec<usize> {
        let sb = self.slot_bytes();
        (self.layers.iter().zip(hosts))
            .map(|(l, h)| {
                if l.managed {
                    l.fast.bytes(l.table.created(), sb)
                } else {
                    h.bytes()
                }
            })
            .collect()
    }

    fn note_peak(&mut self, hosts: &[Arc<LayerKv>]) {
        let now: usize = self.fast_bytes(hosts).iter().sum();
        self.counters.peak = self.counters.peak.max(now);
    }

    /// The request's numbers; counters start again.
    pub fn take_stats(&mut self, hosts: &[Arc<LayerKv>]) -> KvStats {
        self.note_peak(hosts);
        let fast = self.fast_bytes(hosts);
        let host: Vec<usize> = (self.layers.iter().zip(hosts))
            .map(|(l, h)| if l.managed { h.bytes() } else { 0 })
            .collect();
        let c = std::mem::take(&mut self.counters);
        self.full_noted = false;
        let mut notes = self.notes.clone();
        if let Some(b) = self.budget.filter(|&b| c.peak > b) {
            notes.push(format!(
                "fast tier peaked at {} over its budget of {}: the answer ran past the rows reserved for it",
                mib(c.peak),
                mib(b)
            ));
        }
        KvStats {
            kv_resident: false,
            kv_fast_budget_bytes: self.budget,
            kv_fast_bytes: fast.iter().sum(),
            kv_fast_bytes_peak: c.peak,
            kv_host_bytes: host.iter().sum(),
            kv_dense_bytes: 0,
            kv_fast_bytes_per_layer: fast,
            kv_host_bytes_per_layer: host,
            kv_prefill_staging_bytes: c.staging,
            kv_blocks_moved: c.moved,
            kv_bytes_copied: c.copied,
            kv_blocks_moved_per_step: c.moved_per_step,
            kv_bytes_copied_per_step: c.copied_per_step,
            kv_stall_ms: c.stall_s * 1e3,
            kv_decode_stall_ms: c.decode_stall_s * 1e3,
            kv_fast_misses: c.misses,
            kv_host_reads: c.host_reads,
            kv_spilled_blocks: self.spilled_blocks,
            kv_spill_bytes: self.spill_bytes,
            kv_spill_reads: c.spill_reads,
            kv_spill_corrupt_blocks: c.corrupt,
            kv_worker_alive: self.worker.is_some(),
            kv_notes: notes,
        }
    }

    /// Forget every block and row (a new conversation); slots and the worker are kept.
    pub fn reset(&mut self, hosts: &[Arc<LayerKv>]) {
        self.wait_all(hosts);
        for l in &mut self.layers {
            l.table.reset();
            l.fast.clear_tail();
            l.spill_sent.clear();
            l.managed = false;
        }
    }

    /// Drop rows at positions >= `pos` (the host caches are truncated by the caller).
    pub fn truncate_from(&mut self, pos: u32, hosts: &[Arc<LayerKv>]) {
        self.wait_all(hosts);
        let first_block = pos / self.block_size as u32;
        for l in &mut self.layers {
            l.fast.truncate_tail(pos);
            if (pos as usize) < self.prompt_len {
                // a block cut in part is forgotten whole; its remaining rows are marked again on
                // the next append or sync
                let _ = l.table.forget_from(first_block);
            }
        }
    }
}

/// Add a fallback or fault note once.
fn push_note(notes: &mut Vec<String>, note: impl Into<String>) {
    let note = note.into();
    if !notes.contains(&note) {
        notes.push(note);
    }
}

/// Why a block was not fetched.
enum FetchError {
    /// No free slot (the set outgrew the plan).
    Full(TableError),
    Other(Error),
}

fn kv_err(e: TableError) -> Error {
    Error::Engine(format!("kv manager: {e}"))
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}
