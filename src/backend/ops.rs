//! The ops seam: the few operations a LLaMA forward with SlimInfer pruning is written against,
//! over buffers that live wherever the backend keeps them. [`super::engine_ops::EngineOps`] runs
//! them with the CPU engine's numerics (its logits, bit for bit); [`super::cpu_ops::CpuOps`] on
//! the CPU in bf16 (the reference of every CUDA kernel); `crate::cuda::CudaOps` on an NVIDIA GPU.
//!
//! Conventions: the residual stream is f32, row-major everywhere. Activations ([`Ops::Act`]) and
//! prepared weights ([`Ops::Weight`]) are the backend's own: bf16 (raw bits in `u16` on the
//! host) on the devices ([`DeviceOps`]), f32 activations and the file's blocks for int8 GEMMs on
//! the CPU engine's backend ([`super::engine_ops::EngineOps`]). A linear layer's weight is (out,
//! in), as in GGUF and PyTorch. The KV cache is paged: one [`KvPool`] per layer, slots of
//! [`KV_BLOCK`] rows, and a per-layer slot table that lists the slots in row order (all full but
//! the last); the kernels read rows through it, so attention over SlimInfer's active blocks is
//! attention over a table.

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};

pub use super::heads::Heads;
use super::kv_format::KvDtype;
pub use super::rowwise::RopeLayout;
use crate::Result;

/// Rows per KV slot: SlimInfer's block, the unit of selection and of KV movement.
pub const KV_BLOCK: usize = 64;

/// Where a batch of query rows sits inside a wider row buffer (e.g. the fused q|k|v output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSlice {
    /// Rows.
    pub rows: usize,
    /// Elements between consecutive rows.
    pub stride: usize,
    /// Index of the first element used (row 0): a column, or a later row's column.
    pub offset: usize,
}

impl RowSlice {
    /// The same rows from column `col` on.
    pub fn columns(self, col: usize) -> Self {
        Self {
            offset: self.offset + col,
            ..self
        }
    }

    /// Rows `first..first + rows` of this slice.
    pub fn rows_from(self, first: usize, rows: usize) -> Self {
        Self {
            rows,
            stride: self.stride,
            offset: self.offset + first * self.stride,
        }
    }
}

/// How block scores are computed (see [`super::score`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreMode {
    /// Attention mass of each block's units under each window query's softmax, averaged over
    /// heads and window queries.
    Attention,
    /// The same mass averaged over heads, and the largest over the window queries (the
    /// engine's default `window_pool = "max"`: the question's own tokens point at the fact).
    AttentionMax,
    /// The paper's: max over units of the mean over heads of |q_loc . k_unit|.
    Paper,
}

/// The prompt blocks a layer holds, as unit ranges: block `ids[b]` owns units
/// `first[b]..first[b + 1]` of the layer's prompt rows (8-row units, in row order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitBlocks {
    pub ids: Vec<u32>,
    pub first: Vec<u32>,
}

impl UnitBlocks {
    /// From the positions of a layer's prompt rows (ascending; kept blocks are whole, so
    /// every unit lies inside one block and one run of rows).
    pub fn from_positions(prompt_positions: &[u32], block_size: usize, unit_size: usize) -> Self {
        let (mut ids, mut first) = (Vec::new(), Vec::new());
        for (u, rows) in prompt_positions.chunks(unit_size).enumerate() {
            let block = rows[0] / block_size as u32;
            if ids.last() != Some(&block) {
                ids.push(block);
                first.push(u as u32);
            }
        }
        first.push(prompt_positions.len().div_ceil(unit_size) as u32);
        Self { ids, first }
    }

    pub fn n_units(&self) -> usize {
        *self.first.last().unwrap_or(&0) as usize
    }
}

/// What a weight is for: how a backend prepares it (a device expands every weight to bf16; the
/// CPU engine's backend keeps a matrix's blocks for its int8 GEMMs, in the layout each use reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightUse {
    /// A norm's weight or a bias: (n) values.
    Vector,
    /// A linear layer's (out, in) matrix; several parts stack along `out` (q|k|v, gate|up).
    Linear,
    /// The token embedding (vocab, hidden): rows are looked up.
    Embedding,
    /// The output head (vocab, hidden).
    Head,
    /// A head tied to the embedding: one matrix for both.
    TiedEmbedding,
}

