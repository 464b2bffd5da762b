//! The chat engine's forward on a device: the LLaMA forward over the ops seam ([`OpsLlama`])
//! with its cache and the engine's `SlimSession`, behind the few calls the engine makes of a
//! forward (prefill a prompt, extend it, cut it, step one token, report the KV and the
//! device's memory). On the CPU it runs on the engine's backend ([`load_engine_ops`]: int8
//! linear layers, Q8 KV, the 8-bit attention); `--device cuda` runs the chat screen, `run` and
//! `serve` through it on a GPU ([`load_cuda`]); [`load_cpu_ops`] runs it on the devices' bf16
//! reference ops, which is how the tests check the device path without a GPU.
//!
//! A follow-up turn runs only its new tokens after the cached conversation (the prompt's pruned
//! KV is kept); the prefill leaves room for the answer, and a layer's pool grows when a
//! follow-up needs more. A keep ratio turned mid-conversation resizes the decode sets from the
//! next step; a raised one brings pruned blocks back (revival: their hidden states wait in the
//! backend's memory; a tiered layer that revives gives its host tier up).
//!
//! The pruned prompt's KV is kept as [`KvPlacement`] says: tiered by default (each slim layer's
//! pool holds its decode set, the rest of its kept blocks wait in RAM, and in the spill file
//! when `[kv] spill` asks, and are fetched when a step chooses them; src/backend/paged_tier.rs),
//! every kept row in the fast tier with `--kv-resident`. Copies between the tiers are
//! synchronous on the CPU; a GPU offloads behind the layers that follow.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::attention_kind::AttentionKind;
use crate::backend::engine_ops::EngineOps;
use crate::backend::kv_format::KvDtype;
use crate::backend::ops::Ops;
use crate::backend::paged_kv::{LayerCache, LayerHooks};
use crate::backend::paged_tier::{SharedSpill, TierCounts};
use crate::backend::spill_file::SpillFile;
use crate::device::Device;
use crate::kv::KvStats;
use crate::metrics::GpuMemory;
use crate::model::gguf::GgufFile;
use crate::model::ops_llama::{KvPlacement, ModelCache, OpsLlama};
use crate::slim::schedule::{SlimConfig, Stage};
use crate::slim::session::SlimSession;
use crate::Result;

/// A forward the engine can hand its prompts and tokens to.
pub trait DeviceForward: Send {
    /// The device, in words (for the metrics panel and `run --json`).
    fn describe(&self) -> String;

    /// The longest prompt plus answer it takes.
    fn context(&self) -> usize;

    /// Drop the cache: the next call is a prefill.
    fn reset(&mut self);

    /// A new keep ratio for the cached conversation's decode sets (from the next step on; no
    /// stage grows past the blocks its prefill kept).
    fn set_keep_ratio(&mut self, keep_ratio: f32);

    /// Where the pruned prompt's KV goes from the next prefill on (the cache is dropped).
    fn set_kv_placement(&mut self, placement: KvPlacement);

    fn kv_placement(&self) -> KvPlacement;

    /// Prefill `tokens` at positions 0.. from an empty cache, pruned by `slim` (None: dense),
    /// with room for `headroom` generated tokens; the logits of the last token. `on_layer`
    /// hears of each layer as it is issued, with the rows it runs on and the KV held so far.
    /// Once `stop` is set the next layer does not start: [`crate::Error::Cancelled`], and no
    /// cache.
    fn prefill(
        &mut self,
        tokens: &[u32],
        slim: Option<&SlimConfig>,
        headroom: usize,
        stop: &AtomicBool,
        on_layer: &mut dyn FnMut(PrefillLayer),
    ) -> Result<Vec<f32>>;

    /// `tokens` at the next positions (a follow-up message, or one generated token), after
    /// the cached ones; the logits of the last.
    fn extend(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.extend_until(tokens, &AtomicBool::new(false))
    }

    /// [`Self::extend`], stopped between two layers once `stop` is set (a long follow-up, or a
    /// step that heals): [`crate::Error::Cancelled`], after which some layers hold the tokens
    /// and others not, as after any failed step: the caller resets the cache.
    fn extend_until(&mut self, tokens: &[u32], stop: &AtomicBool) -> Result<Vec<f32>>;

