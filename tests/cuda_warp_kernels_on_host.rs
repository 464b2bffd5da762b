//! The CUDA kernels that need a real CTA, compiled for the host by the C++ compiler with every
//! thread of a CTA a host thread and the warp's exchanges emulated on the PTX ISA's layouts
//! ([`host_kernels::THREADED_PRELUDE`]), against `CpuOps`: the tensor-core prefill attention
//! (kernels/attention_mma.cu), its pipelined successor (attention_mma_pipelined.cu: ldmatrix,
//! cp.async), decode attention by warps with its merge (decode_attention_warps.cu, over bf16, f16
//! and Q8 pools) and the
//! one-row linear layer (gemv.cu). This
//! checks the fragment mappings, the masking and the bookkeeping on every machine; the device
//! run checks the kernels again (`slimchat gpu-check --kernels`). Skipped, with a note, where
//! there is no C++ compiler.

#[path = "common/host_kernels.rs"]
mod host_kernels;

use slimchat::backend::cpu_ops::to_f32;
use slimchat::backend::cpu_ops::CpuOps;
use slimchat::backend::kv_format::KvDtype;
use slimchat::backend::ops::{Heads, Ops};
use slimchat::backend::ops_check::{rel_err, Rng};

use host_kernels::{bytes, compile_with, kept_keys, program_on, run_for_bf16, PagedCase};

const THREADS: &[&str] = &["-std=c++20", "-pthread"];

/// A prefill case: (query heads, KV heads, head size), query rows, keys after the last query,
/// the queries' column in their rows.
type PrefillCase = ((usize, usize, usize), usize, usize, usize);

/// One prefill launch over the inputs in files, as `CudaOps` makes it (queries at column q_col
/// of rows of q_stride); KERNEL is the entry point of head size 64 or 128.
fn prefill_main(kernel: &str) -> String {
    r#"
int main() {
    auto q = as<bf16>(slurp("q.bin")), k = as<bf16>(slurp("k.bin")), v = as<bf16>(slurp("v.bin"));
    auto qpos = as<u32>(slurp("qpos.bin")), pos = as<u32>(slurp("pos.bin"));
    auto table = as<u32>(slurp("table.bin"));
    auto d = as<int>(slurp("dims.bin"));  // nq, q_stride, q_col, n_keys, n_heads, n_kv_heads, head_dim, tiles
    const int nq = d[0], stride = d[1], q_col = d[2], n_keys = d[3], nh = d[4], nkv = d[5], hd = d[6], tiles = d[7];
    std::vector<bf16> out((size_t)nq * nh * hd, 0x7fc0);
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)hd);
    const unsigned threads = 32 * (nh / nkv) * tiles, gx = (nq + 16 * tiles - 1) / (16 * tiles);
    launch(gx, nkv, threads, [&] {
        auto f = hd == 64 ? KERNEL_hd64_bf16 : KERNEL_hd128_bf16;
        f(q.data(), qpos.data(), k.data(), v.data(), pos.data(), table.data(), out.data(), nq,
          stride, q_col, n_keys, nh, nkv, tiles, scale_log2);
    });
    FILE* f = fopen("out.bin", "wb");
    fwrite(out.data(), 2, out.size(), f);
    fclose(f);
    return 0;
}
"#
    .replace("KERNEL", kernel)
}

