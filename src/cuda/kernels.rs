//! Our kernels: the .cu sources of kernels/ embedded in the binary, compiled by NVRTC on first
//! use for the device's compute capability, loaded once per context and looked up by name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::OrEngine;
use crate::Result;

/// Prepended to every file: bf16 helpers, warp reductions, the KV block size.
const COMMON: &str = include_str!("../../kernels/common.cuh");

/// (file, source, entry points). Entry points are named `<op>_<dtype>`.
pub const FILES: &[(&str, &str, &[&str])] = &[
    (
        "norm_rope.cu",
        include_str!("../../kernels/norm_rope.cu"),
        &[
            "rmsnorm_f32",
            "rmsnorm_bf16",
            "rope_bf16",
            "head_rmsnorm_bf16",
        ],
    ),
    (
        "elementwise.cu",
        include_str!("../../kernels/elementwise.cu"),
        &[
            "silu_mul_bf16",
            "residual_add_f32",
            "bias_add_bf16",
            "fill_uniform_bf16",
        ],
    ),
    (
        "gather.cu",
        include_str!("../../kernels/gather.cu"),
        &["gather_rows_f32", "gather_positions_u32", "embed_rows_bf16"],
    ),
    (
        "kv_blocks.cu",
        concat!(
            include_str!("../../kernels/kv_types.cuh"),
            include_str!("../../kernels/kv_blocks.cu")
        ),
        &[
            "kv_append_bf16",
            "kv_append_f16",
            "kv_append_q8",
            "key_channel_amax",
            "kv_widen_bf16",
            "kv_copy_blocks_bf16",
            "kv_fetch_blocks",
        ],
    ),
    (
        "dequant.cu",
        include_str!("../../kernels/dequant.cu"),
        &[
            "dequant_q4_0_bf16",
            "dequant_q4_1_bf16",
            "dequant_q5_0_bf16",
            "dequant_q5_1_bf16",
            "dequant_q8_0_bf16",
            "dequant_q2_k_bf16",
            "dequant_q3_k_bf16",
            "dequant_q4_k_bf16",
            "dequant_q5_k_bf16",
            "dequant_q6_k_bf16",
            "dequant_f32_bf16",
            "dequant_f16_bf16",
            "dequant_bf16_bf16",
        ],
    ),
    (
        "attention.cu",
        include_str!("../../kernels/attention.cu"),
        &["attention_bf16"],
    ),
    (
        "attention_mma.cu",
        concat!(
            include_str!("../../kernels/mma.cuh"),
            include_str!("../../kernels/attention_mma.cu")
        ),
        &["attention_mma_hd64_bf16", "attention_mma_hd128_bf16"],
    ),
    (
        "attention_mma_pipelined.cu",
        concat!(
            include_str!("../../kernels/mma.cuh"),
            include_str!("../../kernels/async_copy.cuh"),
            include_str!("../../kernels/attention_mma_pipelined.cu")
        ),
        &[
            "attention_mma_pipelined_hd64_bf16",
            "attention_mma_pipelined_hd128_bf16",
        ],
    ),
    (
        "decode_attention.cu",
        include_str!("../../kernels/decode_attention.cu"),
        &[
            "decode_attention_split_bf16",
            "decode_attention_combine_bf16",
        ],
    ),
    (
        "decode_attention_warps.cu",
        concat!(
            include_str!("../../kernels/async_copy.cuh"),
            include_str!("../../kernels/kv_types.cuh"),
            include_str!("../../kernels/decode_attention_warps.cu")
        ),
        &[
            "decode_attention_warps_hd64_g4_kvf16_bf16",
            "decode_attention_warps_hd64_g8_kvf16_bf16",
            "decode_attention_warps_hd128_g4_kvf16_bf16",
            "decode_attention_warps_hd128_g8_kvf16_bf16",
            "decode_attention_warps_hd64_g4_kvq8_bf16",
            "decode_attention_warps_hd64_g8_kvq8_bf16",
            "decode_attention_warps_hd128_g4_kvq8_bf16",
            "decode_attention_warps_hd128_g8_kvq8_bf16",
            "decode_attention_warps_hd64_g4_bf16",
            "decode_attention_warps_hd64_g8_bf16",
            "decode_attention_warps_hd128_g4_bf16",
            "decode_attention_warps_hd128_g4_fused_bf16",
            "decode_attention_warps_hd128_g8_bf16",
            "decode_attention_staged_hd64_g4_s3_bf16",
            "decode_attention_staged_hd64_g8_s3_bf16",
            "decode_attention_staged_hd128_g4_s2_bf16",
            "decode_attention_staged_hd128_g4_s3_bf16",
            "decode_attention_staged_hd128_g4_s4_bf16",
            "decode_attention_staged_hd128_g8_s3_bf16",
            "decode_attention_merge_bf16",
        ],
    ),
    (
        "gemv.cu",
        include_str!("../../kernels/gemv.cu"),
        &[
            "gemv_r2_w8_bf16",
            "gemv_r2_w8_f32",
            "gemv_r4_w4_bf16",
            "gemv_r4_w4_f32",
            "gemv_r4_w8_bf16",
            "gemv_r4_w8_f32",
            "gemv_r8_w8_bf16",
            "gemv_r8_w8_f32",
        ],
    ),
    (
        "slim_scores.cu",
        concat!(
            include_str!("../../kernels/kv_types.cuh"),
            include_str!("../../kernels/slim_scores.cu")
        ),
        &[
            "unit_keys_bf16",
            "query_rows_f32",
            "softmax_rows_f32",
            "block_scores_f32",
        ],
    ),
];

