"""vLLM worker extension: weight updates inside the engine's worker, called via collective_rpc.

    actor worker ──collective_rpc("scout_receiver_setup", plan_dict)──▶ BucketReceiver.setup
                 ──collective_rpc("scout_receiver_receive", header, data, begin)─▶ BucketReceiver.receive
                                   (first bucket: begin=True → layerwise reload armed only now)
                                                      └─▶ model.load_weights([(hf_name, tensor)])
                 ──collective_rpc("scout_update_finish")────────────────▶ layers re-processed

The BucketReceiver lives where the weights live (the worker's device), so bucket bytes arrive
straight into that device's memory over gloo/NCCL. A colocated bucket (CUDA IPC, learner on the
same GPU) is mapped from the learner's memory and copied GPU to GPU before loading
(`_own_colocated`). vLLM 0.32 re-packs some layers after
loading (the CPU backend does), so a plain second `load_weights` no longer finds the weight
loaders; its layerwise-reload helpers put the checkpoint-format parameters back, buffer what
arrives (buckets may split a layer), and re-run the post-load processing per layer.
Arguments are plain dicts / bytes / lists so the calls would also survive a multiprocess
executor.
"""

from __future__ import annotations

import time
from typing import Any


RECEIVE_FAILED = "weight bytes not received (model untouched)"


def _own_colocated(named: list) -> list:
    """A colocated (CUDA IPC) bucket's tensors are views of the learner's buffer, which it packs
    again once we acknowledge; vLLM's layerwise reload keeps tensors of a layer that spans two
    buckets until the layer is complete, so take device-side copies first (GPU to GPU, no host
    copy) and wait for them before the acknowledgement. Not yet run on a GPU."""
    import torch

    named = [(n, t.clone()) for n, t in named]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return named


def make_receiver(device: Any):
    """A BucketReceiver for tensors on `device` (common/weightsync/receiver.py)."""
    from common.weightsync.receiver import BucketReceiver

    return BucketReceiver(device=device)


class ScoutWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`)."""

    def _scout_model(self):
        return self.model_runner.model

    def scout_update_begin(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._scout_model())
        self._scout_loaded = 0
        self._scout_names: set[str] = set()
        self._scout_embedding = None
        self._scout_t0 = time.perf_counter()

    def scout_update_load(self, named: list) -> int:
        from vllm.config import set_current_vllm_config

        named = list(named)
        with set_current_vllm_config(self.vllm_config):
            self._scout_model().load_weights(weights=named)
        self._scout_loaded = getattr(self, "_scout_loaded", 0) + len(named)
        names = getattr(self, "_scout_names", set())
        for name, tensor in named:
            names.add(name)
            if name.endswith("embed_tokens.weight"):
                self._scout_embedding = tensor
        self._scout_names = names
        return len(named)

    def _scout_tie_lm_head(self) -> None:
        """Tied embeddings: senders list the shared tensor once (under the embedding's name), but the
        layerwise reload also waits for `lm_head.weight`; without it the head keeps its old values."""
        hf = self.vllm_config.model_config.hf_config
        tied = getattr(hf, "tie_word_embeddings", False) or getattr(hf.get_text_config(), "tie_word_embeddings", False)
        emb = getattr(self, "_scout_embedding", None)
        if tied and emb is not None and "lm_head.weight" not in getattr(self, "_scout_names", set()):
            self.scout_update_load([("lm_head.weight", emb)])

    def scout_update_finish(self) -> dict:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        self._scout_tie_lm_head()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._scout_model(), self.vllm_config.model_config)
        self._scout_embedding = None
        runner = self.model_runner
        for name in ("reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(runner, name, None)
            if callable(fn):
                fn()
        seconds = time.perf_counter() - getattr(self, "_scout_t0", time.perf_counter())
        return {"tensors": getattr(self, "_scout_loaded", 0), "seconds": seconds}

    # ------------------------------------------------------------------ bucket receiver
    def scout_receiver_setup(self, plan: dict) -> None:
        old = getattr(self, "_scout_receiver", None)
        if old is not None:
            old.close()
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._scout_receiver = make_receiver(device)
        self._scout_receiver.setup(plan)

    def scout_receiver_receive(self, header: dict, data: Any = None, begin: bool = False) -> int:
        """Receive one bucket, then (begin=True: first bucket of an update) arm the layerwise
        reload and load it. A failed transfer raises RECEIVE_FAILED with the weights untouched."""
        rx = getattr(self, "_scout_receiver", None)
        if rx is None:
            raise RuntimeError(f"{RECEIVE_FAILED}: weight bucket received before any SyncPlan")
        try:
            named = rx.receive(header, data)
            if "ipc" in header:
                named = _own_colocated(named)
        except Exception as e:
            raise RuntimeError(f"{RECEIVE_FAILED}: {e}") from None
        if begin:
            self.scout_update_begin()
        return self.scout_update_load(named)

    def scout_receiver_release(self) -> None:
        """After SyncDone: free the update's receive buffers (BucketReceiver.release)."""
        rx = getattr(self, "_scout_receiver", None)
        if rx is not None:
            rx.release()

    def scout_receiver_close(self) -> None:
        rx = getattr(self, "_scout_receiver", None)
        if rx is not None:
            rx.close()
            self._scout_receiver = None
