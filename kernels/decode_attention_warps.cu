// Decode attention (one query row) split over the key range, a warp per stream of keys: the
// kernel the decode of head sizes 64 and 128 runs (decode_attention.cu's tree kernel takes the
// others).
//
// Why: the tree kernel gives each thread one key and walks that key's row element by element
// (32 threads touch 32 rows 2 bytes at a time), then reduces every tile with a dozen
// __syncthreads per head; it ran at a few percent of the H200's bandwidth (0.6 ms a layer at
// 32k keys, where the 134 MB of K and V need ~35 us). Here each lane owns HD / 32 channels, so a
// warp reads a key or value row in one coalesced 128- or 256-byte load, and a warp's keys go
// CHUNK at a time: the chunk's key and value rows loaded together, the next chunk's loads issued
// before this one's math (loads in flight through it), the scores summed over the warp with
// shuffles (every lane ends with every score), one online-softmax update per chunk and head,
// then the weighted values. Every lane keeps the same running max and sum, so nothing is
// reduced per key across the CTA; the CTA's warps merge once at the end.
//
// grid (n_splits, n_kv_heads), block (32 * DW_WARPS). Warp w of split s takes the chunks
// k0 + CHUNK * (w + DW_WARPS * i) of the split's keys [k0, k0 + keys_per_split);
// keys_per_split is a multiple of CHUNK, which divides KV_BLOCK.
// q: (1, q_stride) bf16, head h at columns q_col + h * HD (post-RoPE); q_pos: (1) u32
// k_pool, v_pool: (n_slots, KV_BLOCK, row words) of the variant's element type (kv_types.cuh:
// bf16 unless the name says kvf16 or kvq8; n_kv_heads * HD values a row); pos_pool: (n_slots,
// KV_BLOCK); table: (ceil(n_keys / KV_BLOCK)) u32; k_scale: (n_kv_heads * HD) f32, the keys'
// channel divisors (a Q8 layer's), or null
// part_m, part_l: (n_heads, n_splits) f32 (m in natural-log units); part_o: (n_heads,
// n_splits, HD) f32, as decode_attention_merge_bf16 below reads them
// n_heads / n_kv_heads <= G, the variant's group bound (at most DW_MAX_GROUP)

#define DW_WARPS 4
#define DW_MAX_GROUP 8

// The group's queries, this lane's channels, pre-scaled by the softmax scale and by k_scale
// (a Q8 layer's key channel divisors, kv_dim; null: none) (zeros past the group), and each
// head's online softmax at its start.
template <int HD, int G>
__device__ __forceinline__ void start_group(const bf16* q, int q_col, int kv_head, int group,
                                            int lane, float scale, const float* k_scale,
                                            float (&qr)[G][HD / 32], float (&m)[G],
                                            float (&l)[G], float (&o)[G][HD / 32]) {
    constexpr int DPL = HD / 32;
    const int head0 = kv_head * group;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        u32 w[DPL / 2];
        KvRawBf16::load<DPL>(q + q_col + (head0 + min(g, group - 1)) * HD, lane, w);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const float c = k_scale ? k_scale[kv_head * HD + DPL * lane + i] : 1.f;
            qr[g][i] = g < group ? KvRawBf16::widen(w, i) * c * scale : 0.f;
        }
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[g][i] = 0.f;
    }
}

