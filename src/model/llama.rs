//! The LLaMA forward (Touvron et al., <https://arxiv.org/abs/2302.13971>), read top-down:
//! embed → N × (RMSNorm → attention → residual → RMSNorm → SwiGLU MLP → residual) → RMSNorm → head.
//!
//! Hidden states travel as (rows, hidden) together with one position id per row. RoPE and the
//! causal mask are built from those positions, never from an offset, so rows can be dropped
//! between layers (SlimInfer) without changing the meaning of the rest. Each layer appends its
//! keys and values to its own cache, which the caller owns.
//!
//! The same forward runs the GGUF architectures `llama`, `mistral`, `qwen2` and `qwen3`, whose
//! differences [`ModelSpec`] records: q/k/v biases when the file has them (Qwen2), a per-head
//! RMSNorm of q and k before RoPE (Qwen3), the RoPE layout (normal or NEOX), and a head width
//! that need not be hidden / heads (Qwen3: the attention output is n_heads * head_dim wide).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::backend::attention::AttnShape;
use crate::backend::linear::{FusedLinear, Linear, LinearMode};
use crate::backend::rowwise::{rms_norm, row_chunks, silu_mul_joined, MLP_ROWS};
use crate::backend::rowwise::{Rope, RopeLayout, RopeParams};
use crate::backend::{tensor2, with_f32};
use crate::kv::policy::{Dense, LayerPolicy, Revived, RowChange};
use crate::kv::KvCache;
use crate::model::gguf::{GgufFile, ModelSpec, RopeScaling, RopeStyle};
use crate::{Error, Result};

struct Attention {
    /// q, k, v
    wqkv: FusedLinear,
    /// (n_heads * hd + 2 * n_kv_heads * hd): the q, k and v biases side by side (Qwen2), zeros
    /// for one the file lacks; None when the layer has none
    bias: Option<Vec<f32>>,
    /// (hd) each: the per-head RMSNorm weights of q and k (Qwen3)
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    wo: Linear,
    shape: AttnShape,
}

impl Attention {
    fn load(f: &mut GgufFile, i: usize, spec: &ModelSpec, mode: LinearMode) -> Result<Self> {
        let (q_dim, kv_dim) = (spec.q_dim(), spec.kv_dim());
        let parts = [("q", q_dim), ("k", kv_dim), ("v", kv_dim)];
        let qkv = parts.map(|(p, width)| (format!("blk.{i}.attn_{p}.weight"), width));
        let qk_norm = if spec.qk_norm {
            let norm = |f: &mut GgufFile, p| {
                vector(f, &format!("blk.{i}.attn_{p}_norm.weight"), spec.head_dim)
            };
            Some((norm(f, "q")?, norm(f, "k")?))
        } else {
            None
        };
        Ok(Self {
            wqkv: fused(f, &qkv, spec.hidden, mode)?,
            bias: qkv_bias(f, i, &parts)?,
            qk_norm,
            wo: linear(
                f,
                &format!("blk.{i}.attn_output.weight"),
                (spec.hidden, q_dim),
                mode,
            )?,
            shape: AttnShape {
                n_heads: spec.n_heads,
                n_kv_heads: spec.n_kv_heads,
                head_dim: spec.head_dim,
            },
        })
    }

    /// h: (rows, hidden), positions: (rows) -> h + attention(RMSNorm(h)) (rows, hidden); appends
    /// the rows' K/V to layer `ctx.layer` of `kv` and returns the post-RoPE queries of the last
    /// `ctx.policy.query_rows()` rows (all rows when fewer), (n, n_heads * hd), for the policy to
    /// score with. The normed input and the projections run in chunks of `CHUNK_ROWS` rows; the
    /// attention output is written over q, and the residual sum over the attention output: a
    /// long prefill holds h, q, k and v at once, nothing more. h is taken, and freed on return.
    fn forward(
        &self,
        h: Tensor,
        norm_weight: &[f32],
        positions: &[u32],
        kv: &mut KvCache,
        ctx: &mut LayerCtx,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = h.dims2()?.0;
        // q: (rows, n_heads * hd); k, v: (rows, n_kv_heads * hd)
        let [q, k, v] = self.qkv(&h, norm_weight, positions, ctx)?;
        // the layer's block copies (KV manager) land before it appends and attends
        kv.before_layer(ctx.layer);
        kv.append(ctx.layer, &k, &v, positions, &*ctx.policy)?;
        // a policy may choose this layer's keys from these queries; the manager fetches them
        ctx.policy
            .before_attention(ctx.layer, &q, positions, kv.layer(ctx.layer))?;
        kv.before_attention(ctx.layer, &*ctx.policy)?;
        // not always hidden (Qwen3)
        let q_dim = self.shape.n_heads * self.shape.head_dim;
        // the policy reads only the last rows' queries after the layer
        let tail = ctx.policy.query_rows().min(rows);
        let q_tail = q[(rows - tail) * q_dim..].to_vec();
        // the attention output, (rows, n_heads * hd), is written over q
        let mut out = q;
        let fresh = Some((&k[..], &v[..]));
        kv.attend(
            ctx.layer,
            &mut out,
            positions,
            fresh,
            &*ctx.policy,
            self.shape,
        )?;
        drop((k, v));
        Ok((self.residual(&h, out)?, q_tail))
    }

