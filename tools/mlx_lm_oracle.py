#!/usr/bin/env python3
"""Oracle for mlxq's model-directory tests: tiny Hugging Face models, mlx_lm's conversion of
them, generation with mlx_lm, and MLX's matmuls on a converted directory.

Needs mlx[cpu]==0.32.4 and mlx-lm==0.32.2 (see .ci/run). Subcommands:

  make OUT --arch llama|mixtral|qwen3_moe [--seed N] [--dtype float32|float16|bfloat16]
      [--shards N] [--size tiny|big]
      A Hugging Face-style directory with random weights: config.json, safetensors (sharded
      with an index when --shards > 1), generation_config.json and a tiny word-level tokenizer.
      `--size big` makes a Llama of a few GB for the memory/throughput run.
  convert HF OUT [mlx_lm.convert options...]
      Runs mlx_lm.convert on MLX's CPU (so mx.quantize is the CPU flavour).
  generate DIR [--tokens N] [--prompt TEXT]
      Greedy generation with mlx_lm; prints the token ids as one JSON line.
  matmul DIR OUT.safetensors [--seed N]
      For every quantized module of DIR (as mlx_lm loads it): a random float32 x (so MLX
      accumulates and returns float32) and MLX's quantized_matmul (gather_qmm with x
      [3, 1, 1, K] and indices [3, 2] for expert stacks, as SwitchGLU calls it), saved as
      `<module>.x`, `<module>.y` (and `<module>.indices`) for mlxq to compare against.
"""

import argparse
import json
import os
import sys
from pathlib import Path


def die(msg):
    print(f"mlx_lm_oracle: {msg}", file=sys.stderr)
    sys.exit(2)


WORDS = [
    "<unk>", "<s>", "</s>", "the", "a", "model", "weight", "group", "bits", "scale",
    "bias", "mlx", "quantize", "cpu", "gpu", "expert", "router", "token", "layer", "norm",
    "hello", "world", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "and", "or", "not", "is", "of", "to", "in", "on",
]


def write_tokenizer(out: Path, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)}
    for i in range(len(WORDS), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def config_for(arch: str, size: str):
    if size == "big":
        # ~1.2 B parameters: 2.4 GB in bfloat16, 4.8 GB in float32.
        dims = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=12,
                    num_attention_heads=16, num_key_value_heads=8, vocab_size=32768)
    else:
        dims = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=384)
    base = dict(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        _name_or_path="mlxq/tiny-" + arch,
        **dims,
    )
    if arch == "llama":
        return dict(base, model_type="llama", architectures=["LlamaForCausalLM"],
                    hidden_act="silu", attention_bias=False, mlp_bias=False)
    if arch == "mixtral":
        return dict(base, model_type="mixtral", architectures=["MixtralForCausalLM"],
                    num_local_experts=4, num_experts_per_tok=2, hidden_act="silu")
    if arch == "qwen3_moe":
        return dict(base, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                    num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                    mlp_only_layers=[], moe_intermediate_size=256, head_dim=64,
                    norm_topk_prob=True, hidden_act="silu", attention_bias=False)
    die(f"unknown arch {arch}")


