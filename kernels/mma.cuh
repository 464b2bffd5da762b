// Shared by the tensor-core kernels (attention_mma.cu, attention_mma_pipelined.cu): the Rust
// side puts this text before each of them (src/cuda/kernels.rs), after common.cuh. The host
// checks (tests/common/host_kernels.rs) define HOST_SHIM and emulate mma_16816 on the ISA's
// fragment layouts.

#ifndef HOST_SHIM
// d = a b + d: one warp-wide 16x8x16 product, bf16 operands, f32 accumulators
__device__ __forceinline__ void mma_16816(float d[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// A warp's 16 output rows of one head: each row's values (C fragments: rows g and g + 8 of
// the quad's lane t, n-tiles of 8 channels) over the row's sum, gathered from the quad, as
// bf16 pairs; rows past nq (!ok) are not written. out: (nq, n_heads * HD) bf16.
template <int HD>
__device__ __forceinline__ void store_rows(bf16* out, const float o[HD / 8][4], float l_lo,
                                           float l_hi, int r_lo, int r_hi, bool ok_lo,
                                           bool ok_hi, int n_heads, int head, int t) {
    const float inv_lo = 1.f / fmaxf(quad_sum(l_lo), 1e-30f);
    const float inv_hi = 1.f / fmaxf(quad_sum(l_hi), 1e-30f);
    u32* out_lo = (u32*)(out + (size_t)r_lo * n_heads * HD + head * HD);
    u32* out_hi = (u32*)(out + (size_t)r_hi * n_heads * HD + head * HD);
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        if (ok_lo) out_lo[4 * n + t] = pack_bf16x2(o[n][0] * inv_lo, o[n][1] * inv_lo);
        if (ok_hi) out_hi[4 * n + t] = pack_bf16x2(o[n][2] * inv_hi, o[n][3] * inv_hi);
    }
}