/// Where a weight's values come from.
pub enum WeightValues {
    /// A model file's tensors one after another, each with its number of values; `None`: that
    /// many zeros (a bias the file lacks).
    Gguf(Vec<(Option<QTensor>, usize)>),
    /// Uniform in [-scale, scale) from (seed, index), as [`Ops::fill_uniform`] draws them.
    Uniform { seed: u64, scale: f32 },
    /// Every value 1 (a norm's weight).
    Ones,
}

/// One layer's paged KV storage: `slots` slots of [`KV_BLOCK`] rows, each row `row_words` words
/// of its element type (the backend's [`Ops::kv_dtype`] unless made with [`KvPool::typed`]).
pub struct KvPool<O: Ops + ?Sized> {
    /// (slots, KV_BLOCK, row_words): keys, as `dtype` words (Q8: divided by `k_scale`)
    pub k: O::Bf16,
    /// (slots, KV_BLOCK, row_words)
    pub v: O::Bf16,
    /// (slots, KV_BLOCK) positions of the rows
    pub pos: O::U32,
    pub slots: usize,
    pub kv_dim: usize,
    pub dtype: KvDtype,
    /// Q8 only: the divisor of each key channel (kv_dim), fixed by the layer's first append;
    /// empty before it and for 16-bit types.
    pub k_scale: Vec<f32>,
    /// `k_scale` in the backend's memory where its kernels read it (a device's; None on the
    /// host backends, which read `k_scale`).
    pub k_scale_on_device: Option<O::F32>,
}

impl<O: Ops + ?Sized> KvPool<O> {
    pub fn new(ops: &O, slots: usize, kv_dim: usize) -> Result<Self> {
        Self::typed(ops, slots, kv_dim, ops.kv_dtype())
    }

    /// A pool of `dtype` elements whatever the backend's own type is (a backend's kernels
    /// checked on every type).
    pub fn typed(ops: &O, slots: usize, kv_dim: usize, dtype: KvDtype) -> Result<Self> {
        let words = slots * KV_BLOCK * dtype.stored_len(kv_dim);
        Ok(Self {
            k: ops.zeros_bf16(words)?,
            v: ops.zeros_bf16(words)?,
            pos: ops.upload_u32(&vec![u32::MAX; slots * KV_BLOCK])?,
            slots,
            kv_dim,
            dtype,
            k_scale: Vec::new(),
            k_scale_on_device: None,
        })
    }

    /// Words a row of keys (or of values) takes.
    pub fn row_words(&self) -> usize {
        self.dtype.stored_len(self.kv_dim)
    }

    /// Bytes of a row's key and value.
    pub fn row_bytes(&self) -> usize {
        2 * self.row_words() * 2
    }

    /// Bytes of keys and values.
    pub fn bytes(&self) -> usize {
        self.slots * KV_BLOCK * self.row_bytes()
    }
}

/// What an attention's keys are besides the table it reads them through ([`Ops::attention`]).
/// The CPU engine's backend computes what the engine computes with them: its 8-bit kernel
/// groups keys by their row in the layer, and it reads a prefill's own rows unrounded.
pub struct AttentionContext<'a, O: Ops + ?Sized> {
    /// The columns (from `at.offset`) of the query rows' own keys and values in q's buffer,
    /// just appended to the pool.
    pub fresh: Option<(usize, usize)>,
    /// The keys are rows `ranges` of the layer's rows, which this gives whole (a layer
    /// attending to a subset, for a backend that [`Ops::attends_by_layer_rows`]).
    pub layer: Option<LayerRows<'a, O>>,
}

/// A layer's rows as [`AttentionContext::layer`] gives them: `rows` rows of `pool` through
/// `table` (the layer's own pool, or for a tiered layer a copy holding every row).
pub struct LayerRows<'a, O: Ops + ?Sized> {
    pub pool: &'a KvPool<O>,
    pub table: &'a O::U32,
    pub rows: usize,
    pub ranges: &'a [Range<usize>],
}

