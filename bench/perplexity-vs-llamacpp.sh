#!/usr/bin/env bash
# bench/perplexity-vs-llamacpp.sh - slimchat's perplexity against llama.cpp's llama-perplexity
# on the same model and text, with the same method (chunks of --ctx tokens from an empty cache,
# the second half of each scored).
#
# llama-perplexity is looked up under ${SLIMCHAT_BENCH_CACHE:-$HOME/.cache/slimchat-bench}/bin,
# where bench/vs-llamacpp.sh builds llama.cpp (build it there with
# `ninja -C <cache>/src/llama_cpp_python-*/vendor/llama.cpp/build llama-perplexity`).
# The text needs at least 2 x ctx tokens; with the default 20 chunks of 512, ~10k tokens are read.
#
# Usage: bench/perplexity-vs-llamacpp.sh --file TEXT [--model GGUF] [--ctx 512] [--chunks 20]
#                                        [--threads 2]
# Environment:
#   SLIMCHAT_BIN   slimchat binary (default ${CARGO_TARGET_DIR:-target}/release/slimchat, built
#                  with cargo if missing; a path given here is never built)
#   SLIMCHAT_ARGS  extra arguments for `slimchat perplexity` (e.g. "--linear dense")
# Prints both perplexities, the relative difference and where the raw outputs are.
set -euo pipefail

DEFAULT_MODEL="$HOME/.cache/slimchat/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE="${SLIMCHAT_BENCH_CACHE:-$HOME/.cache/slimchat-bench}"
MODEL="$DEFAULT_MODEL"
FILE=""
CTX=512
CHUNKS=20
THREADS=2

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --file) FILE="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --ctx) CTX="$2"; shift 2 ;;
        --chunks) CHUNKS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done

log() { echo "[perplexity-vs-llamacpp] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
[[ -n "$FILE" ]] || die "--file TEXT is required (try --help)"
FILE="$(abspath "$FILE")"
MODEL="$(abspath "$MODEL")"
SLIMCHAT_BIN_SET="${SLIMCHAT_BIN:+1}"
[[ -z "$SLIMCHAT_BIN_SET" ]] || SLIMCHAT_BIN="$(abspath "$SLIMCHAT_BIN")"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
SLIMCHAT_BIN="${SLIMCHAT_BIN:-$(abspath "$TARGET")/release/slimchat}"

for n in CTX CHUNKS THREADS; do
    [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer (got '${!n}')"
done
[[ -f "$FILE" ]] || die "text not found: $FILE"
[[ -f "$MODEL" ]] || die "model not found: $MODEL"
LLAMA_PPL="$CACHE/bin/llama-perplexity"
[[ -x "$LLAMA_PPL" ]] || die "no $LLAMA_PPL: build llama.cpp with bench/vs-llamacpp.sh --build-only, then ninja llama-perplexity in its build folder"
command -v python3 >/dev/null || die "python3 is needed"
if [[ ! -x "$SLIMCHAT_BIN" ]]; then
    [[ -z "$SLIMCHAT_BIN_SET" ]] || die "no slimchat binary at $SLIMCHAT_BIN"
    log "$SLIMCHAT_BIN missing; running cargo build --release"
    cargo build --release >&2
fi

OUT="$CACHE/results/perplexity-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"

log "llama-perplexity -t $THREADS -c $CTX --chunks $CHUNKS (load $(cut -d' ' -f1 /proc/loadavg))"
"$LLAMA_PPL" -m "$MODEL" -f "$FILE" -t "$THREADS" -c "$CTX" --chunks "$CHUNKS" \
    >"$OUT/llama.out" 2>"$OUT/llama.log" \
    || { tail -n 5 "$OUT/llama.log" >&2; die "llama-perplexity failed (log: $OUT/llama.log)"; }

log "slimchat perplexity --threads $THREADS --ctx $CTX --chunks $CHUNKS ${SLIMCHAT_ARGS:-}"
# shellcheck disable=SC2206
slim_args=(perplexity --model "$MODEL" --file "$FILE" --threads "$THREADS" --ctx "$CTX"
    --chunks "$CHUNKS" --json ${SLIMCHAT_ARGS:-})
"$SLIMCHAT_BIN" "${slim_args[@]}" >"$OUT/slimchat.json" 2>"$OUT/slimchat.log" \
    || { tail -n 5 "$OUT/slimchat.log" >&2; die "slimchat perplexity failed (log: $OUT/slimchat.log)"; }

python3 - "$OUT/llama.out" "$OUT/llama.log" "$OUT/slimchat.json" "$FILE" "$CTX" <<'PY'
import json, re, sys

llama_out, llama_log, slim_json, text, ctx = sys.argv[1:6]
both = open(llama_out).read() + open(llama_log).read()
m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", both)
if not m:
    sys.exit("no 'Final estimate: PPL = ...' in llama-perplexity's output")
llama, llama_err = float(m.group(1)), float(m.group(2))
chunks = re.findall(r"\[(\d+)\][0-9.]+,", both)
s = json.load(open(slim_json))
ours = s["ppl"]
rel = (ours - llama) / llama
print(f"text: {text} ({s['text_tokens']} tokens), ctx {ctx}, {s['chunks']} chunks "
      f"(llama.cpp: {len(chunks)}), {s['tokens']} tokens scored")
print(f"llama.cpp llama-perplexity: PPL = {llama:.4f} +/- {llama_err:.4f}")
print(f"slimchat perplexity ({s['linear']}): PPL = {ours:.4f} +/- {s['ppl_stderr']:.4f} "
      f"in {s['seconds']:.1f} s")
print(f"relative difference (slimchat - llama.cpp) / llama.cpp: {rel:+.3%}")
PY
log "raw outputs: $OUT"
