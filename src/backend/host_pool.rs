//! Paged KV pools in host memory: the pool operations of the CPU backends of the ops seam
//! ([`super::cpu_ops::CpuOps`], the devices' reference, and [`super::engine_ops::EngineOps`], the
//! CPU engine's), over bf16 keys and values in plain vectors. Each backend hands its own
//! activations in as rows (keys and values as bf16 bits, queries as f32).

use super::attention::{attention as tiled_attention, scale_queries};
use super::decode_attention::KeyRun;
use super::kv_format::{first_key_scale, unscale_keys, KvDtype, KvView};
use super::ops::{check_slots, Heads, KvPool, Ops, ScoreMode, UnitBlocks, KV_BLOCK};
use super::score::{UnitKeys, WindowPool};
use crate::{Error, Result};

/// A backend whose pools and host tier live in host memory as plain vectors.
pub trait HostPools: Ops<Bf16 = Vec<u16>, U32 = Vec<u32>, HostBlocks = Vec<SlotCopy>> {}
impl<O: Ops<Bf16 = Vec<u16>, U32 = Vec<u32>, HostBlocks = Vec<SlotCopy>>> HostPools for O {}

/// The CPU's host blocks ([`Ops::HostBlocks`]): one slot of a [`KvPool`] each, keys and values
/// (KV_BLOCK, row_words) words and the rows' positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCopy {
    pub k: Vec<u16>,
    pub v: Vec<u16>,
    pub pos: Vec<u32>,
}

fn check(what: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(Error::Engine(format!(
            "ops: {what} has {len} elements, needs {want}"
        )));
    }
    Ok(())
}

/// Rows of a pool through a slot table: the slot-major indices of sequence rows 0..n.
fn pool_rows(table: &[u32], n: usize) -> impl Iterator<Item = usize> + '_ {
    (0..n).map(move |s| table[s / KV_BLOCK] as usize * KV_BLOCK + s % KV_BLOCK)
}

/// Every copy holds one slot of `n` keys and values (and KV_BLOCK positions): else an error
/// naming `op`.
fn check_copies<'a>(op: &str, n: usize, copies: impl Iterator<Item = &'a SlotCopy>) -> Result<()> {
    for c in copies {
        if c.k.len() != n || c.v.len() != n || c.pos.len() != KV_BLOCK {
            return Err(Error::Engine(format!(
                "{op}: a copy of {} keys for slots of {n}",
                c.k.len()
            )));
        }
    }
    Ok(())
}

/// [`Ops::kv_append`] of keys and values k, v (rows, row_words), encoded in the pool's type,
/// at `positions` (rows).
pub fn append<O: HostPools>(
    k: &[u16],
    v: &[u16],
    positions: &[u32],
    pool: &mut KvPool<O>,
    table: &[u32],
    row0: usize,
) -> Result<()> {
    let (d, rows) = (pool.row_words(), positions.len());
    check("kv_append keys", k.len().min(v.len()), rows * d)?;
    check("kv_append table", table.len() * KV_BLOCK, row0 + rows)?;
    for (r, &p) in positions.iter().enumerate() {
        let s = row0 + r;
        let dst = table[s / KV_BLOCK] as usize * KV_BLOCK + s % KV_BLOCK;
        pool.k[dst * d..][..d].copy_from_slice(&k[r * d..][..d]);
        pool.v[dst * d..][..d].copy_from_slice(&v[r * d..][..d]);
        pool.pos[dst] = p;
    }
    Ok(())
}

