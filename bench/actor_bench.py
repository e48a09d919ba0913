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

    python bench/actor_bench.py --compare bare --demo-dir <a prepared demo folder> --groups 96 --repeat 6

`--compare bare`: scout's whole rollout loop (multi-turn, real searches against a `cli.py
retriever` child, rewards, groups sent to a ZeroMQ sink that acks) on the demo's base model,
questions and sampling, against bare vLLM replaying exactly the same turns, round by round
(bench/actor_replay.py says how); the ratio is bare wall time / scout wall time, also given in
CPU seconds (steadier on a shared machine), with scout's time split into the worker's phases.
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
    ap.add_argument("--model", default=None, help="a model folder; with --compare it replaces the demo's "
                    "base model (bench/grow_model.py makes a bigger one that writes the same rollouts)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="decode rounds (the best and the median are reported)")
    ap.add_argument("--stop", action="store_true", help="check the rollout stop strings (a random "
                    "model rarely emits them, so mostly their cost shows)")
    ap.add_argument("--compare", choices=("bare",), default=None, help="scout's rollout loop against bare vLLM")
    ap.add_argument("--demo-dir", default=".scout/demo", help="--compare: a prepared demo folder (only read)")
    ap.add_argument("--engine-leg", action="store_true", help="--compare: also replay through scout's engine "
                    "interface alone (no rollout loop), after the bare replay")
    ap.add_argument("--warmup", type=int, default=1, help="--compare: rounds left out of the figures")
    ap.add_argument("--groups", type=int, default=96, help="--compare: groups a round")
    ap.add_argument("--in-flight", type=int, default=32, help="--compare: groups in flight (the demo's credits)")
    ap.add_argument("--core", type=int, default=1, help="--compare: the core the engine runs on (-1: any)")
    ap.add_argument("--retriever-core", type=int, default=0, help="--compare: the retriever's core (-1: any)")
    ap.add_argument("--set", action="append", default=[], help="--compare: config override section.key=value")
    ap.add_argument("--stops-as-text", action="store_true", help="--compare: treat the rollout's stops as if the "
                    "tokenizer spelled them in several tokens (as Qwen2.5's spells </search>): no stop token ids")
    ap.add_argument("--bare-searches", action="store_true", help="--compare: a diagnostic leg, bare vLLM again "
                    "with scout's searches made beside it (does searching slow vLLM's step?)")
    ap.add_argument("--json", default=None, help="--compare: also write the figures here")
    args = ap.parse_args()
    if min(args.repeat, args.groups, args.in_flight) < 1 or args.warmup < 0:
        ap.error("--repeat, --groups and --in-flight must be >= 1 and --warmup >= 0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.compare:
        return _compare(args)
    import torch

    from actors.engine import TransformersEngine
    from actors.engine_vllm import VllmEngine
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


def _compare(args) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the pipeline bench runs the actor
    from bench.actor_replay import compare_bare
    from common.log import setup_logging

    setup_logging("bench", "INFO")
    args.core = None if args.core < 0 else args.core
    args.retriever_core = None if args.retriever_core < 0 else args.retriever_core
    out = compare_bare(args)
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