    /// The KV type (for the pools of the next prefill's cache, on every device) and the CPU
    /// engine's prefill attention kernel (from the next prefill on; the cache is kept; a GPU
    /// keeps its own kernels).
    fn set_numerics(&mut self, kv: KvDtype, attention: AttentionKind);

    /// Teacher forcing: `tokens` at positions 0.. with nothing pruned, and the logits of rows
    /// `from..`, (rows - from, vocab); the cache is left empty (perplexity, agreement).
    fn logits_from(&mut self, tokens: &[u32], from: usize) -> Result<Vec<f32>>;

    /// Tokens the context still has room for after the cached ones (0 with no cache).
    fn room(&self) -> usize;

    /// Rows each layer holds (the prompt tokens it kept, and the answer's).
    fn rows_per_layer(&self) -> Vec<usize>;

    /// The SlimInfer stages that pruned the cached prompt (empty: dense, or nothing pruned).
    fn stages(&self) -> Vec<Stage>;

    /// Bytes of K and V kept for this conversation (its rows, wherever they are).
    fn kv_bytes(&self) -> usize;

    /// Bytes of K and V in the device's memory (the fast tier) and in RAM (the host tier).
    fn kv_tiers(&self) -> (usize, usize);

    /// The KV numbers since the last call (the tiers' counters start again); the caller adds
    /// what a dense cache would hold.
    fn take_kv_stats(&mut self) -> KvStats;

    /// Bytes of one row of K and V in one layer.
    fn kv_row_bytes(&self) -> usize;

    /// The element type its KV pools are made in.
    fn kv_dtype(&self) -> KvDtype;

    /// The cached prompt's SlimInfer session (None: dense, or nothing cached).
    fn session(&self) -> Option<&SlimSession>;

    fn session_mut(&mut self) -> Option<&mut SlimSession>;

    /// Positions of the rows layer `layer` holds.
    fn layer_positions(&self, layer: usize) -> Vec<u32>;

    /// Forget the cached rows at positions `pos` and after (a follow-up that keeps only part of
    /// the cached answer); an error, and the cache dropped, where a layer cannot cut there.
    fn truncate_from(&mut self, pos: usize) -> Result<()>;

    /// Also write the blocks tiered layers keep in RAM to a spill file from the next prefill
    /// on (None: no spill file).
    fn set_spill(&mut self, spill: Option<SpillSetting>);

    /// Test hook: flip a byte of every block in the spill file, as a bad disk would.
    fn corrupt_spill(&mut self);

    /// The device's memory, when it has its own.
    fn memory(&self) -> Option<GpuMemory>;

    /// A reader of [`Self::memory`] that can be called while the forward is busy (during a
    /// prefill, for the live metrics).
    fn memory_probe(&self) -> MemoryProbe;
}

/// Where a forward's spill file goes and how large it may grow (`[kv] spill_dir`, `spill_cap`).
#[derive(Debug, Clone)]
pub struct SpillSetting {
    pub dir: PathBuf,
    pub cap: usize,
}

/// Reads a device's memory (None: the device has none of its own).
pub type MemoryProbe = Arc<dyn Fn() -> Option<GpuMemory> + Send + Sync>;

/// A prefill layer has written its rows.
#[derive(Debug, Clone, Copy)]
pub struct PrefillLayer {
    pub layer: usize,
    /// Rows the layer runs on.
    pub rows: usize,
    /// KV in the device's memory now (the layers done, as decode will find them, and this
    /// one's whole pool) and in RAM.
    pub kv_fast_bytes: usize,
    pub kv_host_bytes: usize,
}

