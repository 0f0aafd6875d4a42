"""Build a Hugging Face-format checkpoint from the SmolLM2 GGUF, so quantize's HF path runs on real weights.

The GGUF's tensors are dequantized to float32, renamed to HF's names and Q/K rows are un-permuted
back to HF order (the inverse of llama.cpp's convert permute); ``tokenizer.json`` is rebuilt from
the GGUF vocabulary and merges (byte-level BPE with SmolLM2's pre-tokenizer: digits split one by
one, then GPT-2's byte-level split), ``tokenizer_config.json`` carries the special tokens and chat
template, ``config.json`` the hyper-parameters.  Converting the folder back with
``edgellama-quantize FOLDER out.gguf --type f32`` must give the GGUF's dequantized tensors exactly.

Usage:  python tools/make_hf_checkpoint.py [--out DIR] [--shards N] [--force]
        (default DIR: <model cache>/SmolLM2-135M-Instruct-hf; not committed, ~540 MB)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgellama.gguf import GGUFFile  # noqa: E402
from edgellama.quants import dequantize  # noqa: E402
from quantize.hf import hf_name_of, qk_permutation  # noqa: E402  (the converter's name map, inverted)
from quantize.safetensors import write_safetensors  # noqa: E402
from quantize.vocab import CONTROL, USER_DEFINED  # noqa: E402  (llama.cpp's token types)
from tools.fetch_models import cache_dir, smollm2_q4_1  # noqa: E402

HF_DIR_NAME = "SmolLM2-135M-Instruct-hf"


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (quantize.hf's map, read backwards)."""
    return hf_name_of(gguf_name)


def unpermute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of the converter's Q/K permute: GGUF interleaved pairs back to HF halves order."""
    perm = qk_permutation(rows.shape[0], n_heads)
    out = np.empty_like(rows)  # (n_rows, n_cols)
    out[perm] = rows
    return out


def hf_weights(gguf: GGUFFile) -> dict[str, np.ndarray]:
    n_heads = gguf.metadata["llama.attention.head_count"]
    n_kv_heads = gguf.metadata.get("llama.attention.head_count_kv", n_heads)
    weights = {}
    for name, info in gguf.tensors.items():
        values = dequantize(gguf.raw(name), info.qtype, info.shape)
        if ".attn_q." in name:
            values = unpermute(values, n_heads)
        elif ".attn_k." in name:
            values = unpermute(values, n_kv_heads)
        weights[hf_name(name)] = values
    order = sorted(weights, key=lambda n: (n.startswith("model.layers."), _layer_of(n), n))
    return {n: weights[n] for n in order}


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