    /// h + wo(out) (rows, hidden) for the attention output `out` (rows, n_heads * hd), in chunks
    /// of `CHUNK_ROWS` rows, written over `out` when it is as wide as h (all but some Qwen3).
    fn residual(&self, h: &Tensor, mut out: Vec<f32>) -> Result<Vec<f32>> {
        let (rows, hidden) = h.dims2()?;
        let h = h.contiguous()?;
        let q_dim = self.shape.n_heads * self.shape.head_dim;
        let mut wider = (q_dim != hidden).then(|| vec![0.0f32; rows * hidden]);
        for r in row_chunks(rows, CHUNK_ROWS) {
            let x = &out[r.start * q_dim..r.end * q_dim];
            let term = self.wo.forward_slice(x, q_dim)?;
            let span = r.start * hidden..r.end * hidden;
            let dst = match &mut wider {
                Some(sum) => &mut sum[span.clone()],
                None => &mut out[span.clone()], // this chunk's output has been read
            };
            with_f32(&h, |h| {
                with_f32(&term.contiguous()?, |t| {
                    dst.iter_mut()
                        .zip(&h[span])
                        .zip(t)
                        .for_each(|((d, a), b)| *d = a + b);
                })
            })??;
        }
        Ok(wider.unwrap_or(out))
    }

    /// h: (rows, hidden) -> q (rows, n_heads * hd), k and v (rows, n_kv_heads * hd) of
    /// RMSNorm(h), in chunks of `CHUNK_ROWS` rows.
    fn qkv(
        &self,
        h: &Tensor,
        norm_weight: &[f32],
        positions: &[u32],
        ctx: &LayerCtx,
    ) -> Result<[Vec<f32>; 3]> {
        let rows = h.dims2()?.0;
        let widths = self.wqkv.widths();
        let mut parts: [Vec<f32>; 3] =
            std::array::from_fn(|i| Vec::with_capacity(rows * widths[i]));
        for r in row_chunks(rows, CHUNK_ROWS) {
            let x = norm(&h.narrow(0, r.start, r.len())?, norm_weight, ctx.eps)?;
            self.qkv_rows(&x, &positions[r], ctx, &mut parts)?;
        }
        Ok(parts)
    }

    /// x: (rows, hidden) -> q (rows, n_heads * hd), k and v (rows, n_kv_heads * hd): projected,
    /// biased, q and k normed per head (Qwen3), then q and k rotated; appended to `parts`.
    fn qkv_rows(
        &self,
        x: &Tensor,
        positions: &[u32],
        ctx: &LayerCtx,
        parts: &mut [Vec<f32>; 3],
    ) -> Result<()> {
        let mut joined = self.wqkv.forward(x)?; // (rows, q_dim + 2 kv_dim)
        if let Some(bias) = &self.bias {
            for row in joined.chunks_exact_mut(bias.len()) {
                row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
            }
        }
        let starts = parts.each_ref().map(Vec::len);
        append_columns(&joined, self.wqkv.widths(), parts);
        drop(joined);
        let [q, k, _] = parts;
        let (q, k) = (&mut q[starts[0]..], &mut k[starts[1]..]);
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            // (rows * heads, hd): one RMSNorm per head
            q.copy_from_slice(&rms_norm_rows(q, q_norm, ctx.eps));
            k.copy_from_slice(&rms_norm_rows(k, k_norm, ctx.eps));
        }
        ctx.rope.apply(q, positions)?;
        ctx.rope.apply(k, positions)?;
        Ok(())
    }
}