/// Compile one file to PTX for `compute_<cc>` (e.g. 90 on an H200). Needs NVRTC, not a device.
pub fn compile(file: &str, cc: u32) -> Result<Ptx> {
    let (_, src, _) = FILES
        .iter()
        .find(|(f, _, _)| *f == file)
        .ok_or_else(|| crate::Error::Engine(format!("cuda: no kernel file {file}")))?;
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{cc}"),
            "--std=c++17".into(),
        ],
        name: Some(file.into()),
        ..Default::default()
    };
    compile_ptx_with_opts(format!("{COMMON}\n{src}"), opts).or_engine(&format!("NVRTC {file}"))
}

/// Compile every file (`slimchat gpu-check --compile`); returns (file, PTX bytes).
pub fn compile_all(cc: u32) -> Result<Vec<(String, usize)>> {
    FILES
        .iter()
        .map(|(f, _, _)| Ok((f.to_string(), compile(f, cc)?.to_src().len())))
        .collect()
}

/// Functions of one context, compiled and loaded on first use.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    cc: u32,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Dynamic shared memory limits raised so far, by entry point.
    shared_limits: Mutex<HashMap<String, usize>>,
}

impl Kernels {
    pub fn new(ctx: Arc<CudaContext>, cc: u32) -> Self {
        Self {
            ctx,
            cc,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            shared_limits: Mutex::new(HashMap::new()),
        }
    }

    /// The entry point `name`, allowed `bytes` of dynamic shared memory (over 48 KB needs the
    /// limit raised, once per size) and preferring the largest shared memory carveout (what
    /// such kernels read through L1 does not matter).
    pub fn get_with_shared(&self, name: &str, bytes: usize) -> Result<CudaFunction> {
        use cudarc::driver::sys::CUfunction_attribute_enum as Attr;
        let f = self.get(name)?;
        let mut limits = self.shared_limits.lock().expect("limit cache");
        if limits.get(name).is_none_or(|&have| have < bytes) {
            let set = |a, v: usize| f.set_attribute(a, i32::try_from(v).unwrap_or(i32::MAX));
            set(Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes).or_engine(name)?;
            set(
                Attr::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                100,
            )
            .or_engine(name)?;
            limits.insert(name.to_string(), bytes);
        }
        Ok(f)
    }

    /// The entry point `name`, from whichever file defines it.
    pub fn get(&self, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().expect("kernel cache").get(name) {
            return Ok(f.clone());
        }
        let (file, _, _) = FILES
            .iter()
            .find(|(_, _, entries)| entries.contains(&name))
            .ok_or_else(|| crate::Error::Engine(format!("cuda: no kernel named {name}")))?;
        let module = {
            let mut modules = self.modules.lock().expect("module cache");
            match modules.get(file) {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile(file, self.cc)?;
                    let m = self
                        .ctx
                        .load_module(ptx)
                        .or_engine(&format!("load {file}"))?;
                    modules.insert(file, m.clone());
                    m
                }
            }
        };
        let f = module.load_function(name).or_engine(name)?;
        self.functions
            .lock()
            .expect("kernel cache")
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Compile and load every file now (so compilation stays out of timings).
    pub fn load_all(&self) -> Result<()> {
        for (_, _, entries) in FILES {
            for e in entries.iter() {
                self.get(e)?;
            }
        }
        Ok(())
    }
}
