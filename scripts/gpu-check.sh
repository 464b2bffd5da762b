#!/usr/bin/env bash
# The GPU check of issues 7 and 18, run on the device machine from the repository root with a
# binary built here (`cargo build --release --features cuda`, stripped into gpu-bin/; with the
# agreement model beside it the binary travels gzipped: bench/NOTES.md, "The GPU bars, worked on
# with the device", has the exact call):
#
#   bash scripts/gpu-check.sh /tmp/gpu   (then tar the folder into $OUT: 8 files come back)
#
# (1) every kernel against its CPU reference, (1b) a real model's logits on the GPU against the
# CPU engine, (1c) the chat engine answering on the GPU, (2) a Llama-3.1-8B-shaped model with random bf16
# weights built on the device, (3) a table of dense vs pruned TTFT at 8k/16k/32k, decode
# tokens/s, GPU prompt KV bytes, the pruned prompt's KV tiered (VRAM against dense, decode
# against resident, the offloads' tail and decode's fetch time), VRAM, the cuBLAS bf16
# rate and the GEMM floor, the kernels' rates and the forward's profile, (4) full numbers in
# OUT_DIR (gpu_check.json, logs). Each step runs under a timeout so the whole script ends
# within 8 minutes (60 + 3 x 60 + 280 s; on an H200 it took 45 s).
set -uo pipefail
out="${1:?usage: scripts/gpu-check.sh OUT_DIR}"
bin="${SLIMCHAT_BIN:-gpu-bin/slimchat}"
mkdir -p "$out"
[ -x "$bin" ] || { echo "gpu-check.sh: no binary at $bin (build and carry it, see bench/NOTES.md)"; exit 2; }

# cuBLAS and NVRTC: from the CUDA toolkit or the Python wheels of the image; the driver
# (libcuda.so.1) is on the loader's default path.
libs=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /opt -maxdepth 9 \
    \( -name 'libcublas.so*' -o -name 'libnvrtc.so*' \) 2>/dev/null | grep -v /stubs/ | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu-check.sh: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$out/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem \
    --format=csv 2>&1 | tee -a "$out/env.txt"

# (1) kernels, alone first, so a failure of the long run still leaves them
timeout 60 "$bin" gpu-check --kernels "$out/kernels" 2>&1 | tee "$out/kernels.log"
kernels=${PIPESTATUS[0]}
# (1b) a real model's teacher-forced logits on the GPU against the CPU engine, when its file was
# carried (gpu-bin/agreement.gguf: the default model's first 8 layers, bench/NOTES.md)
agreement=" skipped"
model="${SLIMCHAT_AGREEMENT_MODEL:-$(dirname "$bin")/agreement.gguf}"
if [ -f "$model" ]; then
    # against the engine's product path (int8 linear layers) and its f32 reference
    agreement=""
    for linear in int8 dense-f32; do
        timeout 60 "$bin" --model "$model" --linear "$linear" gpu-check --agreement 256 \
            "$out/agreement-$linear" 2>&1 | tee -a "$out/agreement.log"
        agreement="$agreement $linear:${PIPESTATUS[0]}"
    done
    # (1c) the chat engine itself on the GPU (the device forward): one answer, with its JSON
    timeout 60 "$bin" --model "$model" --device cuda run --max-tokens 16 --json \
        -p "Name three colours." > "$out/chat-on-gpu.json" 2> "$out/chat-on-gpu.log"
    agreement="$agreement chat:$?"
fi
# (2)-(4) the 8B-shaped run; the JSON is rewritten after every prompt length
timeout 280 "$bin" gpu-check --lengths "${GPU_CHECK_LENGTHS:-8192,16384,32768}" "$out" 2>&1 | tee "$out/run.log"
run=${PIPESTATUS[0]}
nvidia-smi --query-gpu=memory.used,clocks.sm --format=csv 2>&1 | tee -a "$out/env.txt"
echo "gpu-check.sh: kernels exit $kernels, agreement exit$agreement, run exit $run (124 = timed out)"
[ "$kernels" = 0 ] && [ "$run" = 0 ]