/// The q, k and v biases of layer `i` side by side, zeros for one the file lacks; None when it
/// has none. llama.cpp loads each if present, in every architecture (Qwen2 has all three).
fn qkv_bias(f: &mut GgufFile, i: usize, parts: &[(&str, usize); 3]) -> Result<Option<Vec<f32>>> {
    let name = |p: &str| format!("blk.{i}.attn_{p}.bias");
    if !parts.iter().any(|(p, _)| f.has_tensor(&name(p))) {
        return Ok(None);
    }
    let mut joined = Vec::with_capacity(parts.iter().map(|(_, w)| w).sum());
    for &(p, width) in parts {
        if f.has_tensor(&name(p)) {
            joined.extend(vector(f, &name(p), width)?);
        } else {
            joined.resize(joined.len() + width, 0.0);
        }
    }
    Ok(Some(joined))
}

/// (rows, Σ widths) with N parts side by side: part i's (rows, width_i) appended to parts[i].
fn append_columns<const N: usize>(joined: &[f32], widths: &[usize], parts: &mut [Vec<f32>; N]) {
    assert_eq!(
        widths.len(),
        N,
        "append_columns: {} parts, want {N}",
        widths.len()
    );
    let total: usize = widths.iter().sum();
    for row in joined.chunks_exact(total) {
        let mut start = 0;
        for (p, &w) in parts.iter_mut().zip(widths) {
            p.extend_from_slice(&row[start..start + w]);
            start += w;
        }
    }
}

/// Rows per chunk of a long prefill's q/k/v and output projections: the chunk's normed input
/// and joined q/k/v are small next to the full q, k and v they fill.
const CHUNK_ROWS: usize = 1024;

/// h += f(rows of h) for h (rows, hidden), in chunks of at most `max` rows: `f` gets a chunk's
/// rows, (len, hidden) row-major, and gives their (len, hidden) term.
fn add_in_place(
    h: &mut [f32],
    hidden: usize,
    max: usize,
    mut f: impl FnMut(&[f32]) -> Result<Tensor>,
) -> Result<()> {
    for r in row_chunks(h.len() / hidden, max) {
        let rows = &mut h[r.start * hidden..r.end * hidden];
        let term = f(rows)?;
        with_f32(&term.contiguous()?, |t| {
            rows.iter_mut().zip(t).for_each(|(a, b)| *a += b);
        })?;
    }
    Ok(())
}

struct Mlp {
    /// gate, up
    gate_up: FusedLinear,
    down: Linear,
}

impl Mlp {
    fn load(f: &mut GgufFile, i: usize, spec: &ModelSpec, mode: LinearMode) -> Result<Self> {
        let (hidden, inter) = (spec.hidden, spec.intermediate);
        let gate_up = ["gate", "up"].map(|p| (format!("blk.{i}.ffn_{p}.weight"), inter));
        let down = format!("blk.{i}.ffn_down.weight");
        Ok(Self {
            gate_up: fused(f, &gate_up, hidden, mode)?,
            down: linear(f, &down, (hidden, inter), mode)?,
        })
    }

    /// h (rows, hidden) += MLP(RMSNorm(h)), in chunks of `MLP_ROWS` rows: the (rows,
    /// intermediate) gate, up and product are the largest activations of a long prefill, and
    /// the normed input exists only a chunk at a time.
    fn forward(&self, h: &mut [f32], norm_weight: &[f32], eps: f32) -> Result<()> {
        add_in_place(h, norm_weight.len(), MLP_ROWS, |x| {
            self.forward_rows(&norm_rows(x, norm_weight, eps)?)
        })
    }

    fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dims2()?.0;
        let width = self.gate_up.widths()[0]; // intermediate
        let gate_up = self.gate_up.forward(x)?; // (rows, 2 intermediate): gate, up
        let mut act = vec![0.0f32; rows * width];
        silu_mul_joined(&gate_up, width, &mut act);
        Ok(self.down.forward(&tensor2(act, rows, width)?)?)
    }
}

struct Block {
    attn_norm: Vec<f32>,
    attn: Attention,
    mlp_norm: Vec<f32>,
    mlp: Mlp,
}

impl Block {
    fn load(f: &mut GgufFile, i: usize, spec: &ModelSpec, mode: LinearMode) -> Result<Self> {
        Ok(Self {
            attn_norm: vector(f, &format!("blk.{i}.attn_norm.weight"), spec.hidden)?,
            attn: Attention::load(f, i, spec, mode)?,
            mlp_norm: vector(f, &format!("blk.{i}.ffn_norm.weight"), spec.hidden)?,
            mlp: Mlp::load(f, i, spec, mode)?,
        })
    }