/// [`DeviceForward`] over a backend of the ops seam.
struct OpsForward<O: Ops + 'static> {
    model: OpsLlama<'static, O>,
    cache: Option<ModelCache<O>>,
    placement: KvPlacement,
    describe: String,
    memory: MemoryProbe,
    /// Most fast-tier bytes held since the last [`DeviceForward::take_kv_stats`].
    fast_peak: usize,
    /// The tiers' counters at the last [`DeviceForward::take_kv_stats`].
    reported: TierCounts,
    /// Blocks and bytes each decode step copied between the tiers, since then.
    step_blocks: Vec<usize>,
    step_bytes: Vec<usize>,
    /// Runs a step (or a follow-up's tokens) through the model.
    extend: ExtendFn<O>,
    /// The spill file's setting, and the file of the cached prompt.
    spill_setting: Option<SpillSetting>,
    spill: Option<SharedSpill>,
    /// Faults and fallbacks since the last [`DeviceForward::take_kv_stats`], one line each.
    notes: Vec<String>,
    /// Changes the KV type of the backend's next caches, and on the CPU engine's backend its
    /// prefill attention kernel.
    numerics: Option<NumericsFn<O>>,
}

/// How [`OpsForward`] changes its backend's KV type and attention kernel; the backend's new
/// description where it names them.
type NumericsFn<O> = fn(&OpsLlama<'static, O>, KvDtype, AttentionKind) -> Option<String>;

/// How [`OpsForward`] runs tokens after the prompt through its model, until `stop` is set.
type ExtendFn<O> =
    fn(&OpsLlama<'static, O>, &mut ModelCache<O>, &[u32], &AtomicBool) -> Result<Vec<f32>>;

/// The model's `extend`, where it is called.
fn extend_here<O: Ops>(
    model: &OpsLlama<'static, O>,
    cache: &mut ModelCache<O>,
    tokens: &[u32],
    stop: &AtomicBool,
) -> Result<Vec<f32>> {
    model.extend(cache, tokens, &mut Stop(stop))
}

/// The model's `extend` on a thread of the CPU's pool (as the engine runs its own steps): a
/// decode step's many small parallel ops then start on a worker instead of each waking the pool
/// from outside (3 ms of a 12 ms step on the default model, measured).
fn extend_in_pool(
    model: &OpsLlama<'static, EngineOps>,
    cache: &mut ModelCache<EngineOps>,
    tokens: &[u32],
    stop: &AtomicBool,
) -> Result<Vec<f32>> {
    rayon::scope(|_| model.extend(cache, tokens, &mut Stop(stop)))
}

impl<O: Ops + 'static> OpsForward<O> {
    fn new(model: OpsLlama<'static, O>, describe: String, memory: MemoryProbe) -> Self {
        Self {
            model,
            cache: None,
            placement: KvPlacement::Tiered,
            describe,
            memory,
            fast_peak: 0,
            reported: TierCounts::default(),
            step_blocks: Vec::new(),
            step_bytes: Vec::new(),
            extend: extend_here,
            spill_setting: None,
            spill: None,
            notes: Vec::new(),
            numerics: None,
        }
    }
}

/// Ends a forward between two layers once the flag is set: the next layer's hook fails.
struct Stop<'a>(&'a AtomicBool);

impl Stop<'_> {
    fn check(&self) -> Result<()> {
        match self.0.load(Ordering::Relaxed) {
            true => Err(crate::Error::Cancelled),
            false => Ok(()),
        }
    }
}

impl<O: Ops> LayerHooks<O> for Stop<'_> {
    fn kv_written(&mut self, _ops: &O, _layer: usize, _kv: &LayerCache<O>) -> Result<()> {
        self.check()
    }
}

/// Tells `on_layer` of each layer of a prefill as it writes its rows, with the KV held so far,
/// and ends the prefill there once `stop` is set.
struct Progress<'a> {
    stop: Stop<'a>,
    on_layer: &'a mut dyn FnMut(PrefillLayer),
    /// KV of the layers done, in each tier.
    fast_done: usize,
    host_done: usize,
    fast_peak: usize,
}

impl<O: Ops> LayerHooks<O> for Progress<'_> {
    fn kv_written(&mut self, _ops: &O, layer: usize, kv: &LayerCache<O>) -> Result<()> {
        self.stop.check()?;
        let fast = self.fast_done + kv.pool.bytes();
        self.fast_peak = self.fast_peak.max(fast);
        (self.on_layer)(PrefillLayer {
            layer,
            rows: kv.rows,
            kv_fast_bytes: fast,
            kv_host_bytes: self.host_done,
        });
        Ok(())
    }

    fn layer_done(&mut self, _ops: &O, _layer: usize, kv: &LayerCache<O>) -> Result<()> {
        self.fast_done += kv.pool.bytes();
        self.host_done += kv.host.as_ref().map_or(0, |h| h.bytes());
        Ok(())
    }
}