// The CTA's warps merged into the split's partials: each head's max, sum and values. The
// warps' values go through `wo`, (DW_WARPS, G, HD) f32 of shared memory written after a barrier
// (the staged kernel's are the bytes its buffers held).
template <int HD, int G>
__device__ __forceinline__ void merge_warps(const float (&m)[G], const float (&l)[G],
                                            const float (&o)[G][HD / 32], float (*wm)[G],
                                            float (*wl)[G], float* wo, int group, int head0,
                                            float* part_m, float* part_l, float* part_o) {
    constexpr int DPL = HD / 32;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.x, n_splits = gridDim.x;
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            wm[warp][g] = m[g];
            wl[warp][g] = l[g];
        }
    }
    __syncthreads();  // every warp is past its loop (and the staged kernel's buffers)
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (g >= group) continue;
#pragma unroll
        for (int i = 0; i < DPL; ++i) wo[(warp * G + g) * HD + DPL * lane + i] = o[g][i];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < group * HD; idx += blockDim.x) {
        const int g = idx / HD, d = idx % HD;
        float big = -INFINITY;
        for (int w = 0; w < DW_WARPS; ++w) big = fmaxf(big, wm[w][g]);
        float acc = 0.f, sum = 0.f;
        if (big != -INFINITY) {
            for (int w = 0; w < DW_WARPS; ++w) {
                if (wm[w][g] == -INFINITY) continue;
                const float e = __expf(wm[w][g] - big);
                acc += wo[(w * G + g) * HD + d] * e;
                sum += wl[w][g] * e;
            }
        }
        const size_t part = (size_t)(head0 + g) * n_splits + split;
        part_o[part * HD + d] = acc;
        if (d == 0) {
            part_m[part] = big;
            part_l[part] = sum;
        }
    }
}

// One chunk's online-softmax step for one head: p holds the chunk's scores (-inf where the key
// is invisible, and some key is visible) and becomes their weights e^(s - m_new) (0 where
// invisible); the running max m, sum l and values o move to the new max.
template <int CHUNK, int DPL>
__device__ __forceinline__ void softmax_step(float (&p)[CHUNK], const bool (&vis)[CHUNK],
                                             float& m, float& l, float (&o)[DPL]) {
    float cm = -INFINITY;
#pragma unroll
    for (int j = 0; j < CHUNK; ++j) cm = fmaxf(cm, p[j]);
    const float m_new = fmaxf(m, cm);  // finite: some key of the chunk is visible
    const float corr = __expf(m - m_new);  // 0 while m is -inf
    l *= corr;
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[i] *= corr;
#pragma unroll
    for (int j = 0; j < CHUNK; ++j) {
        p[j] = vis[j] ? __expf(p[j] - m_new) : 0.f;
        l += p[j];
    }
    m = m_new;
}

