// The KV cache's element types on the device, as src/backend/kv_format.rs stores them on the
// host (the words a pool holds, block for block, move between the two unchanged):
//
// - KV_BF16 and KV_F16: one 16-bit word a value;
// - KV_Q8: groups of 32 values as 17 words, the group's scale (f16) and 32 int8 two to a word,
//   the lower-numbered value in the low byte; a value is q * scale. Groups never straddle a
//   head (head sizes are multiples of 32). Q8 keys are stored divided by the layer's channel
//   scale (k_scale, kv_dim f32), which the kernels fold into the queries.
//
// Put after common.cuh in the files that read or write a pool.

#define KV_BF16 0
#define KV_F16 1
#define KV_Q8 2
#define Q8_GROUP 32
#define Q8_WORDS 17

// f16 bits widened (exact; subnormals, infinities and NaNs kept)
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    const u32 sign = ((u32)h & 0x8000u) << 16;
    const u32 e = ((u32)h >> 10) & 0x1fu, m = (u32)h & 0x3ffu;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24
        return sign ? -v : v;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// f32 narrowed to f16 bits, to nearest even (the host's half::f16::from_f32)
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    const u32 x = __float_as_uint(f);
    const u32 sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds past 65504
    if (a < 0x38800000u) {
        // below f16's smallest normal: a multiple of 2^-24, rounded to nearest even
        return (unsigned short)(sign | (u32)rintf(__uint_as_float(a) * 16777216.0f));
    }
    const u32 r = a - 0x38000000u;  // the exponent rebiased from 127 to 15
    return (unsigned short)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
}

// Words `n` values of `kv_type` take (n a multiple of Q8_GROUP for KV_Q8).
__device__ __forceinline__ int kv_words(int kv_type, int n) {
    return kv_type == KV_Q8 ? n / Q8_GROUP * Q8_WORDS : n;
}

// Value c of a stored row.
__device__ __forceinline__ float kv_value(const unsigned short* row, int c, int kv_type) {
    if (kv_type == KV_BF16) return bf16_to_f32(row[c]);
    if (kv_type == KV_F16) return f16_to_f32(row[c]);
    const unsigned short* g = row + c / Q8_GROUP * Q8_WORDS;
    const int i = c % Q8_GROUP;
    const signed char q = (signed char)((g[1 + i / 2] >> (8 * (i & 1))) & 0xffu);
    return (float)q * f16_to_f32(g[0]);
}

// x to nearest even within +-127; NaN to 0 (the host's `as i8`)
__device__ __forceinline__ int q8_round(float x) {
    const float r = rintf(x);
    return r != r ? 0 : (int)fminf(fmaxf(r, -127.f), 127.f);
}

// One Q8 group: 32 values x (divided by div where div is not null) into 17 words, as the host's
// q8_encode_group: scale = f16(max|x| / 127), q = x * (1 / scale) to nearest even, within +-127.
__device__ __forceinline__ void q8_encode_group(const float* x, const float* div,
                                                unsigned short* out) {
    float v[Q8_GROUP], amax = 0.f;
    for (int i = 0; i < Q8_GROUP; ++i) {
        v[i] = div ? x[i] / div[i] : x[i];
        amax = fmaxf(amax, fabsf(v[i]));
    }
    const unsigned short scale = f32_to_f16(amax / 127.f);
    const float s = f16_to_f32(scale);
    const float inv = s > 0.f && s <= 3.402823466e38f ? 1.f / s : 0.f;
    out[0] = scale;
    for (int i = 0; i < Q8_GROUP; i += 2)
        out[1 + i / 2] = (unsigned short)((q8_round(v[i] * inv) & 0xff) |
                                          ((q8_round(v[i + 1] * inv) & 0xff) << 8));
}

// A warp lane's DPL consecutive channels (DPL * lane ..) of one head's stored row, raw (RAW
// words), widened one at a time: the element types of the decode kernels' registers.
struct KvRawBf16 {
    static constexpr int TYPE = KV_BF16;
    template <int DPL>
    static constexpr int raw_words = DPL / 2;
    template <int DPL>
    __device__ static __forceinline__ void load(const unsigned short* head, int lane, u32* out) {
        if constexpr (DPL == 4) {
            const uint2 w = *(const uint2*)(head + 4 * lane);
            out[0] = w.x;
            out[1] = w.y;
        } else {
            out[0] = *(const u32*)(head + 2 * lane);
        }
    }
    __device__ static __forceinline__ float widen(const u32* w, int i) {
        return __uint_as_float(i % 2 == 0 ? w[i / 2] << 16 : w[i / 2] & 0xffff0000u);
    }
};

struct KvRawF16 {
    static constexpr int TYPE = KV_F16;
    template <int DPL>
    static constexpr int raw_words = DPL / 2;
    template <int DPL>
    __device__ static __forceinline__ void load(const unsigned short* head, int lane, u32* out) {
        KvRawBf16::load<DPL>(head, lane, out);
    }
    __device__ static __forceinline__ float widen(const u32* w, int i) {
        return f16_to_f32((unsigned short)(i % 2 == 0 ? w[i / 2] & 0xffffu : w[i / 2] >> 16));
    }
};

// Q8: the lane's DPL (2 or 4) int8 in out[0], its group's scale bits in out[1]. A lane's
// channels lie in one group; its bytes start on a word (DPL * lane is even), so two 16-bit
// loads (a group's 17 words leave 32-bit loads unaligned in every other group).
struct KvRawQ8 {
    static constexpr int TYPE = KV_Q8;
    template <int DPL>
    static constexpr int raw_words = 2;
    template <int DPL>
    __device__ static __forceinline__ void load(const unsigned short* head, int lane, u32* out) {
        const int c = DPL * lane;
        const unsigned short* g = head + c / Q8_GROUP * Q8_WORDS;
        const int w = 1 + c % Q8_GROUP / 2;
        out[0] = DPL == 4 ? (u32)g[w] | ((u32)g[w + 1] << 16) : (u32)g[w];
        out[1] = g[0];
    }
    __device__ static __forceinline__ float widen(const u32* w, int i) {
        return (float)(signed char)((w[0] >> (8 * i)) & 0xffu) * f16_to_f32((unsigned short)w[1]);
    }
};