/// [`Ops::kv_append`] of keys and values k, v (rows, kv_dim) f32 narrowed to the pool's type:
/// Q8 keys divided by the layer's channel scale, which its first append sets (as the CPU
/// engine's cache does).
pub fn append_values<O: HostPools>(
    k: &[f32],
    v: &[f32],
    positions: &[u32],
    pool: &mut KvPool<O>,
    table: &[u32],
    row0: usize,
) -> Result<()> {
    let (d, rows) = (pool.kv_dim, positions.len());
    check("kv_append keys", k.len().min(v.len()), rows * d)?;
    let mut keys = k[..rows * d].to_vec();
    if pool.dtype == KvDtype::Q8 {
        if pool.k_scale.is_empty() {
            pool.k_scale = first_key_scale(&keys, d);
        }
        for row in keys.chunks_exact_mut(d) {
            row.iter_mut().zip(&pool.k_scale).for_each(|(x, c)| *x /= c);
        }
    }
    let words = rows * pool.row_words();
    let (mut kw, mut vw) = (vec![0u16; words], vec![0u16; words]);
    pool.dtype.encode(&keys, &mut kw);
    pool.dtype.encode(&v[..rows * d], &mut vw);
    append(&kw, &vw, positions, pool, table, row0)
}

/// The first `n_keys` rows of a pool through its slot table, in row order: keys and values as
/// the pool's words, and positions, copied out of their slots.
#[derive(Default)]
pub struct Rows {
    pub k: Vec<u16>,
    pub v: Vec<u16>,
    pub pos: Vec<u32>,
    pub dtype: KvDtype,
}

impl Rows {
    pub fn of<O: HostPools>(pool: &KvPool<O>, table: &[u32], n_keys: usize) -> Result<Self> {
        let d = pool.row_words();
        check("pool table", table.len() * KV_BLOCK, n_keys)?;
        let (mut k, mut v) = (
            Vec::with_capacity(n_keys * d),
            Vec::with_capacity(n_keys * d),
        );
        let mut pos = Vec::with_capacity(n_keys);
        for row in pool_rows(table, n_keys) {
            k.extend_from_slice(&pool.k[row * d..][..d]);
            v.extend_from_slice(&pool.v[row * d..][..d]);
            pos.push(pool.pos[row]);
        }
        Ok(Self {
            k,
            v,
            pos,
            dtype: pool.dtype,
        })
    }

    pub fn view(&self) -> KvView<'_> {
        KvView {
            k: &self.k,
            v: &self.v,
            positions: &self.pos,
            dtype: self.dtype,
        }
    }
}

/// The first `n_keys` rows of a pool in row order: where its table lists slots 0, 1, 2, ... (a
/// prefill's pool) the pool's own memory, else a copy.
pub enum PoolRows<'a> {
    InPlace(KvView<'a>),
    Copied(Rows),
}

impl<'a> PoolRows<'a> {
    pub fn of<O: HostPools>(pool: &'a KvPool<O>, table: &[u32], n_keys: usize) -> Result<Self> {
        let blocks = n_keys.div_ceil(KV_BLOCK);
        check("pool table", table.len(), blocks)?;
        if !(table[..blocks].iter().enumerate()).all(|(i, &s)| s as usize == i) {
            return Ok(Self::Copied(Rows::of(pool, table, n_keys)?));
        }
        let d = pool.row_words();
        Ok(Self::InPlace(KvView {
            k: &pool.k[..n_keys * d],
            v: &pool.v[..n_keys * d],
            positions: &pool.pos[..n_keys],
            dtype: pool.dtype,
        }))
    }

    pub fn view(&self) -> KvView<'_> {
        match self {
            Self::InPlace(view) => *view,
            Self::Copied(rows) => rows.view(),
        }
    }
}