template <int HD, int G, int CHUNK, bool FUSED, typename KV>
__device__ __forceinline__ void decode_attention_warps(
    const bf16* q, const u32* q_pos, const unsigned short* k_pool, const unsigned short* v_pool,
    const u32* pos_pool, const u32* table, const float* k_scale, float* part_m, float* part_l,
    float* part_o, int q_stride, int q_col, int n_keys, int n_heads, int n_kv_heads,
    int keys_per_split, float scale) {
    constexpr int DPL = HD / 32;
    constexpr int RAW = KV::template raw_words<DPL>;
    __shared__ float wm[DW_WARPS][G], wl[DW_WARPS][G];
    __shared__ float wo[DW_WARPS][G][HD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.x, kv_head = blockIdx.y;
    const int group = n_heads / n_kv_heads, head0 = kv_head * group;
    const int row_words = kv_words(KV::TYPE, n_kv_heads * HD);
    const int head_words = kv_words(KV::TYPE, HD);
    const u32 qp = q_pos[0];
    (void)q_stride;
    float qr[G][DPL], m[G], l[G], o[G][DPL];
    start_group<HD, G>(q, q_col, kv_head, group, lane, scale, k_scale, qr, m, l, o);

    const int k0 = split * keys_per_split;
    const int k1 = min(n_keys, k0 + keys_per_split);
    // chunk c0's rows (every load issued, none used: the values do not depend on the scores),
    // kept as raw words until used; a key past k1 or the query's position is invisible (its
    // key and value read as zeros)
    u32 kr[CHUNK][RAW], vr[CHUNK][RAW];
    bool vis[CHUNK];
    auto load_chunk = [&](int c0, u32 (&kc)[CHUNK][RAW], u32 (&vc)[CHUNK][RAW],
                          bool (&visc)[CHUNK]) {
        // k0 and so c0 are multiples of CHUNK, which divides KV_BLOCK: the chunk's keys lie in
        // one block, and one table read gives every row
        const bool live = c0 < k1;
        const size_t row0 =
            live ? (size_t)table[c0 / KV_BLOCK] * KV_BLOCK + c0 % KV_BLOCK : 0;
        const int nc = live ? min(CHUNK, k1 - c0) : 0;
#pragma unroll
        for (int j = 0; j < CHUNK; ++j) {
            visc[j] = false;
#pragma unroll
            for (int i = 0; i < RAW; ++i) kc[j][i] = vc[j][i] = 0u;
            if (j < nc) {
                const size_t at = (row0 + j) * row_words + kv_head * head_words;
                KV::template load<DPL>(k_pool + at, lane, kc[j]);
                KV::template load<DPL>(v_pool + at, lane, vc[j]);
                visc[j] = pos_pool[row0 + j] <= qp;
            }
        }
    };
    const int step = CHUNK * DW_WARPS;
    load_chunk(k0 + CHUNK * warp, kr, vr, vis);
    for (int c0 = k0 + CHUNK * warp; c0 < k1; c0 += step) {
        // the warp's next chunk is loaded while this one is computed (twice the registers for
        // rows, loads in flight through the math: 1.2 TB/s against 0.6 without, on an H200)
        u32 kn[CHUNK][RAW], vn[CHUNK][RAW];
        bool visn[CHUNK];
        load_chunk(c0 + step, kn, vn, visn);
        bool any = false;
#pragma unroll
        for (int j = 0; j < CHUNK; ++j) any = any || vis[j];
        // uniform over the warp: every lane read the same rows
        if (any) {
            // scores, one online-softmax update per head for the whole chunk; p replaces s.
            // FUSED: each head's weighted values right after its scores (p lives for one head:
            // fewer registers); else every head's scores first, then the values
            float p[FUSED ? 1 : G][CHUNK];
#pragma unroll
            for (int g = 0; g < G; ++g) {
                if (g >= group) continue;
                float(&pg)[CHUNK] = p[FUSED ? 0 : g];
#pragma unroll
                for (int j = 0; j < CHUNK; ++j) {
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < DPL; ++i) s += qr[g][i] * KV::widen(kr[j], i);
                    s = warp_sum(s);
                    pg[j] = vis[j] ? s : -INFINITY;
                }
                softmax_step<CHUNK, DPL>(pg, vis, m[g], l[g], o[g]);
                if constexpr (FUSED) {
#pragma unroll
                    for (int j = 0; j < CHUNK; ++j) {
#pragma unroll
                        for (int i = 0; i < DPL; ++i) o[g][i] += pg[j] * KV::widen(vr[j], i);
                    }
                }
            }
            // the chunk's values, weighted (an invisible key's p is 0 and its value row zeros)
            if constexpr (!FUSED) {
#pragma unroll
                for (int j = 0; j < CHUNK; ++j) {
#pragma unroll
                    for (int g = 0; g < G; ++g) {
                        if (g >= group) continue;
#pragma unroll
                        for (int i = 0; i < DPL; ++i) o[g][i] += p[g][j] * KV::widen(vr[j], i);
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < CHUNK; ++j) {
            vis[j] = visn[j];
#pragma unroll
            for (int i = 0; i < RAW; ++i) {
                kr[j][i] = kn[j][i];
                vr[j][i] = vn[j][i];
            }
        }
    }

    merge_warps<HD, G>(m, l, o, wm, wl, &wo[0][0][0], group, head0, part_m, part_l, part_o);
}

#define DECODE_ATTENTION_WARPS(NAME, HD, G, CHUNK, FUSED, MIN_CTAS, KV)                      \
    extern "C" __global__ void __launch_bounds__(32 * DW_WARPS, MIN_CTAS) NAME(                   \
        const bf16* q, const u32* q_pos, const unsigned short* k_pool,                            \
        const unsigned short* v_pool, const u32* pos_pool, const u32* table,                      \
        const float* k_scale, float* part_m, float* part_l, float* part_o, int q_stride,          \
        int q_col, int n_keys, int n_heads, int n_kv_heads, int keys_per_split, float scale) {    \
        decode_attention_warps<HD, G, CHUNK, FUSED, KV>(                                          \
            q, q_pos, k_pool, v_pool, pos_pool, table, k_scale, part_m, part_l, part_o,          \
            q_stride, q_col, n_keys, n_heads, n_kv_heads, keys_per_split, scale);                 \
    }
// G: the most query heads per KV head the variant holds registers for (a group of 4, as in
// Llama 3 8B, runs the G = 4 one; 5-8, as Qwen2.5-7B's 7, the G = 8 one). Measured on an H200
// (bench/NOTES.md): chunks of 16 without the prefetch ran as fast, and capping registers for 4
// or 6 resident CTAs (spilling) ran two to three times slower. The _fused variant (each head's
// values right after its scores) is timed against the plain one by gpu-check.
DECODE_ATTENTION_WARPS(decode_attention_warps_hd64_g4_bf16, 64, 4, 8, false, 1, KvRawBf16)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd64_g8_bf16, 64, 8, 8, false, 1, KvRawBf16)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd128_g4_bf16, 128, 4, 8, false, 1, KvRawBf16)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd128_g4_fused_bf16, 128, 4, 8, true, 1, KvRawBf16)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd128_g8_bf16, 128, 8, 8, false, 1, KvRawBf16)
// The pools of the other element types (kv_types.cuh): the same kernel, each row's words widened
// in registers (a Q8 row is 1.0625 bytes a value against bf16's 2). The staged kernel below
// copies bf16 rows only.
DECODE_ATTENTION_WARPS(decode_attention_warps_hd64_g4_kvf16_bf16, 64, 4, 8, false, 1, KvRawF16)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd64_g8_kvf16_bf16, 64, 8, 8, false, 1, KvRawF16)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd128_g4_kvf16_bf16, 128, 4, 8, false, 1, KvRawF16)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd128_g8_kvf16_bf16, 128, 8, 8, false, 1, KvRawF16)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd64_g4_kvq8_bf16, 64, 4, 8, false, 1, KvRawQ8)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd64_g8_kvq8_bf16, 64, 8, 8, false, 1, KvRawQ8)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd128_g4_kvq8_bf16, 128, 4, 8, false, 1, KvRawQ8)
DECODE_ATTENTION_WARPS(decode_attention_warps_hd128_g8_kvq8_bf16, 128, 8, 8, false, 1, KvRawQ8)

