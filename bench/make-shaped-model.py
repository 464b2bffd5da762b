#!/usr/bin/env python3
"""Write a LLaMA-family GGUF of a real model's shape with random weights, for speed benchmarks.

The tokenizer metadata and chat template are copied from a real GGUF (default: slimchat's default
model), so slimchat and llama.cpp tokenize and template as they would for that model; the weights
are random (normal, std 0.02; norms 1), in F16, ready for llama-quantize (e.g. to Q4_K_M).

Shapes (--shape):
  llama3.2-1b   16 layers, hidden 2048, 32 query / 8 KV heads, FFN 8192, rope_freqs (Llama 3.1
                scaling: factor 32, low 1, high 4, original context 8192), theta 500000, tied head
  llama3.2-3b   28 layers, hidden 3072, 24 / 8 heads, FFN 8192, as above
Needs the `gguf` and `numpy` packages (pip install gguf numpy; keep them in a venv outside the
repo). The file is written outside the repo by the caller: e.g.
  python3 bench/make-shaped-model.py --shape llama3.2-1b --out ~/models/llama3.2-1b-random.F16.gguf
"""
import argparse
import math
import os

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

SHAPES = {
    "llama3.2-1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192, size="1B"),
    "llama3.2-3b": dict(layers=28, hidden=3072, heads=24, kv_heads=8, ffn=8192, size="3B"),
}
DEFAULT_MODEL = os.path.expanduser("~/.cache/slimchat/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def llama3_rope_freqs(head_dim, theta, factor=32.0, low=1.0, high=4.0, original=8192):
    """The per-frequency divisors llama.cpp's converter writes as rope_freqs.weight."""
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def copy_tokenizer(reader, writer):
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == GGUFValueType.STRING:
                values = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                values = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(key, values)
        elif kind == GGUFValueType.STRING:
            writer.add_string(key, bytes(field.parts[field.data[0]]).decode("utf-8"))
        elif kind == GGUFValueType.BOOL:
            writer.add_bool(key, bool(field.parts[field.data[0]][0]))
        elif kind == GGUFValueType.UINT32:
            writer.add_uint32(key, int(field.parts[field.data[0]][0]))
        else:
            raise SystemExit(f"unhandled tokenizer field {key} of type {kind}")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return len(tokens.data)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-1b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-from", default=DEFAULT_MODEL)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    s = SHAPES[args.shape]
    hidden, heads, kv_heads = s["hidden"], s["heads"], s["kv_heads"]
    head_dim = hidden // heads
    theta = 500000.0
    rng = np.random.default_rng(args.seed)

    reader = GGUFReader(args.tokenizer_from)
    w = GGUFWriter(args.out, "llama")
    w.add_name(f"random {args.shape}")
    w.add_string("general.basename", "Llama-3.2")
    w.add_string("general.size_label", s["size"])
    vocab = copy_tokenizer(reader, w)
    w.add_block_count(s["layers"])
    w.add_context_length(131072)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(1)  # mostly F16

    def weight(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(hidden, dtype=np.float32)
    w.add_tensor("token_embd.weight", weight(vocab, hidden))
    w.add_tensor("rope_freqs.weight", llama3_rope_freqs(head_dim, theta))
    w.add_tensor("output_norm.weight", ones)
    kv = kv_heads * head_dim
    for i in range(s["layers"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", weight(hidden, hidden))
        w.add_tensor(p + "attn_k.weight", weight(kv, hidden))
        w.add_tensor(p + "attn_v.weight", weight(kv, hidden))
        w.add_tensor(p + "attn_output.weight", weight(hidden, hidden))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", weight(s["ffn"], hidden))
        w.add_tensor(p + "ffn_up.weight", weight(s["ffn"], hidden))
        w.add_tensor(p + "ffn_down.weight", weight(hidden, s["ffn"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