    /// h: (rows, hidden) with one position per row -> (rows, hidden), plus the queries of the
    /// layer's last `ctx.policy.query_rows()` rows
    fn forward(
        &self,
        h: Tensor,
        positions: &[u32],
        kv: &mut KvCache,
        ctx: &mut LayerCtx,
    ) -> Result<(Tensor, Vec<f32>)> {
        // h is taken, not borrowed: the layer's input is freed once the attention's residual
        // sum exists, and the MLP adds into that sum in place
        let (rows, hidden) = h.dims2()?;
        let (mut h, q) = self.attn.forward(h, &self.attn_norm, positions, kv, ctx)?;
        self.mlp.forward(&mut h, &self.mlp_norm, ctx.eps)?;
        Ok((tensor2(h, rows, hidden)?, q))
    }
}

/// What a layer needs besides its weights and cache.
struct LayerCtx<'a> {
    layer: usize,
    rope: &'a Rope,
    eps: f32,
    policy: &'a mut dyn LayerPolicy,
}

/// Keep rows `keep` of h (rows, hidden) and of `positions`; the last row must be among them.
fn gather_rows(h: &Tensor, positions: &mut Vec<u32>, keep: &[usize]) -> Result<Tensor> {
    let rows = positions.len();
    let ascending = keep.windows(2).all(|w| w[0] < w[1]);
    if !ascending || keep.last() != Some(&(rows - 1)) {
        return Err(Error::Engine(format!(
            "row policy kept {} of {rows} rows without the last one, or out of order",
            keep.len()
        )));
    }
    let idx: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
    *positions = keep.iter().map(|&i| positions[i]).collect();
    Ok(h.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, 0)?)
}

/// Gather the kept rows, then put the inserted rows in front.
fn apply_row_change(h: Tensor, positions: &mut Vec<u32>, change: RowChange) -> Result<Tensor> {
    let mut h = if change.keep.len() == positions.len() {
        h
    } else {
        gather_rows(&h, positions, &change.keep)?
    };
    if let Some((extra, extra_pos)) = change.insert {
        let Revived::Rows(extra) = extra else {
            return Err(Error::Engine(
                "row policy revived rows held on another device".into(),
            ));
        };
        let ordered = extra_pos.windows(2).all(|w| w[0] < w[1])
            && (extra_pos.last().zip(positions.first())).is_none_or(|(a, b)| a < b);
        if !ordered || extra.dims2()?.0 != extra_pos.len() {
            return Err(Error::Engine(format!(
                "row policy inserted {} rows out of order or without their positions",
                extra_pos.len()
            )));
        }
        h = Tensor::cat(&[&extra, &h], 0)?;
        positions.splice(0..0, extra_pos);
    }
    Ok(h)
}

/// The RoPE of a model's hyper-parameters, as the backend's kernel takes it.
impl From<&ModelSpec> for RopeParams {
    fn from(spec: &ModelSpec) -> Self {
        RopeParams {
            head_dim: spec.head_dim,
            rope_dim: spec.rope_dim,
            theta: spec.rope_theta,
            linear_scaling: match spec.rope_scaling {
                RopeScaling::None => 1.0,
                RopeScaling::Linear(f) => f,
            },
            layout: match spec.rope_style {
                RopeStyle::Normal => RopeLayout::Normal,
                RopeStyle::Neox => RopeLayout::Neox,
            },
        }
    }
}

/// A loaded LLaMA-family model.
pub struct Llama {
    pub spec: ModelSpec,
    /// (vocab, hidden), quantized; rows are dequantized on lookup. None when the head is tied to
    /// the embedding and holds its rows itself (one copy of the matrix, not two).
    embed: Option<Arc<QTensor>>,
    blocks: Vec<Block>,
    final_norm: Vec<f32>,
    head: Linear,
    rope: Rope,
}