// Decode attention staged through shared memory: the same split, arguments and partials as
// decode_attention_warps above, rebuilt where that kernel is bound on an H200 (1.29 TB/s at
// 32k keys: each warp holds its in-flight rows in registers, so two CTAs a multiprocessor and
// one chunk ahead are all that fit, and every (key, head) score is summed over the warp by its
// own five shuffles, 160 a chunk at a group of 4):
//
// - Each warp streams its chunks through NSTAGE buffers of shared memory by cp.async (16 bytes
//   a lane per copy, rows past the split zero-filled), NSTAGE - 1 chunks in flight while it
//   computes one; the registers hold no in-flight rows, so more CTAs reside.
// - A chunk's G x CHUNK partial scores are summed over the warp by one reduce-scatter (each
//   exchange halves what a lane holds: 31 shuffles for 32 scores, 62 for 64), leaving lane l
//   the whole sums of scores KEEP l .. KEEP l + KEEP - 1 (score g CHUNK + j is head g, key j);
//   they go through shared memory to every lane, which then updates each head's online
//   softmax and adds its weighted values as before.
// - A key's row is read from shared memory as the lane's HD / 32 channels (one 64- or 32-bit
//   load, a warp's loads one contiguous row: no bank conflicts).
// Dynamic shared memory: warp w's buffers at w * NSTAGE * DS_STAGE_BYTES(HD), each CHUNK key
// rows, CHUNK value rows (HD bf16 each), CHUNK positions; after the loop the same bytes hold the
// warps' outputs for the CTA's merge (DW_WARPS * G * HD f32). decode_attention.rs computes the
// same size.