impl<O: Ops + ?Sized> AttentionContext<'_, O> {
    /// Nothing but the table.
    pub const NONE: Self = Self {
        fresh: None,
        layer: None,
    };
}

/// The weights of a layer's MLP block ([`Ops::mlp`]).
pub struct MlpWeights<'a, O: Ops + ?Sized> {
    /// (hidden)
    pub norm: &'a O::Weight,
    /// (2 * intermediate, hidden): gate, up
    pub gate_up: &'a O::Weight,
    /// (hidden, intermediate)
    pub down: &'a O::Weight,
}

/// Buffers [`Ops::mlp`] may work in, each for every row: the normed input (rows, hidden), gate
/// and up (rows, 2 * intermediate), their product (rows, intermediate), the block's output
/// (rows, hidden).
pub struct MlpScratch<O: Ops + ?Sized> {
    pub x: O::Act,
    pub gate_up: O::Act,
    pub act: O::Act,
    pub out: O::Act,
}

/// Every slot of `slots` is below `pool_slots`: else an error naming `op`.
pub fn check_slots(op: &str, pool_slots: usize, slots: impl Iterator<Item = u32>) -> Result<()> {
    for s in slots {
        if s as usize >= pool_slots {
            return Err(crate::Error::Engine(format!(
                "{op}: slot {s} of a pool of {pool_slots}"
            )));
        }
    }
    Ok(())
}

