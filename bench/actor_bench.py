"""Actor engine benchmark: decode throughput and weight-load time of one engine.

    python bench/actor_bench.py --engine vllm --requests 32 --tokens 128 --updates 5 [--stop]
    python bench/actor_bench.py --engine transformers --requests 8 --tokens 64

Without --model it builds the tiny test Qwen2 (demo/tinymodel.py) in a temporary folder.
Decode: `--requests` requests of `--tokens` new tokens each (EOS ignored), all added at once and
stepped to completion through the scout engine interface (stop checks and per-token
bookkeeping included), after one warm-up round; `--repeat` rounds, best and median reported
(a shared machine's neighbours make single rounds noisy). Weight load: `engine.update_weights` with a
perturbed copy of the model's own parameters (vLLM: layerwise reload through the worker
extension; transformers: in-place copy), `--updates` times. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _decode(engine, n: int, tokens: int, prompt: list[int], tag: str, stop: tuple[str, ...] = ()) -> tuple[int, float]:
    from actors.engine import SamplingSpec

    spec = SamplingSpec(max_tokens=tokens, temperature=1.0, ignore_eos=True, stop=stop)
    for i in range(n):
        engine.add(f"{tag}-{i}", prompt, spec)
    t0 = time.perf_counter()
    produced = 0
    while engine.has_unfinished():
        produced += sum(len(o.token_ids) for o in engine.step())
    return produced, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("vllm", "transformers"), default="vllm")
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="decode rounds (the best and the median are reported)")
    ap.add_argument("--stop", action="store_true", help="check the rollout stop strings (a random "
                    "model rarely emits them, so mostly their cost shows)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from actors.engine import TransformersEngine, VllmEngine
    from demo.tinymodel import build_tiny_model

    model = args.model or str(build_tiny_model(Path(tempfile.mkdtemp(prefix="scout-bench-")) / "tiny"))
    t0 = time.perf_counter()
    if args.engine == "vllm":
        engine = VllmEngine(model, max_model_len=args.prompt_tokens + args.tokens + 16, dtype="float32")
    else:
        engine = TransformersEngine(model, dtype="float32")
    load_s = time.perf_counter() - t0
    prompt = [int(t) for t in torch.randint(10, len(engine.tokenizer) - 10, (args.prompt_tokens,))]
    _decode(engine, min(4, args.requests), 8, prompt, "warm")
    stop = ("</search>", "</answer>") if args.stop else ()
    rounds = [_decode(engine, args.requests, args.tokens, prompt, f"run{r}", stop) for r in range(args.repeat)]
    rates = sorted(p / s for p, s in rounds)
    ref = TransformersEngine(model, dtype="float32")
    named = [(n, p.detach() + 0.01) for n, p in ref.model.named_parameters()]
    loads = [engine.update_weights(named, v + 1) for v in range(args.updates)]
    out = {"engine": args.engine, "stop_strings": bool(args.stop), "model": "tiny-qwen2 (2 layers, hidden 128)" if not args.model else args.model,
           "requests": args.requests, "new_tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
           "engine_load_s": round(load_s, 2), "decode_tokens": [p for p, _ in rounds],
           "tokens_per_s_best": round(rates[-1], 1), "tokens_per_s_median": round(rates[len(rates) // 2], 1),
           "weight_load_s_mean": round(sum(loads) / len(loads), 4) if loads else None,
           "weight_load_s_min": round(min(loads), 4) if loads else None,
           "params_mb": round(sum(t.numel() * t.element_size() for _, t in named) / 2**20, 2),
           "loadavg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(out))
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