#define DS_CHUNK 8
#define DS_STAGE_BYTES(HD) (2 * DS_CHUNK * (HD) * 2 + DS_CHUNK * 4)

#ifndef HOST_SHIM
extern __shared__ __align__(16) unsigned char pipe_smem[];
#endif

// v[NV] (NV = 32 KEEP) summed over the warp and scattered: lane l ends with the sums of
// entries KEEP l .. KEEP l + KEEP - 1 in v[0 .. KEEP). Each exchange over lane bit `mask` keeps
// the upper half of what a lane holds where that bit is set, the lower half where not, and
// adds the partner's copy of it.
template <int NV>
__device__ __forceinline__ void warp_reduce_scatter(float (&v)[NV], int lane) {
#pragma unroll
    for (int step = 0; step < 5; ++step) {
        const int half = NV >> (step + 1), mask = 16 >> step;
        const bool upper = (lane & mask) != 0;
        // a constant bound, so that the loop unrolls before `half` is known: every index is
        // then a constant and v stays in registers
#pragma unroll
        for (int k = 0; k < NV / 2; ++k) {
            if (k < half) {
                const float send = upper ? v[k] : v[k + half];
                const float keep = upper ? v[k + half] : v[k];
                v[k] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
            }
        }
    }
}

template <int HD, int G, int NSTAGE>
__device__ __forceinline__ void decode_attention_staged(
    const bf16* q, const u32* q_pos, const bf16* k_pool, const bf16* v_pool, const u32* pos_pool,
    const u32* table, const float* k_scale, float* part_m, float* part_l, float* part_o,
    int q_col, int n_keys, int n_heads, int n_kv_heads, int keys_per_split, float scale) {
    constexpr int DPL = HD / 32;
    constexpr int NV = G * DS_CHUNK;  // a chunk's scores
    constexpr int KEEP = NV / 32;     // the whole sums a lane holds after the reduce-scatter
    static_assert(NV % 32 == 0, "a chunk's scores fill the warp");
    constexpr int ROW_PIECES = HD * 2 / 16;  // 16-byte copies a row
    constexpr int SB = DS_STAGE_BYTES(HD);
    __shared__ float wm[DW_WARPS][G], wl[DW_WARPS][G];
    __shared__ float sc[DW_WARPS][NV];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.x, kv_head = blockIdx.y;
    const int group = n_heads / n_kv_heads, head0 = kv_head * group;
    const int kv_dim = n_kv_heads * HD;
    const u32 qp = q_pos[0];
    unsigned char* mine = pipe_smem + warp * NSTAGE * SB;

    float qr[G][DPL], m[G], l[G], o[G][DPL];
    start_group<HD, G>(q, q_col, kv_head, group, lane, scale, k_scale, qr, m, l, o);

    const int k0 = split * keys_per_split;
    const int k1 = min(n_keys, k0 + keys_per_split);
    const int step = DS_CHUNK * DW_WARPS;
    const int first = k0 + DS_CHUNK * warp;
    // the next chunk to issue, and its slot (read one issue ahead: its latency passes under a
    // chunk's math). k0 and so every chunk start are multiples of DS_CHUNK, which divides
    // KV_BLOCK: a chunk lies in one slot.
    int issued = first;
    u32 slot = issued < k1 ? table[issued / KV_BLOCK] : 0u;
    auto issue = [&](int buf) {
        if (issued < k1) {
            const int nc = min(DS_CHUNK, k1 - issued);
            const size_t row0 = (size_t)slot * KV_BLOCK + issued % KV_BLOCK;
            unsigned char* st = mine + buf * SB;
#pragma unroll
            for (int p = lane; p < DS_CHUNK * ROW_PIECES; p += 32) {
                const int r = p / ROW_PIECES, c = p % ROW_PIECES;
                const bool in = r < nc;
                const size_t at = (row0 + (in ? r : 0)) * kv_dim + kv_head * HD + 8 * c;
                cp_async16(to_sptr(st + (r * HD + 8 * c) * 2), k_pool + at, in);
                cp_async16(to_sptr(st + (DS_CHUNK + r) * HD * 2 + 16 * c), v_pool + at, in);
            }
            // the chunk's positions: DS_CHUNK u32 from a 32-byte aligned row (rows past nc are
            // read, and masked where used)
            if (lane < DS_CHUNK / 4)
                cp_async16(to_sptr(st + 2 * DS_CHUNK * HD * 2 + 16 * lane),
                           pos_pool + row0 + 4 * lane, true);
        }
        cp_async_commit();  // one group a chunk, empty past the split: the waits count chunks
        issued += step;
        slot = issued < k1 ? table[issued / KV_BLOCK] : 0u;
    };
#pragma unroll
    for (int b = 0; b < NSTAGE - 1; ++b) issue(b);
    int buf = 0;
    for (int c0 = first; c0 < k1; c0 += step) {
        cp_async_wait<NSTAGE - 2>();  // chunk c0 landed for this lane
        __syncwarp();  // ... for every lane; and every lane is done with the buffer refilled next
        issue((buf + NSTAGE - 1) % NSTAGE);
        const unsigned char* st = mine + buf * SB;
        const bf16* ks = (const bf16*)st;
        const bf16* vs = ks + DS_CHUNK * HD;
        const u32* ps = (const u32*)(st + 2 * DS_CHUNK * HD * 2);
        const int nc = min(DS_CHUNK, k1 - c0);
        bool vis[DS_CHUNK];
        bool any = false;
#pragma unroll
        for (int j = 0; j < DS_CHUNK; ++j) {
            vis[j] = j < nc && ps[j] <= qp;
            any = any || vis[j];
        }
        // uniform over the warp: every lane read the same positions
        if (any) {
            float v[NV];
#pragma unroll
            for (int j = 0; j < DS_CHUNK; ++j) {
                u32 kr[DPL / 2];
                KvRawBf16::load<DPL>(ks + j * HD, lane, kr);
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < DPL; ++i) s += qr[g][i] * KvRawBf16::widen(kr, i);
                    v[g * DS_CHUNK + j] = s;
                }
            }
            warp_reduce_scatter<NV>(v, lane);
#pragma unroll
            for (int t = 0; t < KEEP; ++t) sc[warp][KEEP * lane + t] = v[t];
            __syncwarp();
            u32 vr[DS_CHUNK][DPL / 2];
#pragma unroll
            for (int j = 0; j < DS_CHUNK; ++j) KvRawBf16::load<DPL>(vs + j * HD, lane, vr[j]);
#pragma unroll
            for (int g = 0; g < G; ++g) {
                if (g >= group) continue;
                float p[DS_CHUNK];
#pragma unroll
                for (int j = 0; j < DS_CHUNK; ++j)
                    p[j] = vis[j] ? sc[warp][g * DS_CHUNK + j] : -INFINITY;
                softmax_step<DS_CHUNK, DPL>(p, vis, m[g], l[g], o[g]);
#pragma unroll
                for (int j = 0; j < DS_CHUNK; ++j) {
#pragma unroll
                    for (int i = 0; i < DPL; ++i) o[g][i] += p[j] * KvRawBf16::widen(vr[j], i);
                }
            }
            __syncwarp();  // the scores are read before the next chunk's are written
        }
        buf = (buf + 1) % NSTAGE;
    }
    cp_async_wait<0>();

    // the warps' outputs go where the buffers were
    merge_warps<HD, G>(m, l, o, wm, wl, (float*)pipe_smem, group, head0, part_m, part_l, part_o);
}