impl<O: Ops + Sync + 'static> DeviceForward for OpsForward<O>
where
    OpsLlama<'static, O>: Send,
    ModelCache<O>: Send,
{
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn context(&self) -> usize {
        self.model.max_positions()
    }

    fn reset(&mut self) {
        self.cache = None;
        self.spill = None;
        self.fast_peak = 0;
        self.reported = TierCounts::default();
        self.step_blocks.clear();
        self.step_bytes.clear();
    }

    fn set_kv_placement(&mut self, placement: KvPlacement) {
        self.reset();
        self.placement = placement;
    }

    fn kv_placement(&self) -> KvPlacement {
        self.placement
    }

    fn set_keep_ratio(&mut self, keep_ratio: f32) {
        if let Some(session) = self.cache.as_mut().and_then(|c| c.session.as_mut()) {
            session.set_keep_ratio(keep_ratio);
        }
    }

    fn prefill(
        &mut self,
        tokens: &[u32],
        slim: Option<&SlimConfig>,
        headroom: usize,
        stop: &AtomicBool,
        on_layer: &mut dyn FnMut(PrefillLayer),
    ) -> Result<Vec<f32>> {
        self.cache = None;
        self.spill = self.spill_file();
        let mut progress = Progress {
            stop: Stop(stop),
            on_layer,
            fast_done: 0,
            host_done: 0,
            fast_peak: 0,
        };
        let (placement, spill) = (self.placement, self.spill.as_ref());
        let (cache, report) = (self.model).prefill_spilling(
            tokens,
            slim,
            headroom,
            placement,
            spill,
            &mut progress,
        )?;
        self.fast_peak = self.fast_peak.max(progress.fast_peak);
        self.cache = Some(cache);
        Ok(report.logits)
    }

    fn extend_until(&mut self, tokens: &[u32], stop: &AtomicBool) -> Result<Vec<f32>> {
        let cache = self.cache.as_mut().ok_or_else(|| {
            crate::Error::Engine("device forward: a step before any prefill".into())
        })?;
        let before = cache.tiers().counts;
        let logits = (self.extend)(&self.model, cache, tokens, stop)?;
        let after = cache.tiers();
        self.fast_peak = self.fast_peak.max(after.fast_bytes);
        if tokens.len() == 1 {
            let step = after.counts.since(&before);
            self.step_blocks.push(step.blocks_moved());
            self.step_bytes.push(step.bytes_copied());
        }
        Ok(logits)
    }

    fn set_numerics(&mut self, kv: KvDtype, attention: AttentionKind) {
        if let Some(describe) = self
            .numerics
            .and_then(|set| set(&self.model, kv, attention))
        {
            self.describe = describe;
        }
    }

    fn logits_from(&mut self, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
        self.reset();
        self.model.logits_from(tokens, from)
    }

    fn room(&self) -> usize {
        (self.cache.as_ref()).map_or(0, |c| self.context().saturating_sub(c.next_position()))
    }

    fn rows_per_layer(&self) -> Vec<usize> {
        self.cache
            .as_ref()
            .map_or_else(Vec::new, ModelCache::rows_per_layer)
    }

    fn stages(&self) -> Vec<Stage> {
        (self.cache.as_ref().and_then(|c| c.session.as_ref()))
            .map_or_else(Vec::new, SlimSession::stages)
    }

    fn kv_bytes(&self) -> usize {
        (self.cache.as_ref()).map_or(0, |c| {
            c.rows_per_layer().iter().sum::<usize>() * self.kv_row_bytes()
        })
    }

    fn kv_tiers(&self) -> (usize, usize) {
        (self.cache.as_ref()).map_or((0, 0), |c| {
            let t = c.tiers();
            (t.fast_bytes, t.host_bytes)
        })
    }

    fn take_kv_stats(&mut self) -> KvStats {
        let mut stats = KvStats {
            kv_resident: self.placement == KvPlacement::Resident,
            kv_fast_bytes_peak: std::mem::take(&mut self.fast_peak),
            kv_blocks_moved_per_step: std::mem::take(&mut self.step_blocks),
            kv_bytes_copied_per_step: std::mem::take(&mut self.step_bytes),
            ..KvStats::default()
        };
        let Some(cache) = &self.cache else {
            return stats;
        };
        let t = cache.tiers();
        let work = t.counts.since(&self.reported);
        self.reported = t.counts;
        stats.kv_fast_bytes = t.fast_bytes;
        stats.kv_fast_bytes_peak = stats.kv_fast_bytes_peak.max(t.fast_bytes);
        stats.kv_host_bytes = t.host_bytes;
        stats.kv_fast_bytes_per_layer = cache.layers.iter().map(|l| l.pool.bytes()).collect();
        stats.kv_host_bytes_per_layer = (cache.layers.iter())
            .map(|l| l.host.as_ref().map_or(0, |h| h.bytes()))
            .collect();
        stats.kv_blocks_moved = work.blocks_moved();
        stats.kv_bytes_copied = work.bytes_copied();
        stats.kv_stall_ms = (work.offload_us + work.fetch_us) as f64 / 1e3;
        stats.kv_decode_stall_ms = work.fetch_us as f64 / 1e3;
        stats.kv_spilled_blocks = t.counts.spilled_blocks;
        stats.kv_spill_bytes = t.counts.spilled_bytes;
        stats.kv_spill_reads = work.spill_reads;
        stats.kv_spill_corrupt_blocks = work.spill_corrupt;
        stats.kv_notes = std::mem::take(&mut self.notes);
        if let Some(spill) = &self.spill_setting {
            stats.kv_notes.extend(spill_notes(&work, spill));
        }
        if work.untiered > 0 {
            stats.kv_notes.push(format!(
                "revival: {} layers gave their host tier up and hold every row in the fast tier",
                work.untiered
            ));
        }
        stats
    }

    fn kv_row_bytes(&self) -> usize {
        let pools = self.cache.as_ref().and_then(|c| c.layers.first());
        pools.map_or(self.model.shape.kv_row_bytes(), |l| l.pool.row_bytes())
    }

    fn kv_dtype(&self) -> KvDtype {
        self.model.ops.kv_dtype()
    }

    fn session(&self) -> Option<&SlimSession> {
        self.cache.as_ref().and_then(|c| c.session.as_ref())
    }

    fn session_mut(&mut self) -> Option<&mut SlimSession> {
        self.cache.as_mut().and_then(|c| c.session.as_mut())
    }

    fn layer_positions(&self, layer: usize) -> Vec<u32> {
        (self.cache.as_ref())
            .and_then(|c| c.layers.get(layer))
            .map_or_else(Vec::new, |l| l.positions.clone())
    }

    fn truncate_from(&mut self, pos: usize) -> Result<()> {
        let Some(cache) = &mut self.cache else {
            return Ok(());
        };
        let cut = cache.truncate_from(pos);
        if cut.is_err() {
            self.reset();
        }
        cut
    }

    fn set_spill(&mut self, spill: Option<SpillSetting>) {
        self.reset();
        self.spill_setting = spill;
    }

    fn corrupt_spill(&mut self) {
        if let Some(file) = &self.spill {
            file.lock()
                .unwrap_or_else(|e| e.into_inner())
                .corrupt_every_block();
        }
    }

    fn memory(&self) -> Option<GpuMemory> {
        (self.memory)()
    }

    fn memory_probe(&self) -> MemoryProbe {
        self.memory.clone()
    }
}

