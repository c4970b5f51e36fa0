"""Writes the model the real server serves on the GPU machine: a Qwen3-MoE config.json (served
with ``--load-format dummy``: random GPU weights, no checkpoint), the word-level tokenizer of
kttune's simulator assets (its 4096-token vocabulary is the config's, so the real
``sglang.bench_serving`` can tokenize prompts for it), and random CPU expert weights in
kt-kernel's merged safetensors layout, once per thread-pool count.

Why per pool count: kt-kernel's AMX loader (``kt_kernel/utils/loader.py``) counts the NUMA shards
it finds (``blk.L.ffn_{gate,up,down}_exps.E.numa.N.{weight,scale}``) and each shard holds
1/pools of every expert's intermediate rows, so a folder serves one ``--kt-threadpool-count``
only; the space names the folder with ``{kt-threadpool-count}``.

The bytes are random (uniform int8 in [-8, 8), scales 1e-3): right for timing and memory, not
for text. One random matrix per projection is copied to every expert and layer, which saves
minutes and changes no kernel's work. Idempotent: existing files are kept.

Usage: python3 make_model.py --out DIR [--layers 6 --experts 128 --topk 8 --hidden 2048
       --moe-intermediate 768 --pools 1 2 --method AMXINT8]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TOKENIZER_ASSETS = Path(__file__).resolve().parents[2] / "tuner" / "sim" / "assets" / "tokenizer"
BYTES_PER_WEIGHT = {"AMXINT8": 1.0, "AMXINT4": 0.5}


def write_config(model: Path, a: argparse.Namespace, vocab: int, bos: int, eos: int) -> None:
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": a.hidden,
           "intermediate_size": 3 * a.hidden, "moe_intermediate_size": a.moe_intermediate,
           "num_hidden_layers": a.layers, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
           "num_experts": a.experts, "num_experts_per_tok": a.topk, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "norm_topk_prob": True, "vocab_size": vocab, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
           "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
           "router_aux_loss_coef": 0.001, "output_router_logits": False, "bos_token_id": bos, "eos_token_id": eos,
           "initializer_range": 0.02}
    (model / "config.json").write_text(json.dumps(cfg, indent=1))
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))


def write_tokenizer(model: Path) -> tuple[int, int, int]:
    for f in TOKENIZER_ASSETS.glob("*.json"):
        shutil.copy(f, model / f.name)
    tok = json.loads((TOKENIZER_ASSETS / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    return len(vocab), vocab["<s>"], vocab["</s>"]


def write_kt_weights(folder: Path, a: argparse.Namespace, pools: int) -> None:
    import torch  # the GPU machine's torch; only needed here
    from safetensors.torch import save_file

    if a.moe_intermediate % pools:
        raise SystemExit(f"--moe-intermediate {a.moe_intermediate} does not split into {pools} pools")
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / ".done").exists():
        return
    rows = a.moe_intermediate // pools
    per_weight = BYTES_PER_WEIGHT[a.method]
    g = torch.Generator().manual_seed(0)

    def random_bytes(n: float) -> torch.Tensor:
        return torch.randint(-8, 8, (int(n),), dtype=torch.int8, generator=g).view(torch.uint8)

    # One random matrix per projection, copied to every expert: each expert still has its own
    # bytes in memory (the kernel streams them all), and writing takes seconds, not minutes.
    shapes = {"gate": (rows, a.hidden), "up": (rows, a.hidden), "down": (a.hidden, rows)}
    seeds = {proj: random_bytes(r * c * per_weight) for proj, (r, c) in shapes.items()}
    one_layer: dict[str, torch.Tensor] = {}
    for e in range(a.experts):
        for n in range(pools):
            for proj, (r, _) in shapes.items():
                key = f"ffn_{proj}_exps.{e}.numa.{n}"
                one_layer[key + ".weight"] = seeds[proj].clone()
                one_layer[key + ".scale"] = torch.full((r,), 1e-3, dtype=torch.float32)
    for layer in range(a.layers):
        save_file({f"blk.{layer}.{k}": v for k, v in one_layer.items()}, str(folder / f"layer{layer:03d}.safetensors"))
    (folder / ".done").write_text("ok\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--pools", type=int, nargs="+", default=[1, 2])
    p.add_argument("--method", choices=sorted(BYTES_PER_WEIGHT), default="AMXINT8")
    a = p.parse_args()
    model = a.out / "model"
    model.mkdir(parents=True, exist_ok=True)
    vocab, bos, eos = write_tokenizer(model)
    write_config(model, a, vocab, bos, eos)
    for pools in a.pools:
        write_kt_weights(a.out / f"kt-{a.method.lower()}-pools{pools}", a, pools)
    print(f"model {model} (vocab {vocab}), kt weights for pools {a.pools}")


if __name__ == "__main__":
    main()