/// The first `n_keys` rows of a pool in row order as runs of consecutive slots, read where they
/// lie (decode's attention reads them run after run), and the position of the last row.
pub fn runs<'a, O: HostPools>(
    pool: &'a KvPool<O>,
    table: &[u32],
    n_keys: usize,
) -> Result<(Vec<KeyRun<'a>>, Option<u32>)> {
    let blocks = n_keys.div_ceil(KV_BLOCK);
    check("pool table", table.len(), blocks)?;
    check_slots("attention", pool.slots, table[..blocks].iter().copied())?;
    let d = pool.row_words();
    let mut runs: Vec<KeyRun<'a>> = Vec::new();
    let mut start = 0;
    while start < blocks {
        let mut end = start + 1;
        while end < blocks && table[end] == table[end - 1] + 1 {
            end += 1;
        }
        let first = table[start] as usize * KV_BLOCK;
        let rows = (end * KV_BLOCK).min(n_keys) - start * KV_BLOCK;
        runs.push(KeyRun {
            k: &pool.k[first * d..][..rows * d],
            v: &pool.v[first * d..][..rows * d],
        });
        start = end;
    }
    let last = n_keys
        .checked_sub(1)
        .map(|r| pool.pos[table[r / KV_BLOCK] as usize * KV_BLOCK + r % KV_BLOCK]);
    Ok((runs, last))
}

/// [`Ops::attention`] of the queries q (rows, q_dim) f32 at `q_pos` over a pool of any type
/// (Q8 keys' channel scale moved onto the queries), by the f32 kernel: (rows, q_dim) f32.
pub fn attention<O: HostPools>(
    q: &[f32],
    q_pos: &[u32],
    pool: &KvPool<O>,
    table: &[u32],
    n_keys: usize,
    heads: Heads,
) -> Result<Vec<f32>> {
    let rows = PoolRows::of(pool, table, n_keys)?;
    let mut y = vec![0.0; q_pos.len() * heads.q_dim()];
    check("attention queries", q.len(), y.len())?;
    let mut q = q[..y.len()].to_vec();
    scale_queries(&mut q, &pool.k_scale, heads);
    let every_key = 0..n_keys;
    let ranges = std::slice::from_ref(&every_key);
    tiled_attention(&q, q_pos, rows.view(), ranges, heads, &mut y)?;
    Ok(y)
}

/// [`Ops::unit_keys`].
pub fn unit_keys<O: HostPools>(
    pool: &KvPool<O>,
    table: &[u32],
    prompt_rows: usize,
    unit_size: usize,
    out: &mut [f32],
) -> Result<()> {
    let (d, words) = (pool.kv_dim, pool.row_words());
    let n_units = prompt_rows.div_ceil(unit_size);
    check("unit_keys out", out.len(), n_units * d)?;
    let rows: Vec<usize> = pool_rows(table, prompt_rows).collect();
    let mut key = vec![0.0f32; d];
    for (unit, rows) in out.chunks_mut(d).zip(rows.chunks(unit_size)) {
        unit.fill(0.0);
        for &row in rows {
            pool.dtype.decode(&pool.k[row * words..][..words], &mut key);
            unscale_keys(&mut key, &pool.k_scale);
            unit.iter_mut().zip(&key).for_each(|(a, &b)| *a += b);
        }
        unit.iter_mut().for_each(|x| *x /= rows.len() as f32);
    }
    Ok(())
}

/// [`Ops::unit_scores`] of the window queries (rows, q_dim) f32.
pub fn unit_scores(
    window: &[f32],
    unit_keys: &[f32],
    units: &UnitBlocks,
    heads: Heads,
    mode: ScoreMode,
    acc: &mut [f32],
) -> Result<()> {
    let n_units = units.n_units();
    let keys = unit_keys
        .get(..n_units * heads.kv_dim())
        .ok_or_else(|| Error::Engine("unit_scores: fewer unit keys than units".into()))?;
    let mut block = Vec::with_capacity(n_units);
    for (b, &id) in units.ids.iter().enumerate() {
        let span = (units.first[b + 1] - units.first[b]) as usize;
        block.extend(std::iter::repeat_n(id, span));
    }
    let units = UnitKeys::from_parts(heads, keys.to_vec(), block);
    let scores = match mode {
        ScoreMode::Attention => units.attention_scores(window, WindowPool::Mean),
        ScoreMode::AttentionMax => units.attention_scores(window, WindowPool::Max),
        ScoreMode::Paper => units.paper_scores(window),
    };
    for (b, s) in scores {
        acc[b as usize] += s;
    }
    Ok(())
}