/// The operations, over a backend's buffers. Shapes are in the comments; every method checks
/// the lengths it is given against them (a mismatch is a caller bug, returned as an error).
pub trait Ops: 'static {
    /// f32 buffer (a forward may hold one for later: rows kept for revival)
    type F32: Send + Sync;
    /// bf16 buffer (raw bits): the KV pools
    type Bf16;
    /// A layer's activations: normed inputs, q|k|v, the attention's output, the MLP's.
    type Act;
    /// A prepared weight ([`Ops::weight`]).
    type Weight;
    /// u32 buffer (token ids, positions, row indices, slot tables)
    type U32;
    /// Host memory a layer's host tier keeps its blocks in (pinned on a GPU): filled by
    /// [`Ops::kv_offload`], read by [`Ops::kv_fetch`].
    type HostBlocks: Send;

    fn name(&self) -> String;

    /// The element type of the KV pools ([`KvPool`]).
    fn kv_dtype(&self) -> KvDtype {
        KvDtype::Bf16
    }

    /// Whether its attention reads a subset of a layer's keys as the layer's rows (its kernel
    /// groups keys by their row: the CPU engine's 8-bit kernel), so that a forward gives it
    /// [`AttentionContext::layer`], whole even where a tier holds some rows elsewhere.
    fn attends_by_layer_rows(&self) -> bool {
        false
    }

    fn zeros_f32(&self, n: usize) -> Result<Self::F32>;
    fn zeros_bf16(&self, n: usize) -> Result<Self::Bf16>;
    fn upload_f32(&self, v: &[f32]) -> Result<Self::F32>;
    fn upload_bf16(&self, v: &[u16]) -> Result<Self::Bf16>;
    fn upload_u32(&self, v: &[u32]) -> Result<Self::U32>;
    fn download_f32(&self, b: &Self::F32) -> Result<Vec<f32>>;
    fn download_bf16(&self, b: &Self::Bf16) -> Result<Vec<u16>>;
    fn download_u32(&self, b: &Self::U32) -> Result<Vec<u32>>;
    fn zeros_act(&self, n: usize) -> Result<Self::Act>;
    /// Activations from f32 values (a device rounds them to bf16).
    fn upload_act(&self, v: &[f32]) -> Result<Self::Act>;
    /// Elements `range` of activations, widened to f32 (a few rows of a wide buffer: a
    /// window's queries).
    fn download_act_range(&self, b: &Self::Act, range: Range<usize>) -> Result<Vec<f32>>;

    /// A weight of `rows` x `cols` values (a vector: one row) for `use_`, from `values`.
    fn weight(
        &self,
        values: WeightValues,
        use_: WeightUse,
        rows: usize,
        cols: usize,
    ) -> Result<Self::Weight>;
    /// Wait until every queued op has finished (a no-op on the CPU).
    fn sync(&self) -> Result<()>;

    /// Uniform values in [-scale, scale) from (seed, index): synthetic weights.
    fn fill_uniform(&self, out: &mut Self::Bf16, seed: u64, scale: f32) -> Result<()>;

    /// out (rows, n) = x (rows, k) . w^T, w: (n, k); f32 accumulation. A backend may replace
    /// `out` by a buffer of exactly (rows, n) rather than write into it (the CPU engine's hands
    /// its GEMM's output over instead of copying it).
    fn matmul(
        &self,
        x: &Self::Act,
        w: &Self::Weight,
        out: &mut Self::Act,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;

    /// out (rows, width) bf16 = RMSNorm(x (rows, width) f32) * w (width) bf16.
    fn rmsnorm(
        &self,
        x: &Self::F32,
        w: &Self::Weight,
        out: &mut Self::Act,
        rows: usize,
        eps: f32,
    ) -> Result<()>;

    /// out (rows, n) f32 = x (rows, k) . w^T, w: (n, k): `matmul` with f32 output (the head's
    /// logits, which bf16 would round to 1/8 at 20). `exact_input`: the CPU engine's backend
    /// multiplies x as it is rather than rounded to 8 bits (its prefill's last row); the devices
    /// take it as it is either way.
    #[allow(clippy::too_many_arguments)]
    fn matmul_f32(
        &self,
        x: &Self::Act,
        w: &Self::Weight,
        out: &mut Self::F32,
        rows: usize,
        k: usize,
        n: usize,
        exact_input: bool,
    ) -> Result<()>;

    /// Dequantize `n` values of GGUF blocks of type `dtype` (`raw`, the file's bytes, on the
    /// host) into out[offset .. offset + n] as bf16: on a GPU the bytes are uploaded and a
    /// kernel expands them there.
    fn dequant_bf16(
        &self,
        raw: &[u8],
        dtype: GgmlDType,
        n: usize,
        out: &mut Self::Bf16,
        offset: usize,
    ) -> Result<()>;

    /// In place, RMSNorm of each of `n_heads` heads of `head_dim` at `at.offset` in each of
    /// `at.rows` rows of x, times w (head_dim) (Qwen3's per-head q/k norm).
    #[allow(clippy::too_many_arguments)]
    fn head_rmsnorm(
        &self,
        x: &mut Self::Act,
        at: RowSlice,
        w: &Self::Weight,
        n_heads: usize,
        head_dim: usize,
        eps: f32,
    ) -> Result<()>;

    /// x (rows, width) += bias (width), each row (Qwen2's q/k/v biases).
    fn add_bias(
        &self,
        x: &mut Self::Act,
        bias: &Self::Weight,
        rows: usize,
        width: usize,
    ) -> Result<()>;

    /// Rotate, in place, `n_heads` heads of `head_dim` starting at `at.offset` in each of `at.rows`
    /// rows of x, row r by angle positions[r] * inv_freq: pairs (2i, 2i + 1) in the normal
    /// layout, (i, i + head_dim / 2) in NEOX's. cos, sin: (max_positions, head_dim / 2) f32.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Act,
        at: RowSlice,
        positions: &Self::U32,
        cos: &Self::F32,
        sin: &Self::F32,
        n_heads: usize,
        head_dim: usize,
        layout: RopeLayout,
    ) -> Result<()>;

    /// out (rows, width) = silu(gate) * up, gate_up: (rows, 2 * width) = [gate | up].
    fn silu_mul(
        &self,
        gate_up: &Self::Act,
        out: &mut Self::Act,
        rows: usize,
        width: usize,
    ) -> Result<()>;

    /// h (n) f32 += a (n).
    fn residual_add(&self, h: &mut Self::F32, a: &Self::Act) -> Result<()>;

    /// h (rows, hidden) += down(silu(gate) * up) of RMSNorm(h) * norm: the SwiGLU block, in
    /// `scratch`. This composes the ops above over every row at once; a backend may run it a
    /// chunk of rows at a time (the CPU engine's does, as its own forward does, to keep a long
    /// prefill's (rows, intermediate) buffers small).
    #[allow(clippy::too_many_arguments)]
    fn mlp(
        &self,
        h: &mut Self::F32,
        w: MlpWeights<'_, Self>,
        scratch: &mut MlpScratch<Self>,
        rows: usize,
        hidden: usize,
        intermediate: usize,
        eps: f32,
    ) -> Result<()> {
        let (inter, sc) = (intermediate, scratch);
        self.rmsnorm(h, w.norm, &mut sc.x, rows, eps)?;
        self.matmul(&sc.x, w.gate_up, &mut sc.gate_up, rows, hidden, 2 * inter)?;
        self.silu_mul(&sc.gate_up, &mut sc.act, rows, inter)?;
        self.matmul(&sc.act, w.down, &mut sc.out, rows, inter, hidden)?;
        self.residual_add(h, &sc.out)
    }

    /// out (n, width) f32 = table (vocab, width) rows `tokens` (n).
    fn embed(
        &self,
        table: &Self::Weight,
        tokens: &Self::U32,
        out: &mut Self::F32,
        width: usize,
    ) -> Result<()>;

    /// out (n, width) = src rows idx (n, ascending), and out_pos (n) = src_pos rows idx:
    /// hidden states and their positions move together.
    #[allow(clippy::too_many_arguments)]
    fn gather_rows(
        &self,
        src: &Self::F32,
        src_pos: &Self::U32,
        idx: &Self::U32,
        out: &mut Self::F32,
        out_pos: &mut Self::U32,
        width: usize,
    ) -> Result<()>;

    /// Write `at.rows` rows of keys (columns k_col..) and values (v_col..) of qkv, with their
    /// positions, as the layer's sequence rows row0.. through the slot table.
    #[allow(clippy::too_many_arguments)]
    fn kv_append(
        &self,
        qkv: &Self::Act,
        at: RowSlice,
        k_col: usize,
        v_col: usize,
        positions: &Self::U32,
        pool: &mut KvPool<Self>,
        table: &Self::U32,
        row0: usize,
    ) -> Result<()>;

    /// Causal attention over explicit positions (GQA) of the query rows `at` of q against the
    /// first `n_keys` rows of the pool, read through `table`. out: (at.rows, n_heads * head_dim).
    /// `ctx`: what the CPU engine's backend reads besides (the devices need neither).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Act,
        at: RowSlice,
        q_pos: &Self::U32,
        pool: &KvPool<Self>,
        table: &Self::U32,
        n_keys: usize,
        heads: Heads,
        out: &mut Self::Act,
        ctx: &AttentionContext<'_, Self>,
    ) -> Result<()>;

    /// The mean key of each unit of `unit_size` consecutive rows (in row order, as
    /// [`UnitBlocks`] lists them) of the layer's first `prompt_rows` rows, read through `table`:
    /// out (prompt_rows.div_ceil(unit_size), kv_dim) f32. Decode keeps them per slim layer, so
    /// that it scores blocks whose rows are not in the pool.
    fn unit_keys(
        &self,
        pool: &KvPool<Self>,
        table: &Self::U32,
        prompt_rows: usize,
        unit_size: usize,
        out: &mut Self::F32,
    ) -> Result<()>;

    /// SlimInfer block scores of the window queries `at` of q against unit keys
    /// ((units.n_units(), kv_dim) f32, from [`Self::unit_keys`]), added to acc
    /// (n_prompt_blocks) at each block's id.
    #[allow(clippy::too_many_arguments)]
    fn unit_scores(
        &self,
        q: &Self::Act,
        at: RowSlice,
        unit_keys: &Self::F32,
        units: &UnitBlocks,
        heads: Heads,
        mode: ScoreMode,
        acc: &mut Self::F32,
    ) -> Result<()>;

    /// SlimInfer block scores of the window queries `at` of q against the layer's first
    /// `prompt_rows` rows (its prompt rows), added to acc (n_prompt_blocks) at each block's id:
    /// [`Self::unit_keys`] then [`Self::unit_scores`].
    #[allow(clippy::too_many_arguments)]
    fn block_scores(
        &self,
        q: &Self::Act,
        at: RowSlice,
        pool: &KvPool<Self>,
        table: &Self::U32,
        prompt_rows: usize,
        units: &UnitBlocks,
        unit_size: usize,
        heads: Heads,
        mode: ScoreMode,
        acc: &mut Self::F32,
    ) -> Result<()> {
        let n_units = prompt_rows.div_ceil(unit_size);
        if units.n_units() != n_units || n_units == 0 {
            return Err(crate::Error::Engine(format!(
                "block_scores: {} units listed for {prompt_rows} prompt rows in units of {unit_size}",
                units.n_units()
            )));
        }
        let mut keys = self.zeros_f32(n_units * pool.kv_dim)?;
        self.unit_keys(pool, table, prompt_rows, unit_size, &mut keys)?;
        self.unit_scores(q, at, &keys, units, heads, mode, acc)
    }

    /// Start copying slots `slots` of a pool to new host blocks (block i holds slot
    /// `slots[i]`) behind the work queued so far: on a GPU the rows are staged on the device
    /// and cross PCIe on the copy stream while later work runs; the pool may be regrouped or
    /// dropped as soon as this returns.
    fn kv_offload(&self, pool: &KvPool<Self>, slots: &[u32]) -> Result<Self::HostBlocks>;

    /// Copy host blocks into pool slots, each `(host block, slot)`, in one transfer, before
    /// anything queued after this reads the pool (waits for the blocks' offload to land).
    fn kv_fetch(
        &self,
        host: &Self::HostBlocks,
        writes: &[(usize, u32)],
        pool: &mut KvPool<Self>,
    ) -> Result<()>;

    /// Keys and values of host block `i` as words, where the backend's host blocks are plain
    /// process memory (the spill file writes them, and a block read back from it replaces
    /// them); None where they are not (the default: no spill file).
    fn host_block_words<'h>(
        &self,
        host: &'h mut Self::HostBlocks,
        i: usize,
    ) -> Option<(&'h mut [u16], &'h mut [u16])> {
        let _ = (host, i);
        None
    }

    /// A new pool of `slots` slots, empty but for `moves` (source slot, slot) copied from
    /// `src` on the device: a tier's fast pool shrunk or grown without a trip to the host.
    fn kv_pool_regrouped(
        &self,
        src: &KvPool<Self>,
        moves: &[(u32, u32)],
        slots: usize,
    ) -> Result<KvPool<Self>>;

    /// Copy whole slots within a pool: slot dst_slots[i] = slot src_slots[i], keys, values
    /// and positions.
    fn kv_copy_blocks(
        &self,
        pool: &mut KvPool<Self>,
        src_slots: &[u32],
        dst_slots: &[u32],
    ) -> Result<()>;
}