impl Llama {
    pub fn load(f: &mut GgufFile, mode: LinearMode) -> Result<Self> {
        let spec = f.spec()?;
        check_tensors_are_known(f, &spec)?;
        let vocab_by_hidden = (spec.vocab_size, spec.hidden);
        let embed = weight(f, "token_embd.weight", vocab_by_hidden)?;
        let head_weights = if f.has_tensor("output.weight") {
            weight(f, "output.weight", vocab_by_hidden)?
        } else {
            embed.clone() // tied embeddings
        };
        // Llama 3.1's per-frequency divisors of the RoPE angles, one per rotated pair
        let freq_factors = if f.has_tensor("rope_freqs.weight") {
            Some(vector(f, "rope_freqs.weight", spec.rope_dim / 2)?)
        } else {
            None
        };
        let blocks = (0..spec.n_layers)
            .map(|i| Block::load(f, i, &spec, mode))
            .collect::<Result<Vec<_>>>()?;
        let tied = Arc::ptr_eq(&embed, &head_weights);
        let head = Linear::one_row(head_weights, mode)?;
        let embed = match head.weight_rows(&[0]) {
            Some(_) if tied => None,
            _ => Some(embed),
        };
        Ok(Self {
            rope: Rope::new(
                &RopeParams::from(&spec),
                freq_factors.as_deref(),
                spec.context_length,
            ),
            final_norm: vector(f, "output_norm.weight", spec.hidden)?,
            head,
            embed,
            blocks,
            spec,
        })
    }

    /// Run `tokens` at `positions` through every layer, appending to `kv`, and return the
    /// logits of the last row. Between layers `policy` may drop rows (hidden states and their
    /// positions together). `on_layer(i, rows)` is called after layer i ran on `rows` rows.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        kv: &mut KvCache,
        policy: &mut dyn LayerPolicy,
        on_layer: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        let (h, positions) = self.layers(tokens, positions, kv, policy, on_layer)?;
        let last = h.narrow(0, positions.len() - 1, 1)?; // (1, hidden)
        let last = norm(&last, &self.final_norm, self.spec.rms_eps)?;
        // Decode's head takes Q8-rounded activations (the GEMV); a prefill's stays in f32.
        let logits = if tokens.len() == 1 {
            self.head.forward(&last)?
        } else {
            self.head.forward_f32(&last)?
        };
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Run `tokens` at `positions` through every layer with no pruning (every row goes on),
    /// appending to `kv`, and return the logits of rows `from..`: (rows - from, vocab). The head
    /// takes these rows as one batch through the linear mode's many-row path (int8: the GEMM,
    /// Q8-rounded activations, as llama.cpp's head on the CPU), so a row's logits can differ
    /// from `forward`'s f32 head by that rounding. For teacher-forced scoring (perplexity).
    pub fn logits_from(
        &self,
        tokens: &[u32],
        positions: &[u32],
        from: usize,
        kv: &mut KvCache,
    ) -> Result<Tensor> {
        if from >= tokens.len() {
            return Err(Error::Engine(format!(
                "logits_from: row {from} of {} tokens",
                tokens.len()
            )));
        }
        let (h, _) = self.layers(tokens, positions, kv, &mut Dense, &mut |_, _| {})?;
        let rows = h.narrow(0, from, tokens.len() - from)?; // (rows - from, hidden)
        let rows = norm(&rows, &self.final_norm, self.spec.rms_eps)?;
        Ok(self.head.forward(&rows)?) // (rows - from, vocab)
    }

    /// Every layer on `tokens` at `positions` -> the last layer's hidden states (kept rows,
    /// hidden) and their positions; `policy` may drop rows between layers.
    fn layers(
        &self,
        tokens: &[u32],
        positions: &[u32],
        kv: &mut KvCache,
        policy: &mut dyn LayerPolicy,
        on_layer: &mut dyn FnMut(usize, usize),
    ) -> Result<(Tensor, Vec<u32>)> {
        self.check_inputs(tokens, positions, kv)?;
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut h = match &self.embed {
            Some(table) => table.embedding(&ids)?,
            None => self
                .head
                .weight_rows(tokens)
                .ok_or_else(|| Error::Engine("forward: the tied head has no rows".into()))?,
        }; // (rows, hidden)
        let mut positions = positions.to_vec(); // (rows)
        for (i, block) in self.blocks.iter().enumerate() {
            let mut ctx = LayerCtx {
                layer: i,
                rope: &self.rope,
                eps: self.spec.rms_eps,
                policy: &mut *policy,
            };
            let (out, q) = block.forward(h, &positions, kv, &mut ctx)?;
            h = out;
            let rows = positions.len();
            on_layer(i, rows);
            if let Some(change) = policy.after_layer(i, &h, &q, &positions, kv.layer(i))? {
                h = apply_row_change(h, &mut positions, change)?;
            }
            // the policy may have switched a stage's blocks: the KV manager evicts and prefetches
            kv.after_layer(i, rows, &*policy)?;
        }
        Ok((h, positions))
    }