impl<O: Ops> OpsForward<O> {
    /// A fresh spill file for the next prefill's tiered layers, when one is asked for and the
    /// placement tiers (None, with a note, when it cannot be created).
    fn spill_file(&mut self) -> Option<SharedSpill> {
        let setting = self.spill_setting.as_ref()?;
        if self.placement != KvPlacement::Tiered {
            return None;
        }
        match SpillFile::create(&setting.dir, setting.cap) {
            Ok(file) => Some(Arc::new(Mutex::new(file))),
            Err(e) => {
                self.notes.push(format!(
                    "spill: file not created in {} ({e}); blocks stay in RAM only",
                    setting.dir.display()
                ));
                None
            }
        }
    }
}

/// What the spill file did since the last report (`counts`) that a person should know, one
/// line each.
fn spill_notes(counts: &TierCounts, spill: &SpillSetting) -> Vec<String> {
    let mut notes = Vec::new();
    if counts.spill_skipped > 0 {
        notes.push(format!(
            "spill: cap of {} MiB reached; {} further blocks stay in RAM only",
            spill.cap >> 20,
            counts.spill_skipped
        ));
    }
    if counts.spill_unsupported > 0 {
        notes.push(format!(
            "spill: this device's host blocks are not process memory; {} blocks stay in its pinned RAM only",
            counts.spill_unsupported
        ));
    }
    if counts.spill_corrupt > 0 {
        notes.push(format!(
            "spill: {} blocks failed their CRC and were read from RAM instead",
            counts.spill_corrupt
        ));
    }
    notes
}

