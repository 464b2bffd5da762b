// Shared by every kernel file: the Rust side prepends this text to each .cu before NVRTC
// compiles it (no include paths are needed on the device machine).
//
// bf16 values travel as their 16 raw bits (`bf16` below), so no CUDA header is needed:
// widening is a shift, narrowing rounds to nearest even (NaN kept quiet).

typedef unsigned short bf16;
typedef unsigned int u32;

#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(bf16 b) {
    return __uint_as_float(((u32)b) << 16);
}

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (bf16)((x >> 16) | 0x40u);  // NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return (bf16)(x >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Rows of the paged KV cache: sequence row s of a layer lives in slot table[s / KV_BLOCK],
// at row s % KV_BLOCK of that slot.
#define KV_BLOCK 64
