"""Cost of one vLLM decode step against the number of running sequences, through scout's engine
interface (`actors.engine_vllm.VllmEngine`: per-token bookkeeping and stop-string checks included).

    python bench/engine_steps.py --model <HF folder> [--core 1] [--batches 1,16,64,128,256]

For each batch size B: B requests of --prompt-tokens random tokens, --tokens new tokens each
(EOS ignored), all added at once; reports the first step (prefill), the median decode step and
µs per generated token. Pinning to one core (--core) matches bench/pipeline.py's actor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--core", type=int, default=None)
    ap.add_argument("--batches", default="1,16,64,128,256")
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import numpy as np

    from actors.engine import SamplingSpec
    from actors.engine_vllm import VllmEngine
    from actors.rollout import STOPS

    engine = VllmEngine(args.model, max_model_len=1024, dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    vocab = len(engine.tokenizer)
    spec = SamplingSpec(max_tokens=args.tokens, temperature=1.0, ignore_eos=True, stop=STOPS)
    print("| running sequences | prefill step ms | decode step ms (median) | µs per generated token |")
    print("|---:|---:|---:|---:|")
    for b in (int(x) for x in args.batches.split(",")):
        best = None
        for rep in range(args.repeat + 1):  # the first round warms up
            for i in range(b):
                engine.add(f"b{b}-{rep}-{i}", rng.integers(5, vocab, size=args.prompt_tokens).tolist(), spec)
            times, n, t0 = [], 0, time.perf_counter()
            while engine.has_unfinished():
                s = time.perf_counter()
                n += sum(len(o.token_ids) for o in engine.step())
                times.append(time.perf_counter() - s)
            row = (times[0], float(np.median(times[1:])), (time.perf_counter() - t0) / n)
            if rep and (best is None or row[2] < best[2]):
                best = row
        print(f"| {b} | {1e3 * best[0]:.1f} | {1e3 * best[1]:.2f} | {1e6 * best[2]:.0f} |", flush=True)
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
