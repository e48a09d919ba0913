"""A bigger copy of a small Qwen2 checkpoint that computes the same function.

The actor bench (`bench/actor_bench.py --compare bare`) runs the demo's 2-layer, 64-wide model,
where vLLM's whole work is ~120 us of CPU a token and scout's per-token Python weighs heavily.
To see how the ratio moves as the engine's work per token grows, while the rollouts stay the
demo's (same searches, same answers, same turn lengths), this writes a wider and deeper model
whose logits equal the original's up to float rounding:

- hidden H -> H' (a multiple of H's head size): new embedding columns are zero, so the residual
  stream's new dimensions stay zero; RMSNorm weights are scaled by sqrt(H / H') and its eps by
  H / H', which keeps the mean over H' dimensions of a zero-padded vector equal to the old one;
- new attention heads: zero q/k/v biases and weights, zero o_proj columns (they add nothing);
- MLP intermediate I -> I * H' / H: new gate/up rows zero, new down_proj columns zero;
- extra layers: random q/k/v/gate/up (so the engine does real work), zero o_proj and down_proj
  (they add nothing to the residual stream).

    python bench/grow_model.py --src .scout/demo/base-model --dst /tmp/grown --hidden 512 --layers 8
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

COPY = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def _pad(t, shape):
    """`t` in the top-left corner of a zero tensor of `shape`."""
    import torch

    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _grow_layer(sd: dict, p: str, h: int, h2: int, i2: int, scale: float) -> dict:
    """One existing layer, padded to width h2 (prefix `p`, e.g. 'model.layers.0.')."""
    out = {}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        w = sd[f"{p}{norm}.weight"]
        out[f"{p}{norm}.weight"] = _pad(w * scale, (h2,))
    for proj in ("q_proj", "k_proj", "v_proj"):
        w, b = sd[f"{p}self_attn.{proj}.weight"], sd[f"{p}self_attn.{proj}.bias"]
        rows = w.shape[0] * h2 // h
        out[f"{p}self_attn.{proj}.weight"] = _pad(w, (rows, h2))
        out[f"{p}self_attn.{proj}.bias"] = _pad(b, (rows,))
    w = sd[f"{p}self_attn.o_proj.weight"]
    out[f"{p}self_attn.o_proj.weight"] = _pad(w, (h2, w.shape[1] * h2 // h))
    for proj in ("gate_proj", "up_proj"):
        out[f"{p}mlp.{proj}.weight"] = _pad(sd[f"{p}mlp.{proj}.weight"], (i2, h2))
    out[f"{p}mlp.down_proj.weight"] = _pad(sd[f"{p}mlp.down_proj.weight"], (h2, i2))
    return out


def _inert_layer(p: str, h2: int, i2: int, gen) -> dict:
    """A layer that does real work and adds nothing: its output projections are zero (as many
    heads as width, no grouped-query attention: q, k and v are h2 x h2)."""
    import torch

    def rnd(*shape):
        return torch.randn(shape, generator=gen) * 0.02

    return {f"{p}input_layernorm.weight": torch.ones(h2), f"{p}post_attention_layernorm.weight": torch.ones(h2),
            f"{p}self_attn.q_proj.weight": rnd(h2, h2), f"{p}self_attn.q_proj.bias": rnd(h2),
            f"{p}self_attn.k_proj.weight": rnd(h2, h2), f"{p}self_attn.k_proj.bias": rnd(h2),
            f"{p}self_attn.v_proj.weight": rnd(h2, h2), f"{p}self_attn.v_proj.bias": rnd(h2),
            f"{p}self_attn.o_proj.weight": torch.zeros(h2, h2),
            f"{p}mlp.gate_proj.weight": rnd(i2, h2), f"{p}mlp.up_proj.weight": rnd(i2, h2),
            f"{p}mlp.down_proj.weight": torch.zeros(h2, i2)}


def grow(src: Path, dst: Path, hidden: int, layers: int, seed: int = 0) -> dict:
    """Write the grown model to `dst`; returns its config."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "qwen2":
        raise SystemExit(f"{src}: model_type {cfg.get('model_type')!r}; only qwen2 checkpoints can be grown")
    h, n_layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    if hidden < h or hidden % h or layers < n_layers:
        raise SystemExit(f"--hidden must be a multiple of {h} and --layers at least {n_layers}")
    if cfg.get("num_key_value_heads", heads) != heads:
        raise SystemExit("grouped-query attention is not supported (num_key_value_heads != num_attention_heads)")
    sd = load_file(str(src / "model.safetensors"))
    i2 = cfg["intermediate_size"] * hidden // h
    scale = math.sqrt(h / hidden)
    out = {"model.embed_tokens.weight": _pad(sd["model.embed_tokens.weight"], (cfg["vocab_size"], hidden)),
           "model.norm.weight": _pad(sd["model.norm.weight"] * scale, (hidden,))}
    for i in range(n_layers):
        out.update(_grow_layer(sd, f"model.layers.{i}.", h, hidden, i2, scale))
    gen = torch.Generator().manual_seed(seed)
    for i in range(n_layers, layers):
        out.update(_inert_layer(f"model.layers.{i}.", hidden, i2, gen))
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = _pad(sd["lm_head.weight"], (cfg["vocab_size"], hidden))
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    new = dict(cfg, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=i2,
               num_attention_heads=heads * hidden // h, num_key_value_heads=heads * hidden // h,
               rms_norm_eps=cfg["rms_norm_eps"] * h / hidden,
               layer_types=["full_attention"] * layers, max_window_layers=max(layers, cfg.get("max_window_layers", 0)))
    (dst / "config.json").write_text(json.dumps(new, indent=2))
    for name in COPY:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return new


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="a Qwen2 checkpoint folder (the demo's base-model)")
    ap.add_argument("--dst", required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    args = ap.parse_args()
    cfg = grow(Path(args.src), Path(args.dst), args.hidden, args.layers)
    print(json.dumps({"dst": args.dst, "hidden_size": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
                      "intermediate_size": cfg["intermediate_size"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