def hf_config(md: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": md["llama.embedding_length"],
        "intermediate_size": md["llama.feed_forward_length"],
        "num_hidden_layers": md["llama.block_count"],
        "num_attention_heads": md["llama.attention.head_count"],
        "num_key_value_heads": md["llama.attention.head_count_kv"],
        "max_position_embeddings": md["llama.context_length"],
        "rms_norm_eps": md["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": md["llama.rope.freq_base"],
        "rope_scaling": None,
        "vocab_size": len(md["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": md["tokenizer.ggml.bos_token_id"],
        "eos_token_id": md["tokenizer.ggml.eos_token_id"],
        "pad_token_id": md["tokenizer.ggml.padding_token_id"],
        "torch_dtype": "float32",
    }


def hf_tokenizer(md: dict) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) for the GGUF's byte-level BPE vocabulary."""
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": int(types[i]) == CONTROL}
             for i, t in enumerate(tokens) if int(types[i]) in (CONTROL, USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": list(md["tokenizer.ggml.merges"])},
    }
    name = lambda key: tokens[md[key]]
    config = {
        "add_prefix_space": False,
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "chat_template": md["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": md["llama.context_length"],
        "tokenizer_class": "GPT2Tokenizer",
    }
    return tokenizer, config


def write_shards(folder: Path, weights: dict[str, np.ndarray], n_shards: int, dtype: str | None = None) -> None:
    """model.safetensors, or n_shards files plus model.safetensors.index.json.  ``dtype="BF16"``
    marks uint16 arrays as bfloat16."""
    dtypes = {n: dtype for n in weights} if dtype else None
    if n_shards <= 1:
        write_safetensors(folder / "model.safetensors", weights, metadata={"format": "pt"}, dtypes=dtypes)
        return
    names = list(weights)
    total = sum(w.nbytes for w in weights.values())
    weight_map, shard, size, parts = {}, [], 0, []
    for name in names:  # greedy split into n_shards of about equal size
        shard.append(name)
        size += weights[name].nbytes
        if size >= total * (len(parts) + 1) / n_shards and len(parts) < n_shards - 1:
            parts.append(shard)
            shard = []
    parts.append(shard)
    for k, part in enumerate(parts, 1):
        filename = f"model-{k:05d}-of-{len(parts):05d}.safetensors"
        write_safetensors(folder / filename, {n: weights[n] for n in part}, metadata={"format": "pt"},
                          dtypes=dtypes)
        weight_map.update({n: filename for n in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_hf_checkpoint(gguf_path: str | Path, out_dir: str | Path, shards: int = 1) -> Path:
    """Write the HF folder for a llama GGUF (atomically: a temp folder renamed at the end)."""
    out_dir = Path(out_dir)
    gguf = GGUFFile(gguf_path)
    md = gguf.metadata
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_shards(tmp, hf_weights(gguf), shards)
        (tmp / "config.json").write_text(json.dumps(hf_config(md), indent=2))
        tokenizer, tokenizer_config = hf_tokenizer(md)
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        gguf.close()
    return out_dir


# ----- a tiny random checkpoint for fast tests ----------------------------------------------------

def tiny_tokenizer() -> tuple[dict, dict, int]:
    """A byte-level BPE tokenizer: 256 byte tokens, a few merges, 3 special tokens."""
    from edgellama.tokenizer import _gpt2_byte_chars

    chars = _gpt2_byte_chars()
    md = {"tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + chars,
          "tokenizer.ggml.token_type": np.array([CONTROL] * 3 + [1] * 256, dtype=np.int32),
          "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"],
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
          "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                     "<|im_end|>\n{% endfor %}", "llama.context_length": 128}
    for merge in md["tokenizer.ggml.merges"]:
        md["tokenizer.ggml.tokens"].append(merge.replace(" ", ""))
    md["tokenizer.ggml.token_type"] = np.concatenate(
        [md["tokenizer.ggml.token_type"], np.ones(len(md["tokenizer.ggml.merges"]), np.int32)])
    tokenizer, config = hf_tokenizer(md)
    return tokenizer, config, len(md["tokenizer.ggml.tokens"])


def tiny_llama_weights(rng: np.random.Generator, config: dict) -> dict[str, np.ndarray]:
    """Random HF-named float32 weights for a config (scaled like a trained model's)."""
    dim, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or dim // config["num_attention_heads"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    weights = {"model.embed_tokens.weight": w(vocab, dim)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32),
            p + "self_attn.q_proj.weight": w(q_rows, dim), p + "self_attn.k_proj.weight": w(kv_rows, dim),
            p + "self_attn.v_proj.weight": w(kv_rows, dim), p + "self_attn.o_proj.weight": w(dim, q_rows),
            p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32),
            p + "mlp.gate_proj.weight": w(ffn, dim), p + "mlp.up_proj.weight": w(ffn, dim),
            p + "mlp.down_proj.weight": w(dim, ffn),
        })
    weights["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = w(vocab, dim)
    return weights


def make_tiny_hf_checkpoint(out_dir: str | Path, *, seed: int = 0, shards: int = 1, dtype: str = "F32",
                            tied: bool = False, **config_overrides) -> Path:
    """A tiny random LlamaForCausalLM folder (GQA, 2 layers, dim 64) for tests; returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_config, vocab_size = tiny_tokenizer()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "rope_scaling": None, "vocab_size": vocab_size,
              "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    config.update(config_overrides)
    weights = tiny_llama_weights(np.random.default_rng(seed), config)
    if dtype == "F16":
        weights = {n: w.astype(np.float16) for n, w in weights.items()}
    elif dtype == "BF16":
        weights = {n: (w.view(np.uint32) >> 16).astype(np.uint16) for n, w in weights.items()}
    write_shards(out_dir, weights, shards, dtype="BF16" if dtype == "BF16" else None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    return out_dir


def smollm2_hf(shards: int = 1) -> Path:
    """The cached HF folder made from the SmolLM2 GGUF (built once)."""
    suffix = "" if shards <= 1 else f"-{shards}shards"
    out = cache_dir() / (HF_DIR_NAME + suffix)
    if not (out / "config.json").exists():
        make_hf_checkpoint(smollm2_q4_1(), out, shards)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="source GGUF (default: the cached SmolLM2 Q4_1 file)")
    parser.add_argument("--out", help=f"output folder (default: <cache>/{HF_DIR_NAME})")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors shards (default 1)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    gguf = Path(args.gguf) if args.gguf else smollm2_q4_1()
    out = Path(args.out) if args.out else cache_dir() / HF_DIR_NAME
    if (out / "config.json").exists() and not args.force:
        print(out)
        return 0
    print(make_hf_checkpoint(gguf, out, args.shards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
