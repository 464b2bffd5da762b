#!/usr/bin/env python3
"""Write the default model's real weights as other LLaMA-family architectures, for perplexity
checks against llama.cpp (llama-perplexity) on files whose numbers mean something.

From one `llama` GGUF (default: SmolLM2-135M-Instruct Q4_1), dequantized to F16:
  --variant rope-freqs  arch llama plus a `rope_freqs.weight` tensor (Llama 3.1's per-frequency
                        divisors with factor 8 over an original context of 2048), so that the
                        rotary table's factors are exercised on real weights
  --variant qwen2       arch qwen2: q/k rows back in rotate-half (NEOX) order, small q/k/v biases
  --variant qwen3       arch qwen3: q/k in NEOX order, per-head q/k RMSNorm weights (ones), no
                        biases
Each is a different model from the source (biases, norms and factors change the function), but
llama.cpp and slimchat must agree on it. Quantize the result with llama-quantize (e.g. Q4_K_M).
Needs `gguf` and `numpy` (pip install gguf numpy, in a venv outside the repo). Example:
  python3 bench/make-arch-variants.py --variant qwen2 --out ~/models/smol-qwen2.F16.gguf
"""
import argparse
import math
import os

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

DEFAULT_MODEL = os.path.expanduser("~/.cache/slimchat/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def field_value(field):
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        if field.types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def add_field(writer, key, field):
    kind = field.types[0]
    value = field_value(field)
    if kind == GGUFValueType.ARRAY:
        writer.add_array(key, value)
    elif kind == GGUFValueType.STRING:
        writer.add_string(key, value)
    elif kind == GGUFValueType.BOOL:
        writer.add_bool(key, bool(value))
    elif kind == GGUFValueType.UINT32:
        writer.add_uint32(key, int(value))
    elif kind == GGUFValueType.INT32:
        writer.add_int32(key, int(value))
    elif kind == GGUFValueType.FLOAT32:
        writer.add_float32(key, float(value))
    else:
        raise SystemExit(f"unhandled field {key} of type {kind}")


def unpermute(w, n_head):
    """GGUF llama q/k rows (pairs interleaved per head) back to rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freqs(head_dim, theta, factor=8.0, low=1.0, high=4.0, original=2048):
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["rope-freqs", "qwen2", "qwen3"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default=DEFAULT_MODEL)
    args = ap.parse_args()
    r = GGUFReader(args.source)
    meta = {k: field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    n_head = meta["llama.attention.head_count"]
    n_kv = meta["llama.attention.head_count_kv"]
    hidden = meta["llama.embedding_length"]
    head_dim = hidden // n_head
    arch = "llama" if args.variant == "rope-freqs" else args.variant
    rng = np.random.default_rng(7)

    w = GGUFWriter(args.out, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        if key.startswith("llama."):
            key = arch + "." + key[len("llama."):]
        add_field(w, key, field)
    w.add_file_type(1)

    for t in r.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        name = t.name
        if arch != "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            data = unpermute(data, n_head if "attn_q" in name else n_kv)
        out = data.astype(np.float16) if data.ndim == 2 else data
        w.add_tensor(name, out)
        if arch == "qwen2" and name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight")):
            bias = (rng.standard_normal(data.shape[0]) * 0.05).astype(np.float32)
            w.add_tensor(name.replace(".weight", ".bias"), bias)
        if arch == "qwen3" and name.endswith("attn_norm.weight"):
            block = name[: -len("attn_norm.weight")]
            w.add_tensor(block + "attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            w.add_tensor(block + "attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
    if args.variant == "rope-freqs":
        w.add_tensor("rope_freqs.weight", rope_freqs(head_dim, meta["llama.rope.freq_base"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