/// [`Ops::host_block_words`] of the CPU's host blocks.
pub fn block_words(host: &mut [SlotCopy], i: usize) -> Option<(&mut [u16], &mut [u16])> {
    host.get_mut(i).map(|c| (&mut c.k[..], &mut c.v[..]))
}

/// [`Ops::kv_offload`].
pub fn offload<O: HostPools>(pool: &KvPool<O>, slots: &[u32]) -> Result<Vec<SlotCopy>> {
    let n = KV_BLOCK * pool.row_words();
    check_slots("kv_offload", pool.slots, slots.iter().copied())?;
    Ok((slots.iter().map(|&s| s as usize))
        .map(|s| SlotCopy {
            k: pool.k[s * n..][..n].to_vec(),
            v: pool.v[s * n..][..n].to_vec(),
            pos: pool.pos[s * KV_BLOCK..][..KV_BLOCK].to_vec(),
        })
        .collect())
}

/// [`Ops::kv_fetch`].
pub fn fetch<O: HostPools>(
    host: &[SlotCopy],
    writes: &[(usize, u32)],
    pool: &mut KvPool<O>,
) -> Result<()> {
    let n = KV_BLOCK * pool.row_words();
    check_slots("kv_fetch", pool.slots, writes.iter().map(|w| w.1))?;
    let copies = (writes.iter())
        .map(|&(b, s)| host.get(b).map(|c| (s as usize, c)))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Engine("kv_fetch: a block past the host store".into()))?;
    check_copies("kv_fetch", n, copies.iter().map(|c| c.1))?;
    for (s, copy) in copies {
        pool.k[s * n..][..n].copy_from_slice(&copy.k);
        pool.v[s * n..][..n].copy_from_slice(&copy.v);
        pool.pos[s * KV_BLOCK..][..KV_BLOCK].copy_from_slice(&copy.pos);
    }
    Ok(())
}

/// [`Ops::kv_pool_regrouped`].
pub fn regrouped<O: HostPools>(
    ops: &O,
    src: &KvPool<O>,
    moves: &[(u32, u32)],
    slots: usize,
) -> Result<KvPool<O>> {
    let n = KV_BLOCK * src.row_words();
    check_slots("kv_pool_regrouped", src.slots, moves.iter().map(|m| m.0))?;
    check_slots("kv_pool_regrouped", slots, moves.iter().map(|m| m.1))?;
    let mut pool = KvPool::typed(ops, slots, src.kv_dim, src.dtype)?;
    pool.k_scale = src.k_scale.clone();
    for &(s, t) in moves {
        let (s, t) = (s as usize, t as usize);
        pool.k[t * n..][..n].copy_from_slice(&src.k[s * n..][..n]);
        pool.v[t * n..][..n].copy_from_slice(&src.v[s * n..][..n]);
        pool.pos[t * KV_BLOCK..][..KV_BLOCK].copy_from_slice(&src.pos[s * KV_BLOCK..][..KV_BLOCK]);
    }
    Ok(pool)
}

/// [`Ops::kv_copy_blocks`].
pub fn copy_blocks<O: HostPools>(pool: &mut KvPool<O>, src_slots: &[u32], dst_slots: &[u32]) {
    let n = KV_BLOCK * pool.row_words();
    for (&s, &t) in src_slots.iter().zip(dst_slots) {
        let (s, t) = (s as usize, t as usize);
        pool.k.copy_within(s * n..(s + 1) * n, t * n);
        pool.v.copy_within(s * n..(s + 1) * n, t * n);
        pool.pos
            .copy_within(s * KV_BLOCK..(s + 1) * KV_BLOCK, t * KV_BLOCK);
    }
}