#define DECODE_ATTENTION_STAGED(NAME, HD, G, NSTAGE)                                            \
    extern "C" __global__ void __launch_bounds__(32 * DW_WARPS) NAME(                             \
        const bf16* q, const u32* q_pos, const bf16* k_pool, const bf16* v_pool,                  \
        const u32* pos_pool, const u32* table, const float* k_scale, float* part_m,              \
        float* part_l, float* part_o, int q_stride, int q_col, int n_keys, int n_heads,           \
        int n_kv_heads, int keys_per_split, float scale) {                                        \
        (void)q_stride;                                                                           \
        decode_attention_staged<HD, G, NSTAGE>(q, q_pos, k_pool, v_pool, pos_pool, table,         \
                                               k_scale, part_m, part_l, part_o, q_col, n_keys,    \
                                               n_heads, n_kv_heads, keys_per_split, scale);       \
    }
// NSTAGE buffers a warp (NSTAGE - 1 chunks in flight): gpu-check times 2, 3 and 4 at the 8B
// shape; the other shapes run 3.
DECODE_ATTENTION_STAGED(decode_attention_staged_hd64_g4_s3_bf16, 64, 4, 3)
DECODE_ATTENTION_STAGED(decode_attention_staged_hd64_g8_s3_bf16, 64, 8, 3)
DECODE_ATTENTION_STAGED(decode_attention_staged_hd128_g4_s2_bf16, 128, 4, 2)
DECODE_ATTENTION_STAGED(decode_attention_staged_hd128_g4_s3_bf16, 128, 4, 3)
DECODE_ATTENTION_STAGED(decode_attention_staged_hd128_g4_s4_bf16, 128, 4, 4)
DECODE_ATTENTION_STAGED(decode_attention_staged_hd128_g8_s3_bf16, 128, 8, 3)