    fn check_inputs(&self, tokens: &[u32], positions: &[u32], kv: &KvCache) -> Result<()> {
        if tokens.is_empty() || tokens.len() != positions.len() {
            return Err(Error::Engine(format!(
                "forward: {} tokens with {} positions",
                tokens.len(),
                positions.len()
            )));
        }
        if kv.layers.len() != self.blocks.len() {
            return Err(Error::Engine(format!(
                "forward: cache has {} layers, model {}",
                kv.layers.len(),
                self.blocks.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.spec.vocab_size) {
            return Err(Error::Engine(format!(
                "forward: token id {t} is outside the vocabulary of {}",
                self.spec.vocab_size
            )));
        }
        if let Some(&p) = positions
            .iter()
            .find(|&&p| p as usize >= self.rope.max_positions())
        {
            return Err(Error::Prompt(format!(
                "position {p} is beyond the model's context of {}",
                self.rope.max_positions()
            )));
        }
        Ok(())
    }
}

/// Tensors that would change the forward but that it has no place for (fused q/k/v, output
/// and MLP biases, experts, long-context RoPE factors): refuse the file rather than run it wrong.
const UNSUPPORTED_TENSORS: &[&str] = &[
    "attn_qkv.weight",
    "attn_output.bias",
    "ffn_gate.bias",
    "ffn_up.bias",
    "ffn_down.bias",
    "ffn_gate_inp.weight",
    "output.bias",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
];

fn check_tensors_are_known(f: &GgufFile, spec: &ModelSpec) -> Result<()> {
    let mut names: Vec<&String> = f.content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        // "blk.3.attn_output.bias" -> "attn_output.bias"
        let base = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .map_or(name.as_str(), |(_, base)| base);
        if UNSUPPORTED_TENSORS.contains(&base) {
            return Err(Error::ModelLoad(format!(
                "{}: tensor {name} is not supported by slimchat's {} forward",
                f.path.display(),
                spec.arch
            )));
        }
    }
    Ok(())
}

/// Read a weight matrix, checking it is (rows, cols) = (out, in) as the metadata implies.
fn weight(f: &mut GgufFile, name: &str, (rows, cols): (usize, usize)) -> Result<Arc<QTensor>> {
    let w = f.tensor(name)?;
    if w.shape().dims() != [rows, cols] {
        return Err(Error::ModelLoad(format!(
            "{}: tensor {name} is {:?}, expected [{rows}, {cols}] from the metadata",
            f.path.display(),
            w.shape().dims()
        )));
    }
    Ok(Arc::new(w))
}

fn linear(f: &mut GgufFile, name: &str, shape: (usize, usize), mode: LinearMode) -> Result<Linear> {
    Ok(Linear::new(weight(f, name, shape)?, mode)?)
}

/// Layers over the same input of width `cols`, one per (name, output width).
fn fused(
    f: &mut GgufFile,
    parts: &[(String, usize)],
    cols: usize,
    mode: LinearMode,
) -> Result<FusedLinear> {
    let weights = parts
        .iter()
        .map(|(name, rows)| weight(f, name, (*rows, cols)))
        .collect::<Result<Vec<_>>>()?;
    Ok(FusedLinear::new(weights, mode)?)
}

fn vector(f: &mut GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let v = f
        .tensor(name)?
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if v.len() != len {
        return Err(Error::ModelLoad(format!(
            "tensor {name} has {} elements, expected {len}",
            v.len()
        )));
    }
    Ok(v)
}

/// RMSNorm of each row of `weight.len()` values. x: (rows, width) -> (rows, width)
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    rms_norm(x, weight, eps, &mut out);
    out
}

/// RMSNorm of each row. x: (rows, hidden) -> (rows, hidden)
fn norm(x: &Tensor, weight: &[f32], eps: f32) -> Result<Tensor> {
    with_f32(&x.contiguous()?, |x| norm_rows(x, weight, eps))?
}

/// `norm` of rows given as a slice, (rows, weight.len()) row-major.
fn norm_rows(x: &[f32], weight: &[f32], eps: f32) -> Result<Tensor> {
    let hidden = weight.len();
    Ok(tensor2(
        rms_norm_rows(x, weight, eps),
        x.len() / hidden,
        hidden,
    )?)
}
