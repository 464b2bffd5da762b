// Asynchronous global -> shared copies (cp.async, sm_80 and later), shared by the kernels that
// stage K/V through shared memory (attention_mma_pipelined.cu, decode_attention_warps.cu): the
// Rust side puts this text before each of them (src/cuda/kernels.rs), after common.cuh. The
// host checks (tests/common/host_kernels.rs) define HOST_SHIM and provide the same functions as
// synchronous copies.

#ifndef HOST_SHIM
// a byte address in the shared window, as ldmatrix and cp.async take it: 32 bits, where a
// generic pointer takes two registers
typedef u32 sptr;
__device__ __forceinline__ sptr to_sptr(const void* p) {
    return (sptr)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared, asynchronous; zeros instead where !fill (src must still be a
// valid address: nothing is read from it)
__device__ __forceinline__ void cp_async16(sptr dst, const void* src, bool fill) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(src), "r"(fill ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// wait until at most N of this thread's commit groups are still in flight
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif
