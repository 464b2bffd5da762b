#!/usr/bin/env bash
# bench/vs-llamacpp.sh - compare slimchat's prefill/decode speed with llama.cpp on this CPU.
#
# Stages (each is skipped when its result is already in the cache, so re-runs are cheap):
#   1. a Python venv with cmake and ninja from PyPI
#   2. the llama-cpp-python sdist from PyPI (it vendors llama.cpp's source), unpacked
#   3. the GCC 12 AMX fix (see shared/docs/cpu-anchors.md) applied with sed and checked
#   4. cmake configure + ninja build of llama-bench, llama-completion, llama-tokenize
#   5. llama-bench with AMX (default) and with --repack 0 (AVX-512/VNNI, no AMX); then the AMX
#      build's decode at a depth of each length (-p 0 -n 32 -d LENGTHS): the context slimchat's
#      decode sees after a prompt of that length
#   6. `slimchat bench --json` (slimchat is built with cargo if its binary is missing)
#   7. a Markdown table of both, printed with python3 (stdlib json only)
#
# Everything built or downloaded lives OUTSIDE the repo, under
#   ${SLIMCHAT_BENCH_CACHE:-$HOME/.cache/slimchat-bench}
# Not run in CI: a full run takes ~10 minutes of a 2-core machine (plus ~5 for the first build).
#
#   8. with --ppl-file TEXT: perplexity of the same model on TEXT by both engines
#      (bench/perplexity-vs-llamacpp.sh; ours must stay within 2% of llama-perplexity)
#
# Usage: bench/vs-llamacpp.sh [--lengths 512,2048] [--runs 3] [--model PATH]
#                             [--build-only] [--no-slimchat] [--ppl-file TEXT]
# Environment (flags win over these):
#   LENGTHS        prompt lengths, comma separated        (default 512,2048,4096,8192)
#   RUNS           repetitions per test                   (default 3)
#   MODEL          GGUF model file                        (default SmolLM2-135M-Instruct Q4_1)
#   THREADS        llama-bench threads (-t)                (default 2; slimchat picks its own)
#   SLIMCHAT_BIN   slimchat binary (default target/release/slimchat, built with cargo if missing;
#                  a path given here is never built)
#   SLIMCHAT_ARGS  extra arguments for `slimchat bench`   (default none)
#   LLAMA_CPP_PYTHON_VERSION  sdist version to vendor llama.cpp from (default 0.3.36, the one
#                  measured in cpu-anchors.md; set it empty to take the newest)
#   JOBS           parallel build jobs                    (default: nproc)
set -euo pipefail

# ---------------------------------------------------------------- settings
DEFAULT_MODEL="$HOME/.cache/slimchat/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE="${SLIMCHAT_BENCH_CACHE:-$HOME/.cache/slimchat-bench}"
LENGTHS="${LENGTHS:-512,2048,4096,8192}"
RUNS="${RUNS:-3}"
MODEL="${MODEL:-$DEFAULT_MODEL}"
THREADS="${THREADS:-2}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
BUILD_ONLY=0
RUN_SLIMCHAT=1
PPL_FILE=""

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --lengths) LENGTHS="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --no-slimchat) RUN_SLIMCHAT=0; shift ;;
        --ppl-file) PPL_FILE="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done

# Paths given by the caller are relative to the caller's folder; make them absolute before the
# script moves to the repo root (the parent of this script's folder).
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
MODEL="$(abspath "$MODEL")"
[[ -z "$PPL_FILE" ]] || PPL_FILE="$(abspath "$PPL_FILE")"
# cargo builds slimchat only when SLIMCHAT_BIN is left to its default (see stage 6)
SLIMCHAT_BIN_SET="${SLIMCHAT_BIN:+1}"
[[ -z "$SLIMCHAT_BIN_SET" ]] || SLIMCHAT_BIN="$(abspath "$SLIMCHAT_BIN")"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SLIMCHAT_BIN="${SLIMCHAT_BIN:-$REPO/target/release/slimchat}"

log() { echo "[vs-llamacpp] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ "$LENGTHS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "LENGTHS must look like 512,2048 (got '$LENGTHS')"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer (got '$RUNS')"
command -v python3 >/dev/null || die "python3 is needed"

mkdir -p "$CACHE"

# ---------------------------------------------------------------- 1. cmake + ninja in a venv
VENV="$CACHE/venv"
if [[ -x "$VENV/bin/cmake" && -x "$VENV/bin/ninja" ]]; then
    log "stage 1: cmake/ninja venv present ($VENV)"
else
    log "stage 1: creating venv with cmake and ninja from PyPI in $VENV"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check cmake ninja
fi
export PATH="$VENV/bin:$PATH"
log "  $(cmake --version | head -n1), ninja $(ninja --version)"

# ---------------------------------------------------------------- 2. llama.cpp source (sdist)
# Only the sdist itself is downloaded (--no-binary for this one package, --no-deps), which avoids
# building cmake/ninja from source during pip's metadata step.
SDIST_DIR="$CACHE/sdist"
mkdir -p "$SDIST_DIR"
spec="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"
find_sdist() {
    # newest matching tarball already in the cache, if any
    local pattern="llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION:-*}.tar.gz"
    find "$SDIST_DIR" -maxdepth 1 -name "$pattern" | sort -V | tail -n1
}
SDIST="$(find_sdist)"
if [[ -n "$SDIST" ]]; then
    log "stage 2: sdist present ($SDIST)"
else
    log "stage 2: downloading $spec sdist from PyPI"
    "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check \
        --no-deps --no-binary llama-cpp-python -d "$SDIST_DIR" "$spec"
    SDIST="$(find_sdist)"
    [[ -n "$SDIST" ]] || die "pip download produced no llama_cpp_python-*.tar.gz in $SDIST_DIR"
fi

# Unpack into $CACHE/src; a marker file tells a finished unpack from an interrupted one.
SRC_ROOT="$CACHE/src/$(basename "$SDIST" .tar.gz)"
if [[ -f "$SRC_ROOT/.unpacked" ]]; then
    log "  source already unpacked ($SRC_ROOT)"
else
    log "  unpacking $(basename "$SDIST")"
    rm -rf "$SRC_ROOT"
    mkdir -p "$CACHE/src"
    tar -xzf "$SDIST" -C "$CACHE/src"
    [[ -d "$SRC_ROOT/vendor/llama.cpp" ]] || die "no vendor/llama.cpp in $SDIST"
    touch "$SRC_ROOT/.unpacked"
fi
LLAMA="$SRC_ROOT/vendor/llama.cpp"
BUILD="$LLAMA/build"

# ---------------------------------------------------------------- 3. GCC 12 AMX fix
# GCC 12's _tile_loadconfig() passes an 8-byte memory operand, so the compiler drops the stores
# that fill the 64-byte tile config and the first tileloadd raises SIGILL. Load the whole struct
# with explicit asm instead (details: shared/docs/cpu-anchors.md).
MMQ="$LLAMA/ggml/src/ggml-cpu/amx/mmq.cpp"
FIXED_LINE='__asm__ volatile ("ldtilecfg %0" :: "m" (tc));'
if [[ ! -f "$MMQ" ]]; then
    log "stage 3: $MMQ not in this llama.cpp version; no AMX fix applied"
elif grep -qF "$FIXED_LINE" "$MMQ" && ! grep -qF '_tile_loadconfig(&tc);' "$MMQ"; then
    log "stage 3: AMX fix already applied"
elif grep -qF '_tile_loadconfig(&tc);' "$MMQ"; then
    log "stage 3: applying the GCC 12 AMX fix to $MMQ"
    sed -i 's|_tile_loadconfig(&tc);|__asm__ volatile ("ldtilecfg %0" :: "m" (tc));|' "$MMQ"
    # verify: the old call is gone and the asm is there
    if grep -qF '_tile_loadconfig(&tc);' "$MMQ" || ! grep -qF "$FIXED_LINE" "$MMQ"; then
        die "the AMX fix did not apply cleanly to $MMQ"
    fi
else
    log "stage 3: WARNING: neither '_tile_loadconfig(&tc);' nor the fix is in $MMQ;" \
        "the AMX code changed upstream - AMX runs may crash with SIGILL under GCC 12"
fi

# ---------------------------------------------------------------- 4. configure + build
TARGETS=(llama-bench llama-completion llama-tokenize llama-quantize llama-perplexity)
if [[ -f "$BUILD/build.ninja" ]]; then
    log "stage 4: build dir already configured ($BUILD)"
else
    log "stage 4: configuring llama.cpp (Release, GGML_NATIVE=ON, no curl/openssl/tests/server)"
    cmake -S "$LLAMA" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
        >"$BUILD.configure.log" 2>&1 || { tail -n 30 "$BUILD.configure.log" >&2; die "cmake failed"; }
fi
# Each target must exist in this llama.cpp version (they moved from examples/ to tools/ over time).
known_targets="$(ninja -C "$BUILD" -t targets all | cut -d: -f1)"
for t in "${TARGETS[@]}"; do
    grep -qx "$t" <<<"$known_targets" || die "target $t does not exist in this llama.cpp build"
    where="$(grep -rl --include=CMakeLists.txt "set(TARGET $t)" "$LLAMA/tools" "$LLAMA/examples" \
        2>/dev/null | head -n1 || true)"
    log "  target $t: ${where:+${where#"$LLAMA/"}}"
done
# ninja itself skips up-to-date targets, so this is quick on re-runs.
log "  building ${TARGETS[*]} with -j$JOBS (~5 min the first time, a no-op when up to date)"
ninja -C "$BUILD" -j"$JOBS" "${TARGETS[@]}" >"$BUILD.ninja.log" 2>&1 \
    || { tail -n 40 "$BUILD.ninja.log" >&2; die "ninja build failed (log: $BUILD.ninja.log)"; }
# A stable path for the binaries, whatever the sdist version: $CACHE/bin -> build/bin
ln -sfn "$BUILD/bin" "$CACHE/bin"
for t in "${TARGETS[@]}"; do [[ -x "$CACHE/bin/$t" ]] || die "missing binary $CACHE/bin/$t"; done
log "  binaries: $CACHE/bin/{$(IFS=,; echo "${TARGETS[*]}")}"

if [[ "$BUILD_ONLY" == 1 ]]; then
    log "--build-only: done"
    exit 0
fi

# ---------------------------------------------------------------- 5. llama.cpp benches
[[ -f "$MODEL" ]] || die "model not found: $MODEL"
OUT="$CACHE/results/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
log "raw results go to $OUT"
loadavg() { cut -d' ' -f1 /proc/loadavg; }
# Both engines use every core, so anything else running (a cargo build...) skews the numbers a lot:
# OpenMP threads spin-wait, and decode can drop 100x when a core is taken away.
if python3 -c "import sys; sys.exit(0 if float('$(loadavg)') > 0.5 * $(nproc) else 1)"; then
    log "WARNING: 1-min load average is $(loadavg) on $(nproc) cores before the benches;" \
        "other work on this machine will make the figures unreliable"
fi

# run_llama_bench NAME [extra args...]: writes $OUT/NAME.jsonl (stdout) and NAME.log (stderr).
# A failure (e.g. SIGILL) is reported but does not stop the script.
run_llama_bench() {
    local name="$1"; shift
    local args=(-p "$LENGTHS" -n 32 "$@")
    [[ "$name" == *-depth ]] && args=(-p 0 -n 32 -d "$LENGTHS" "$@")
    log "stage 5: llama-bench $name: ${args[*]} -r $RUNS -t $THREADS (load $(loadavg))"
    if ! "$CACHE/bin/llama-bench" -m "$MODEL" -t "$THREADS" "${args[@]}" -r "$RUNS" \
            -o jsonl >"$OUT/$name.jsonl" 2>"$OUT/$name.log"; then
        log "  WARNING: llama-bench $name failed; last lines of $OUT/$name.log:"
        tail -n 5 "$OUT/$name.log" >&2
    fi
}
run_llama_bench llama-amx
run_llama_bench llama-norepack --repack 0
run_llama_bench llama-amx-depth

# ---------------------------------------------------------------- 6. slimchat bench
# Any failure here (no cargo, build error, no `bench` subcommand yet, bad JSON) only loses the
# slimchat columns; the llama.cpp numbers are still printed.
SLIM_JSON="$OUT/slimchat.json"
: >"$SLIM_JSON"
if [[ "$RUN_SLIMCHAT" == 1 ]]; then
    if [[ ! -x "$SLIMCHAT_BIN" && -z "$SLIMCHAT_BIN_SET" ]]; then
        log "stage 6: $SLIMCHAT_BIN missing; running cargo build --release"
        cargo build --release >"$OUT/cargo-build.log" 2>&1 \
            || log "  WARNING: cargo build failed (log: $OUT/cargo-build.log)"
    fi
    if [[ -x "$SLIMCHAT_BIN" ]]; then
        slim_args=(bench --lengths "$LENGTHS" --runs "$RUNS" --json)
        # only pass --model when it differs from the default, which slimchat finds by itself
        [[ "$MODEL" == "$DEFAULT_MODEL" ]] || slim_args+=(--model "$MODEL")
        # shellcheck disable=SC2206
        slim_args+=(${SLIMCHAT_ARGS:-})
        log "stage 6: $SLIMCHAT_BIN ${slim_args[*]} (load $(loadavg))"
        if ! "$SLIMCHAT_BIN" "${slim_args[@]}" >"$SLIM_JSON" 2>"$OUT/slimchat.log"; then
            log "  WARNING: slimchat bench failed; last lines of $OUT/slimchat.log:"
            tail -n 5 "$OUT/slimchat.log" >&2
            : >"$SLIM_JSON"
        fi
    else
        log "  WARNING: no slimchat binary at $SLIMCHAT_BIN; slimchat columns will be n/a"
    fi
fi

# ---------------------------------------------------------------- 7. Markdown table
log "stage 7: table"
# which machine: llama.cpp is 2-3x faster where the CPU exposes AMX, so every ratio says it
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
if grep -qw amx_tile /proc/cpuinfo; then amx=yes; else amx=no; fi
echo "CPU: ${cpu_model:-unknown}, $(nproc) threads; AMX exposed (amx_tile): $amx"
echo
python3 - "$LENGTHS" "$OUT/llama-amx.jsonl" "$OUT/llama-norepack.jsonl" "$SLIM_JSON" \
    "$OUT/llama-amx-depth.jsonl" <<'PY'
import json, statistics, sys

lengths = [int(x) for x in sys.argv[1].split(",")]
amx_path, norepack_path, slim_path, depth_path = sys.argv[2:6]


def read_llama(path):
    """llama-bench jsonl -> ({n_prompt: tok/s}, decode tok/s from an empty context, n_gen,
    {n_depth: decode tok/s}); median of the samples."""
    prefill, decode, n_gen, at_depth = {}, None, None, {}
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return prefill, decode, n_gen, at_depth
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)
        except ValueError:
            continue
        samples = r.get("samples_ts") or [r.get("avg_ts")]
        ts = statistics.median(s for s in samples if s is not None)
        if r.get("n_gen", 0) == 0 and r.get("n_prompt", 0) > 0:
            prefill[r["n_prompt"]] = ts
        elif r.get("n_prompt", 0) == 0 and r.get("n_gen", 0) > 0:
            if r.get("n_depth", 0) > 0:
                at_depth[r["n_depth"]] = ts
            else:
                decode, n_gen = ts, r["n_gen"]
    return prefill, decode, n_gen, at_depth


def read_slimchat(path):
    """slimchat bench --json -> list of result dicts (empty when absent or unparsable)."""
    try:
        text = open(path).read().strip()
    except OSError:
        return []
    if not text:
        return []
    doc = None
    try:
        doc = json.loads(text)
    except ValueError:
        # tolerate log lines on stdout: take the last line that parses as an object
        for line in reversed(text.splitlines()):
            try:
                doc = json.loads(line)
                break
            except ValueError:
                continue
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        print("(slimchat output had no `results` array; slimchat columns are n/a)", file=sys.stderr)
        return []
    return [r for r in doc["results"] if isinstance(r, dict)]


def fmt(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


amx_pp, amx_tg, amx_ng, _ = read_llama(amx_path)
nr_pp, nr_tg, nr_ng, _ = read_llama(norepack_path)
_, _, _, amx_depth = read_llama(depth_path)
slim = read_slimchat(slim_path)

# Attach each slimchat result to the nearest requested length when within 10% (its
# prompt_tokens may differ a little, e.g. with a chat template; the real count is then shown);
# a result far from every requested length gets a row of its own.
rows = {n: [] for n in lengths}
for r in slim:
    pt = r.get("prompt_tokens")
    if not isinstance(pt, (int, float)):
        continue
    nearest = min(lengths, key=lambda n: abs(n - pt))
    if abs(nearest - pt) > max(16, nearest // 10):
        nearest = pt
    rows.setdefault(nearest, []).append(r)

print()
print("| prompt tokens | llama.cpp AMX prefill tok/s | llama.cpp --repack 0 prefill tok/s "
      "| slimchat mode | slimchat prefill tok/s | slimchat / AMX "
      "| llama.cpp AMX decode tok/s, empty context | llama.cpp --repack 0 decode, empty context "
      "| llama.cpp AMX decode at this depth | slimchat decode tok/s | slimchat / AMX at depth |")
print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for n in sorted(rows):
    entries = rows[n] or [None]
    for r in entries:
        if r is None:
            mode, s_pp, s_tg = "n/a", None, None
        else:
            mode = str(r.get("mode", "?"))
            if r.get("prompt_tokens") != n:
                mode += f" ({r.get('prompt_tokens')} tok)"
            s_pp, s_tg = r.get("prefill_tok_s"), r.get("decode_tok_s")
        a = amx_pp.get(n)
        ratio = f"{s_pp / a:.2f}x" if (s_pp and a) else "n/a"
        d = amx_depth.get(n)
        d_ratio = f"{s_tg / d:.2f}x" if (s_tg and d) else "n/a"
        print(f"| {n} | {fmt(a)} | {fmt(nr_pp.get(n))} | {mode} | {fmt(s_pp)} | {ratio} "
              f"| {fmt(amx_tg)} | {fmt(nr_tg)} | {fmt(d)} | {fmt(s_tg)} | {d_ratio} |")
print()
print(f"llama.cpp figures: median of llama-bench samples; its decode is tg{amx_ng or nr_ng or 32} "
      "from an empty context (the same number on every row), and its decode at a depth of the "
      "row's length (-p 0 -n 32 -d N), the context slimchat's decode sees.")
if slim:
    print("slimchat figures: as reported by `slimchat bench --json` "
          "(decode after a prompt of that length).")
else:
    print("slimchat: no results (binary missing, failed, or --no-slimchat).")
PY
log "raw files: $OUT"

# ---------------------------------------------------------------- 8. perplexity, both engines
if [[ -n "$PPL_FILE" ]]; then
    log "stage 8: perplexity of $(basename "$MODEL") on $(basename "$PPL_FILE")"
    SLIMCHAT_BIN="$SLIMCHAT_BIN" "$REPO/bench/perplexity-vs-llamacpp.sh" --model "$MODEL" \
        --file "$PPL_FILE" --threads "$THREADS" || log "  WARNING: the perplexity check failed"
fi