/// A backend whose activations and weights are its bf16 buffers (the GPU and its CPU reference),
/// so that one buffer can be any operand: what the kernel checks compare.
pub trait DeviceOps: Ops<Act = <Self as Ops>::Bf16, Weight = <Self as Ops>::Bf16> {}
impl<O: Ops<Act = <O as Ops>::Bf16, Weight = <O as Ops>::Bf16>> DeviceOps for O {}

/// [`Ops::weight`] on a device: the values expanded to bf16 one after another (a model file's
/// tensors by [`Ops::dequant_bf16`]), whatever the use.
pub fn bf16_weight<O: DeviceOps>(ops: &O, values: WeightValues, n: usize) -> Result<O::Bf16> {
    let mut out = ops.zeros_bf16(n)?;
    match values {
        WeightValues::Gguf(parts) => {
            let total: usize = parts.iter().map(|(_, n)| n).sum();
            if total != n {
                return Err(crate::Error::ModelLoad(format!(
                    "a weight of {total} values where the model's dimensions need {n}"
                )));
            }
            let mut at = 0;
            for (t, len) in parts {
                if let Some(t) = t {
                    ops.dequant_bf16(&t.data()?, t.dtype(), len, &mut out, at)?;
                }
                at += len;
            }
        }
        WeightValues::Uniform { seed, scale } => ops.fill_uniform(&mut out, seed, scale)?,
        WeightValues::Ones => out = ops.upload_bf16(&vec![0x3f80u16; n])?, // bf16 1.0
    }
    Ok(out)
}