/// Prefill attention by `kernel` (`source`) over `cases` (heads, query rows, keys after the
/// last query, query column), each with a CTA of `8 / group` 16-row tiles a head as the
/// backend launches both kernels; every output row finite and within 1e-2 of `CpuOps`.
fn check_prefill(kernel: &str, source: &str, seed: u64, nan_rows: bool, cases: &[PrefillCase]) {
    let dir = tempfile::tempdir().unwrap();
    let mma = include_str!("../kernels/mma.cuh");
    let program = program_on(
        host_kernels::THREADED_PRELUDE,
        &[mma, source],
        &prefill_main(kernel),
    );
    let Some(binary) = compile_with(dir.path(), &program, THREADS) else {
        return;
    };
    let mut rng = Rng::new(seed);
    for &((n_heads, n_kv_heads, head_dim), nq, after, q_col) in cases {
        let heads = Heads {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        let tiles = 8 / (n_heads / n_kv_heads);
        // kept blocks with gaps, then a partial block
        let key_pos = kept_keys(&[0, 2, 3, 7, 8], 10, 29);
        let end = key_pos.len() - after;
        let q_pos = key_pos[end - nq..end].to_vec();
        let case = PagedCase::random(&mut rng, heads, &key_pos, q_pos, q_col, nan_rows);
        let stride = case.at.stride;
        let dims = [
            nq,
            stride,
            q_col,
            case.n_keys,
            n_heads,
            n_kv_heads,
            head_dim,
            tiles,
        ];
        case.write(dir.path(), &dims);
        let got = to_f32(&run_for_bf16(&binary, &[]));
        assert!(
            got.iter().all(|x| x.is_finite()),
            "every output row written"
        );
        let e = rel_err(&got, &case.want());
        eprintln!(
            "{kernel} {n_heads}:{n_kv_heads}x{head_dim}, {nq} rows, {after} keys after: relative error {e:.2e}"
        );
        assert!(e < 1e-2, "{e}");
    }
}

#[test]
fn the_tensor_core_prefill_attention_matches_the_cpu_reference_on_the_host() {
    // a GQA group of 4 at head size 128 (two 16-row tiles a head), of 2 at 64 (four), of 7 at
    // 128 (one); the queries the last rows of the keys, or rows before the last keys (those
    // keys masked for every query)
    check_prefill(
        "attention_mma",
        include_str!("../kernels/attention_mma.cu"),
        23,
        false,
        &[
            ((8, 2, 128), 83, 0, 0),
            ((6, 3, 64), 45, 0, 0),
            ((14, 2, 128), 37, 21, 0),
        ],
    );
}

#[test]
fn the_pipelined_prefill_attention_matches_the_cpu_reference_on_the_host() {
    // as above, and a group of 1 at 64 (eight tiles, 128 rows a CTA), of 8 at 128, queries
    // offset in their rows, and whole tiles past every query (skipped); the pool's rows past
    // the keys hold NaNs seen by every query
    check_prefill(
        "attention_mma_pipelined",
        include_str!("../kernels/attention_mma_pipelined.cu"),
        29,
        true,
        &[
            ((8, 2, 128), 83, 0, 0),
            ((6, 3, 64), 45, 0, 8),
            ((14, 2, 128), 37, 21, 0),
            ((4, 4, 64), 150, 0, 0),
            ((16, 2, 128), 40, 150, 16),
            ((8, 2, 128), 50, 200, 0),
        ],
    );
}

/// Decode attention by warps: the split kernel over (splits, KV heads), then the merge over
/// the heads, as `CudaOps::decode_attention` launches them; KERNEL is the entry point.
const DECODE_MAIN: &str = r#"
int main() {
    auto q = as<bf16>(slurp("q.bin")), k = as<bf16>(slurp("k.bin")), v = as<bf16>(slurp("v.bin"));
    auto qpos = as<u32>(slurp("qpos.bin")), pos = as<u32>(slurp("pos.bin"));
    auto table = as<u32>(slurp("table.bin"));
    auto ks = as<float>(slurp("kscale.bin"));
    auto d = as<int>(slurp("dims.bin"));  // n_keys, n_heads, n_kv_heads, head_dim, n_splits, per_split
    const int n_keys = d[0], nh = d[1], nkv = d[2], hd = d[3], n_splits = d[4], per = d[5];
    std::vector<float> pm(nh * n_splits, NAN), pl(nh * n_splits, NAN), po(nh * n_splits * hd, NAN);
    std::vector<bf16> out(nh * hd, 0x7fc0);
    launch(n_splits, nkv, 32 * DW_WARPS, [&] {
        KERNEL(q.data(), qpos.data(), k.data(), v.data(), pos.data(), table.data(),
               ks.empty() ? nullptr : ks.data(), pm.data(), pl.data(), po.data(), nh * hd, 0,
               n_keys, nh, nkv, per, 1.f / sqrtf((float)hd));
    });
    launch(nh, 1, DM_THREADS, [&] {
        decode_attention_merge_bf16(pm.data(), pl.data(), po.data(), out.data(), n_splits, hd);
    });
    FILE* f = fopen("out.bin", "wb");
    fwrite(out.data(), 2, out.size(), f);
    fclose(f);
    return 0;
}
"#;

#[test]
fn decode_attention_by_warps_matches_the_cpu_reference_on_the_host() {
    let mut rng = Rng::new(31);
    // (kernel, heads, keys past the query, splits): each variant the backend launches, a group
    // narrower than the variant's bound, keys past the query masked, splits that end inside a
    // block and one split with no keys at all; the pool bf16 unless the name says kvf16 or
    // kvq8 (a Q8 pool's keys divided by their channel scale)
    for (kernel, (n_heads, n_kv_heads, head_dim), masked, n_splits) in [
        (
            "decode_attention_warps_hd128_g4_kvq8_bf16",
            (8, 2, 128),
            41,
            5,
        ),
        (
            "decode_attention_warps_hd128_g8_kvq8_bf16",
            (14, 2, 128),
            0,
            4,
        ),
        (
            "decode_attention_warps_hd64_g4_kvq8_bf16",
            (9, 3, 64),
            70,
            7,
        ),
        (
            "decode_attention_warps_hd64_g8_kvq8_bf16",
            (16, 2, 64),
            0,
            40,
        ),
        (
            "decode_attention_warps_hd128_g4_kvf16_bf16",
            (8, 2, 128),
            13,
            3,
        ),
        (
            "decode_attention_warps_hd128_g8_kvf16_bf16",
            (14, 2, 128),
            0,
            4,
        ),
        (
            "decode_attention_warps_hd64_g4_kvf16_bf16",
            (9, 3, 64),
            70,
            7,
        ),
        (
            "decode_attention_warps_hd64_g8_kvf16_bf16",
            (16, 2, 64),
            0,
            40,
        ),
        ("decode_attention_warps_hd128_g4_bf16", (8, 2, 128), 0, 3),
        (
            "decode_attention_warps_hd128_g4_fused_bf16",
            (8, 2, 128),
            41,
            5,
        ),
        ("decode_attention_warps_hd128_g8_bf16", (14, 2, 128), 0, 4),
        ("decode_attention_warps_hd64_g4_bf16", (9, 3, 64), 70, 7),
        ("decode_attention_warps_hd64_g8_bf16", (16, 2, 64), 0, 40),
        (
            "decode_attention_staged_hd128_g4_s2_bf16",
            (8, 2, 128),
            0,
            3,
        ),
        (
            "decode_attention_staged_hd128_g4_s3_bf16",
            (8, 2, 128),
            41,
            5,
        ),
        (
            "decode_attention_staged_hd128_g4_s4_bf16",
            (6, 2, 128),
            13,
            2,
        ),
        (
            "decode_attention_staged_hd128_g8_s3_bf16",
            (14, 2, 128),
            0,
            4,
        ),
        ("decode_attention_staged_hd64_g4_s3_bf16", (9, 3, 64), 70, 7),
        (
            "decode_attention_staged_hd64_g8_s3_bf16",
            (16, 2, 64),
            0,
            40,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let program = program_on(
            host_kernels::THREADED_PRELUDE,
            &[
                include_str!("../kernels/kv_types.cuh"),
                include_str!("../kernels/decode_attention_warps.cu"),
            ],
            &DECODE_MAIN.replace("KERNEL", kernel),
        );
        let Some(binary) = compile_with(dir.path(), &program, THREADS) else {
            return;
        };
        let heads = Heads {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        let key_pos = kept_keys(&[0, 1, 3, 4, 5, 8, 9, 12, 13, 14, 20], 21, 37);
        let q_pos = vec![key_pos[key_pos.len() - 1 - masked]];
        let case = PagedCase::random(&mut rng, heads, &key_pos, q_pos, 0, true);
        let case = match kernel {
            k if k.contains("_kvq8_") => case.retyped(KvDtype::Q8),
            k if k.contains("_kvf16_") => case.retyped(KvDtype::F16),
            _ => case,
        };
        // as the backend splits: a multiple of the 8-key chunk
        let per_split = case.n_keys.div_ceil(n_splits).next_multiple_of(8);
        let dims = [
            case.n_keys,
            n_heads,
            n_kv_heads,
            head_dim,
            n_splits,
            per_split,
        ];
        case.write(dir.path(), &dims);
        let got = to_f32(&run_for_bf16(&binary, &[]));
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{kernel}: every output written"
        );
        let e = rel_err(&got, &case.want());
        eprintln!(
            "{kernel} {n_heads}:{n_kv_heads}x{head_dim}, {n_splits} splits: relative error {e:.2e}"
        );
        assert!(e < 5e-3, "{kernel}: {e}");
    }
}

/// One row through gemv.cu: x and w from files, out (n) bf16 written; ROWS and WARPS name the
/// variant.
const GEMV_MAIN: &str = r#"
int main() {
    auto x = as<bf16>(slurp("x.bin")), w = as<bf16>(slurp("w.bin"));
    auto d = as<int>(slurp("dims.bin"));  // n, k
    const int n = d[0], k = d[1];
    std::vector<bf16> out(n, 0x7fc0);
    launch((n + ROWS - 1) / ROWS, 1, 32 * WARPS, [&] {
        gemv_rROWS_wWARPS_bf16(x.data(), w.data(), out.data(), n, k);
    });
    FILE* f = fopen("out.bin", "wb");
    fwrite(out.data(), 2, out.size(), f);
    fclose(f);
    return 0;
}
"#;

#[test]
fn the_one_row_linear_layer_matches_the_cpu_reference_on_the_host() {
    let mut rng = Rng::new(41);
    // rows past the last CTA's, and k past a whole round of the CTA's lanes' pieces (2,056 / 8
    // = 257 pieces)
    let (n, k) = (13usize, 2056usize);
    let (x, w) = (rng.bf16s(k, 1.0), rng.bf16s(n * k, 0.05));
    let cpu = CpuOps;
    let mut want = cpu.zeros_bf16(n).unwrap();
    cpu.matmul(&x, &w, &mut want, 1, k, n).unwrap();
    // every variant gpu-check times (OneRowLinear::ALL)
    for (rows, warps) in [(2, 8), (4, 4), (4, 8), (8, 8)] {
        let dir = tempfile::tempdir().unwrap();
        let main = GEMV_MAIN
            .replace("ROWS", &rows.to_string())
            .replace("WARPS", &warps.to_string());
        let program = program_on(
            host_kernels::THREADED_PRELUDE,
            &[include_str!("../kernels/gemv.cu")],
            &main,
        );
        let Some(binary) = compile_with(dir.path(), &program, THREADS) else {
            return;
        };
        let dims = [n as i32, k as i32];
        for (name, data) in [
            ("x.bin", bytes(&x)),
            ("w.bin", bytes(&w)),
            ("dims.bin", bytes(&dims)),
        ] {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let got = to_f32(&run_for_bf16(&binary, &[]));
        let e = rel_err(&got, &to_f32(&want));
        eprintln!("gemv {n}x{k}, {rows} rows x {warps} warps a CTA: relative error {e:.2e}");
        assert!(e < 5e-3, "{rows} x {warps}: {e}");
    }
}