// grid (n_heads), block (DM_THREADS): out[head] = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M)
// over the splits, each split's weight computed once (in shared memory) and the value columns
// read across the threads (decode_attention.cu's combine walks every split serially per
// thread). n_splits <= DM_MAX_SPLITS. out: (1, n_heads * head_dim) bf16
#define DM_THREADS 128
#define DM_MAX_SPLITS 1024
extern "C" __global__ void __launch_bounds__(DM_THREADS)
    decode_attention_merge_bf16(const float* part_m, const float* part_l, const float* part_o,
                                bf16* out, int n_splits, int head_dim) {
    __shared__ float w[DM_MAX_SPLITS];
    __shared__ float red_max[DM_THREADS / 32], red_sum[DM_THREADS / 32];
    const int head = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* m = part_m + (size_t)head * n_splits;
    const float* l = part_l + (size_t)head * n_splits;
    float big = -INFINITY;
    for (int s = threadIdx.x; s < n_splits; s += blockDim.x) big = fmaxf(big, m[s]);
    big = warp_max(big);
    if (lane == 0) red_max[warp] = big;
    __syncthreads();
    big = -INFINITY;
    for (int i = 0; i < DM_THREADS / 32; ++i) big = fmaxf(big, red_max[i]);
    float total = 0.f;
    for (int s = threadIdx.x; s < n_splits; s += blockDim.x) {
        const float e = m[s] == -INFINITY ? 0.f : __expf(m[s] - big);
        w[s] = e;
        total += l[s] * e;
    }
    total = warp_sum(total);
    if (lane == 0) red_sum[warp] = total;
    __syncthreads();
    total = 0.f;
    for (int i = 0; i < DM_THREADS / 32; ++i) total += red_sum[i];
    const float* o = part_o + (size_t)head * n_splits * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < n_splits; ++s) acc += o[(size_t)s * head_dim + d] * w[s];
        out[head * head_dim + d] = f32_to_bf16(total > 0.f ? acc / total : 0.f);
    }
}
