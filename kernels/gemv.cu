// One row's linear layer (decode): out (1, n) = x (1, k) . w^T for w (n, k) bf16 row-major,
// f32 accumulation, out bf16 or f32. cuBLAS's GEMM at one row read the 8B shape's 4096 x 14336
// weights at 3.5-3.7 TB/s of the H200's 4.8 (bench/NOTES.md); a decode step is mostly this.
//
// A CTA of WARPS warps owns ROWS rows, and its warps split k: lane l of warp w reads the
// 16-byte pieces (8 values) p = 32 w + l, p + 32 WARPS, ... of each of the rows and of x (x's
// piece loaded once for the rows), so each lane has ROWS independent loads a piece in flight,
// and a 4096-wide row is read by a CTA of 8 warps in two pieces a lane. The partial sums go
// over the warp by shuffles and over the warps through shared memory. gpu-check times the
// variants below at the 8B shape's layers and runs the fastest (bench/NOTES.md).
// grid (ceil(n / ROWS)), block (32 * WARPS); k a multiple of 8, x and w 16-byte aligned.

__device__ __forceinline__ void widen8(const uint4 p, float f[8]) {
    const u32 w[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

template <int GV_ROWS, int GV_WARPS, bool F32_OUT>
__device__ __forceinline__ void gemv_rows(const bf16* x, const bf16* w, void* out, int n, int k) {
    __shared__ float red[GV_WARPS][GV_ROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * GV_ROWS;
    const int pieces = k / 8;
    const uint4* xp = (const uint4*)x;
    const uint4* wp[GV_ROWS];
#pragma unroll
    for (int r = 0; r < GV_ROWS; ++r)
        wp[r] = (const uint4*)(w + (size_t)min(row0 + r, n - 1) * k);  // rows past n: row n - 1
    float acc[GV_ROWS];
#pragma unroll
    for (int r = 0; r < GV_ROWS; ++r) acc[r] = 0.f;
#pragma unroll 2
    for (int p = warp * 32 + lane; p < pieces; p += 32 * GV_WARPS) {
        uint4 wr[GV_ROWS];
#pragma unroll
        for (int r = 0; r < GV_ROWS; ++r) wr[r] = wp[r][p];
        float xf[8];
        widen8(xp[p], xf);
#pragma unroll
        for (int r = 0; r < GV_ROWS; ++r) {
            float wf[8];
            widen8(wr[r], wf);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[r] += xf[i] * wf[i];
        }
    }
#pragma unroll
    for (int r = 0; r < GV_ROWS; ++r) {
        const float s = warp_sum(acc[r]);
        if (lane == 0) red[warp][r] = s;
    }
    __syncthreads();
    if (threadIdx.x < GV_ROWS && row0 + (int)threadIdx.x < n) {
        float s = 0.f;
        for (int i = 0; i < GV_WARPS; ++i) s += red[i][threadIdx.x];
        if constexpr (F32_OUT) {
            ((float*)out)[row0 + threadIdx.x] = s;
        } else {
            ((bf16*)out)[row0 + threadIdx.x] = f32_to_bf16(s);
        }
    }
}

#define GEMV(ROWS, WARPS)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * WARPS)                                 \
        gemv_r##ROWS##_w##WARPS##_bf16(const bf16* x, const bf16* w, bf16* out, int n, int k) { \
        gemv_rows<ROWS, WARPS, false>(x, w, out, n, k);                                      \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * WARPS)                                 \
        gemv_r##ROWS##_w##WARPS##_f32(const bf16* x, const bf16* w, float* out, int n, int k) { \
        gemv_rows<ROWS, WARPS, true>(x, w, out, n, k);                                       \
    }
// (rows a CTA, warps a CTA)
GEMV(2, 8)
GEMV(4, 4)
GEMV(4, 8)
GEMV(8, 8)