/// The forward for `device` other than the CPU engine's (None for the CPU: the engine loads
/// its own, [`load_engine_ops`]), for up to `context` tokens, its KV in `kv`.
pub fn load(
    device: Device,
    path: &Path,
    context: usize,
    kv: KvDtype,
) -> Result<Option<Box<dyn DeviceForward>>> {
    match device {
        Device::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        Device::Cuda => load_cuda(path, context, kv).map(Some),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => {
            let _ = (path, context, kv);
            Err(crate::Error::Engine(
                "this build has no CUDA backend; rebuild with --features cuda".into(),
            ))
        }
    }
}

/// The model file `path` on the CPU's ops (bf16 weights and activations, f32 sums), for up to
/// `context` tokens: the device forward without a device.
pub fn load_cpu_ops(path: &Path, context: usize) -> Result<Box<dyn DeviceForward>> {
    static CPU: crate::backend::cpu_ops::CpuOps = crate::backend::cpu_ops::CpuOps;
    let mut file = GgufFile::open(path)?;
    let model = OpsLlama::from_gguf(&CPU, &mut file, context)?;
    let describe = "CPU (ops seam, bf16)".into();
    Ok(Box::new(OpsForward::new(
        model,
        describe,
        Arc::new(|| None),
    )))
}

/// The model `file` on the CPU engine's backend (`ops`: its linear layers, KV type and
/// attention kernel), for up to `context` tokens.
pub fn load_engine_ops(
    file: &mut GgufFile,
    context: usize,
    ops: EngineOps,
) -> Result<Box<dyn DeviceForward>> {
    // the backend lives as long as the process: the model borrows it
    let ops: &'static EngineOps = Box::leak(Box::new(ops));
    let model = OpsLlama::from_gguf(ops, file, context)?;
    let describe = seam_description(ops);
    let mut forward = OpsForward::new(model, describe, Arc::new(|| None));
    forward.extend = extend_in_pool;
    forward.numerics = Some(|model, kv, attention| {
        model.ops.set_numerics(kv, attention);
        Some(seam_description(model.ops))
    });
    Ok(Box::new(forward))
}

/// What the CPU engine's backend runs.
fn seam_description(ops: &impl Ops) -> String {
    format!("CPU ({})", ops.name())
}

/// The model file `path` on GPU 0, for up to `context` tokens: weights expanded to bf16 there,
/// KV in its memory in `kv`.
#[cfg(feature = "cuda")]
pub fn load_cuda(path: &Path, context: usize, kv: KvDtype) -> Result<Box<dyn DeviceForward>> {
    use crate::cuda::{CudaOps, Gpu};
    let gpu = Arc::new(Gpu::new(0)?);
    // the backend lives as long as the process: the model borrows it
    let ops = CudaOps::new(gpu.clone()).with_kv_dtype(kv);
    let ops: &'static CudaOps = Box::leak(Box::new(ops));
    let mut file = GgufFile::open(path)?;
    let model = OpsLlama::from_gguf(ops, &mut file, context)?;
    let describe = format!("CUDA: {}", gpu.describe());
    let memory: MemoryProbe = Arc::new(move || gpu.vram().ok());
    let mut forward = OpsForward::new(model, describe, memory);
    forward.numerics = Some(|model, kv, _| {
        model.ops.set_kv_dtype(kv);
        None
    });
    Ok(Box::new(forward))
}