def hf_tensors(cfg, arch, rng):
    """Makers of float32 numpy tensors, named as Hugging Face names them (made on demand, so a
    big model is generated one shard at a time)."""
    import numpy as np

    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", H // nh)

    class Lazy:
        def __init__(self, f):
            self.f = f

    def lin(n, k):
        return Lazy(lambda: rng.standard_normal((n, k), dtype=np.float32) * (1.0 / np.sqrt(k)))

    t = {"model.embed_tokens.weight": lin(V, H), "model.norm.weight": 1 + 0.1 * rng.standard_normal(H, dtype=np.float32)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = lin(V, H)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        t[f"{p}.self_attn.q_proj.weight"] = lin(nh * hd, H)
        t[f"{p}.self_attn.k_proj.weight"] = lin(nkv * hd, H)
        t[f"{p}.self_attn.v_proj.weight"] = lin(nkv * hd, H)
        t[f"{p}.self_attn.o_proj.weight"] = lin(H, nh * hd)
        t[f"{p}.input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(H, dtype=np.float32)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(H, dtype=np.float32)
        if arch == "llama":
            t[f"{p}.mlp.gate_proj.weight"] = lin(I, H)
            t[f"{p}.mlp.up_proj.weight"] = lin(I, H)
            t[f"{p}.mlp.down_proj.weight"] = lin(H, I)
            t[f"{p}.self_attn.rotary_emb.inv_freq"] = rng.standard_normal(hd // 2, dtype=np.float32)
        elif arch == "mixtral":
            E = cfg["num_local_experts"]
            t[f"{p}.block_sparse_moe.gate.weight"] = lin(E, H)
            for e in range(E):
                q = f"{p}.block_sparse_moe.experts.{e}"
                t[f"{q}.w1.weight"] = lin(I, H)
                t[f"{q}.w2.weight"] = lin(H, I)
                t[f"{q}.w3.weight"] = lin(I, H)
        elif arch == "qwen3_moe":
            E, MI = cfg["num_experts"], cfg["moe_intermediate_size"]
            t[f"{p}.self_attn.q_norm.weight"] = 1 + 0.1 * rng.standard_normal(hd, dtype=np.float32)
            t[f"{p}.self_attn.k_norm.weight"] = 1 + 0.1 * rng.standard_normal(hd, dtype=np.float32)
            t[f"{p}.mlp.gate.weight"] = lin(E, H)
            for e in range(E):
                q = f"{p}.mlp.experts.{e}"
                t[f"{q}.gate_proj.weight"] = lin(MI, H)
                t[f"{q}.up_proj.weight"] = lin(MI, H)
                t[f"{q}.down_proj.weight"] = lin(H, MI)
    return t


def cmd_make(a):
    import mlx.core as mx
    import numpy as np

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=False)
    cfg = config_for(a.arch, a.size)
    cfg["torch_dtype"] = a.dtype
    rng = np.random.default_rng(a.seed)
    dtype = getattr(mx, a.dtype)
    tensors = hf_tensors(cfg, a.arch, rng)
    names = sorted(tensors)
    shards = [names[i :: a.shards] for i in range(a.shards)] if a.shards > 1 else [names]
    weight_map = {}
    for i, members in enumerate(shards):
        fname = (
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            if len(shards) > 1
            else "model.safetensors"
        )
        d = {}
        for n in members:
            v = tensors[n]
            v = v.f() if hasattr(v, "f") else v
            d[n] = mx.array(v).astype(dtype)
            del v
        mx.save_safetensors(str(out / fname), d, metadata={"format": "pt"})
        for n in members:
            weight_map[n] = fname
            del tensors[n]
        del d
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2)
        )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2)
    )
    write_tokenizer(out, cfg["vocab_size"])
    print(out)


def cmd_convert(a, rest):
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    import importlib

    conv = importlib.import_module("mlx_lm.convert")

    parser = conv.configure_parser()
    args = parser.parse_args(["--hf-path", a.hf, "--mlx-path", a.out] + rest)
    conv.convert(**vars(args))


def cmd_generate(a):
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(a.dir)
    prompt = mx.array(tok.encode(a.prompt))
    ids = []
    for (t, _), _ in zip(generate_step(prompt, model, max_tokens=a.tokens), range(a.tokens)):
        ids.append(int(t))
    print(json.dumps(ids))


def cmd_matmul(a):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    mx.set_default_device(mx.cpu)
    from mlx_lm import load
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    model, _ = load(a.dir)
    mx.random.seed(a.seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedSwitchLinear):
            E, K = m.num_experts, m.input_dims
            x = mx.random.normal((3, 1, 1, K))
            idx = mx.random.randint(0, E, (3, 2)).astype(mx.uint32)
            y = mx.gather_qmm(x, m["weight"], m["scales"], m.get("biases"), rhs_indices=idx,
                              transpose=True, group_size=m.group_size, bits=m.bits, mode=m.mode)
            out[f"{name}.indices"] = idx
        elif isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            K = m.scales.shape[-1] * m.group_size
            x = mx.random.normal((5, K))
            y = mx.quantized_matmul(x, m["weight"], m["scales"], m.get("biases"), transpose=True,
                                    group_size=m.group_size, bits=m.bits, mode=m.mode)
        else:
            continue
        out[f"{name}.x"] = x
        out[f"{name}.y"] = y
    mx.eval(out)
    mx.save_safetensors(a.out, out)
    print(len(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("--arch", default="llama")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    m.add_argument("--shards", type=int, default=1)
    m.add_argument("--size", default="tiny", choices=["tiny", "big"])
    c = sub.add_parser("convert")
    c.add_argument("hf")
    c.add_argument("out")
    g = sub.add_parser("generate")
    g.add_argument("dir")
    g.add_argument("--tokens", type=int, default=12)
    g.add_argument("--prompt", default="hello world the model")
    mm = sub.add_parser("matmul")
    mm.add_argument("dir")
    mm.add_argument("out")
    mm.add_argument("--seed", type=int, default=0)
    a, rest = p.parse_known_args()
    if a.cmd == "convert":
        cmd_convert(a, rest)
    elif rest:
        die(f"unknown arguments {rest}")
    elif a.cmd == "make":
        cmd_make(a)
    elif a.cmd == "generate":
        cmd_generate(a)
    else:
        cmd_matmul(a)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
