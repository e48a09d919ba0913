"""FSDP2 policy trainer: one learner step from a batch of whole GRPO groups.

    rank 0: groups ─assemble()─▶ Batch (lengths, tokens, mask, μ logprobs, advantages;
                                   retrieval-failed samples: mask 0, advantage 0, not in the baseline)
                                   │ broadcast as tensors over the control group (no pickle)
    every rank: plan_micro_batches(lengths)  (same plan everywhere: samples → ranks → micro-batches)
       for each minibatch (default 1 = one optimizer update per step):
          for each of the rank's micro-batches (padded with empty ones to the max over ranks):
             forward (output head on loss-mask positions only: head_on) → log π
             → policy_loss(token-mean over the whole minibatch) → backward
          clip grad norm → AdamW step
       scheduler step; stats summed (max for maxima) over micro-batches and ranks

Samples are placed on ranks longest-first onto the least-loaded rank, then cut into micro-batches
of at most `micro_batch_tokens` padded tokens (right padding: causal attention never looks at
it, so no attention mask is needed). Every rank runs the same number of forward/backward passes
(FSDP2 collectives pair up); a rank with less work runs empty micro-batches whose loss is 0.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from common.config import LearnerConfig
from common.protocol import TrajectoryGroup
from learner.losses import (MAX_KEYS, LossConfig, add_stats, finalize_stats, grpo_advantages, policy_loss,
                            selected_logprobs, token_logprobs)

log = logging.getLogger("scout.learner.trainer")


# --------------------------------------------------------------------------- process group
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    cpu_group: object  # gloo group for control tensors (the default group itself on CPU)
    owns_group: bool


def init_distributed(timeout_s: float = 1800.0) -> Dist:
    """torchrun → the env:// group, otherwise a group of one; NCCL on GPU, gloo on CPU."""
    owns = False
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # a plain `python cli.py learner`: a group of one, same code path as N ranks
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = dist.get_backend()
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return Dist(rank, world, local, device, backend, cpu_group, owns)


# --------------------------------------------------------------------------- batch
@dataclass
class Batch:
    lengths: torch.Tensor  # int64 [S]
    tokens: torch.Tensor  # int64 [T]
    mask: torch.Tensor  # float32 [T] (1 = generated token the loss sees)
    behav: torch.Tensor  # float32 [T] μ logprobs
    adv: torch.Tensor  # float32 [S]
    rewards: torch.Tensor  # float32 [S]
    group_sizes: list[int]  # samples per group, in order (minibatches split on group boundaries)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths.numpy())])


def group_advantages(g: TrajectoryGroup, std_norm: bool) -> torch.Tensor:
    """GRPO advantages of one group over its samples whose retrieval worked; a sample whose
    retrieval failed gets 0 and is no part of the baseline (its reward says nothing about the
    policy: it never saw the search results)."""
    ok = ~np.asarray(g.retrieval_failed, dtype=bool)
    rewards = torch.from_numpy(g.rewards.astype(np.float32))
    if ok.all():
        return grpo_advantages(rewards, std_norm)
    adv = torch.zeros(g.n, dtype=torch.float32)
    if ok.any():
        keep = torch.from_numpy(ok)
        adv[keep] = grpo_advantages(rewards[keep], std_norm)
    return adv


def trainable_mask(g: TrajectoryGroup) -> np.ndarray:
    """The group's loss mask with every token of retrieval-failed samples switched off."""
    failed = np.asarray(g.retrieval_failed, dtype=bool)
    if not failed.any():
        return g.loss_mask
    return g.loss_mask * np.repeat(~failed, g.lengths.astype(np.int64)).astype(np.uint8)


def assemble(groups: list[TrajectoryGroup], std_norm: bool) -> Batch:
    """Whole groups → one flat batch; GRPO advantages per group, given to every token.
    Samples flagged retrieval_failed are carried but never trained on (advantage 0, mask 0)."""
    adv = [group_advantages(g, std_norm) for g in groups]
    cat = lambda name, dt: torch.from_numpy(np.concatenate([getattr(g, name) for g in groups]).astype(dt))  # noqa: E731
    mask = torch.from_numpy(np.concatenate([trainable_mask(g) for g in groups]).astype(np.float32))
    return Batch(lengths=cat("lengths", np.int64), tokens=cat("tokens", np.int64), mask=mask,
                 behav=cat("logprobs", np.float32), adv=torch.cat(adv).float(), rewards=cat("rewards", np.float32),
                 group_sizes=[g.n for g in groups])


CTRL_WAIT, CTRL_BATCH, CTRL_STOP, CTRL_SYNC = 0, 1, 2, 3


def broadcast_command(d: Dist, code: int, batch: Batch | None = None) -> tuple[int, Batch | None]:
    """Rank 0 tells every rank what to do next; with CTRL_BATCH the batch follows as tensors."""
    head = torch.zeros(4, dtype=torch.int64)
    if d.rank == 0:
        head[0] = code
        if batch is not None:
            head[1:] = torch.tensor([len(batch.lengths), len(batch.tokens), len(batch.group_sizes)])
    dist.broadcast(head, 0, group=d.cpu_group)
    code, S, T, G = (int(x) for x in head)
    if code != CTRL_BATCH:
        return code, None
    if d.rank == 0:
        ints = torch.cat([batch.lengths, torch.tensor(batch.group_sizes, dtype=torch.int64), batch.tokens])
        floats = torch.cat([batch.mask, batch.behav, batch.adv, batch.rewards])
    else:
        ints, floats = torch.empty(S + G + T, dtype=torch.int64), torch.empty(2 * T + 2 * S, dtype=torch.float32)
    dist.broadcast(ints, 0, group=d.cpu_group)
    dist.broadcast(floats, 0, group=d.cpu_group)
    if d.rank == 0:
        return code, batch
    return code, Batch(lengths=ints[:S], group_sizes=ints[S:S + G].tolist(), tokens=ints[S + G:],
                       mask=floats[:T], behav=floats[T:2 * T], adv=floats[2 * T:2 * T + S],
                       rewards=floats[2 * T + S:])


def plan_micro_batches(lengths: list[int], world: int, max_tokens: int) -> list[list[list[int]]]:
    """Sample indices → per rank, a list of micro-batches (padded size ≤ max_tokens), all ranks
    with the same count (empty lists are filler). Deterministic: every rank computes the same."""
    load = [0] * world
    per_rank: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        per_rank[r].append(i)
        load[r] += lengths[i]
    plans = []
    for idx in per_rank:  # already longest first
        micro, cur = [], []
        for i in idx:
            if cur and (len(cur) + 1) * lengths[cur[0]] > max_tokens:
                micro.append(cur)
                cur = []
            cur.append(i)
        if cur:
            micro.append(cur)
        plans.append(micro)
    n = max(1, max(len(p) for p in plans))
    return [p + [[] for _ in range(n - len(p))] for p in plans]


def split_minibatches(group_sizes: list[int], k: int) -> list[list[int]]:
    """Sample indices of k minibatches made of whole groups (as even as group counts allow)."""
    starts = np.concatenate([[0], np.cumsum(group_sizes)]).astype(int)
    bounds = np.linspace(0, len(group_sizes), min(k, len(group_sizes)) + 1).round().astype(int)
    return [list(range(starts[a], starts[b])) for a, b in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- model
@contextlib.contextmanager
def head_on(head: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor):
    """Within the block, the model's output head maps hidden states [B, L, H] to logits only at
    (rows, cols): [N, V]. The loss reads a generated token's log-probability alone, and those are
    a fraction of the positions (prompts and retrieved passages are not trained), so the head's
    matmul and the softmax passes shrink by that fraction. The head's own forward still runs
    (on the selected rows) inside the root module's forward, where FSDP has its weight unsharded,
    and parameter names are untouched."""
    own = head.__dict__.get("forward")  # an instance-level forward someone set before us
    plain = head.forward

    def selected(hidden: torch.Tensor) -> torch.Tensor:
        return plain(hidden[rows, cols])

    head.forward = selected
    try:
        yield
    finally:
        if own is None:
            del head.forward  # back to the class's forward
        else:
            head.forward = own


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:  # fall back to the ModuleList called `layers` (Llama/Qwen layout)
        for name, m in model.named_modules():
            if name.endswith("layers") and isinstance(m, torch.nn.ModuleList):
                layers = list(m)
                break
    return layers


def load_sharded_model(path: str, d: Dist, bf16: bool, grad_ckpt: bool, trainable: bool = True):
    """A local HF causal-LM folder → FSDP2 module (fully_shard per decoder layer, then the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    gpu = d.device.type == "cuda"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    if gpu and grad_ckpt and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.requires_grad_(False).eval()
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu and bf16 \
        else MixedPrecisionPolicy()
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"{path}: cannot find the decoder layers to shard (no _no_split_modules, no `layers`)")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # also moves parameters and buffers to the mesh device
    return model


def _resolve_sync_dtype(name: str, model) -> torch.dtype:
    if name == "auto":
        cfg_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = getattr(torch, cfg_dtype, None)
        return cfg_dtype if isinstance(cfg_dtype, torch.dtype) else torch.float32
    return getattr(torch, name)


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Model, optimizer, schedule and the learner step. Every rank builds one."""

    def __init__(self, lc: LearnerConfig, d: Dist):
        if not lc.model:
            raise ValueError("learner.model is not set (a local HF causal-LM folder)")
        self.lc, self.d = lc, d
        self.loss_cfg = LossConfig.from_learner(lc)
        if d.device.type == "cpu" and lc.cpu_threads:
            torch.set_num_threads(lc.cpu_threads)
        torch.manual_seed(lc.seed + d.rank)
        self.model = load_sharded_model(lc.model, d, lc.bf16, lc.grad_checkpointing)
        self.ref = load_sharded_model(lc.model, d, lc.bf16, False, trainable=False) if lc.kl_coef > 0 else None
        self.sync_dtype = _resolve_sync_dtype(lc.sync_dtype, self.model)
        self.vocab_size = int(self.model.config.vocab_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lc.lr, betas=tuple(lc.adam_betas),
                                           weight_decay=lc.weight_decay, eps=1e-8)
        w = lc.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / w) if w > 0 else 1.0)

    # ----------------------------------------------------------------- micro-batches
    def _micro(self, batch: Batch, idx: list[int]) -> dict[str, torch.Tensor]:
        """Padded [B, L] tensors for sample indices `idx` (an empty list → one masked pad token)."""
        dev = self.d.device
        if not idx:  # filler: two pad tokens (one scored position keeps the graph connected), mask 0
            z = torch.zeros(1, 2, device=dev)
            return {"tokens": torch.zeros(1, 2, dtype=torch.long, device=dev), "mask": z, "behav": z,
                    "adv": torch.zeros(1, 1, device=dev)}
        off, lens = batch.offsets, batch.lengths
        L = int(max(int(lens[i]) for i in idx))
        out = {k: torch.zeros(len(idx), L, dtype=dt) for k, dt in
               (("tokens", torch.long), ("mask", torch.float32), ("behav", torch.float32))}
        for row, i in enumerate(idx):
            a, b = int(off[i]), int(off[i + 1])
            out["tokens"][row, :b - a] = batch.tokens[a:b]
            out["mask"][row, :b - a] = batch.mask[a:b]
            out["behav"][row, :b - a] = batch.behav[a:b]
        out["mask"][:, 0] = 0.0  # the first token has no context: never scored
        out["adv"] = batch.adv[idx].unsqueeze(-1)
        return {k: v.to(dev, non_blocking=True) for k, v in out.items()}

    def _logprobs(self, model, mb: dict, with_entropy: bool):
        """[B, L] log π and entropy at the loss-mask positions (0 elsewhere: policy_loss only
        reads masked tokens). The output head runs on those positions alone (see head_on)."""
        tokens = mb["tokens"]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:  # no separate head module: full logits
            return token_logprobs(model(input_ids=tokens).logits, tokens, with_entropy=with_entropy)
        rows, cols = torch.nonzero(mb["mask"][:, 1:] > 0, as_tuple=True)  # token cols+1, predicted at cols
        with head_on(head, rows, cols):
            logits = model(input_ids=tokens).logits  # [N, V]
        lp, ent = selected_logprobs(logits, tokens[rows, cols + 1], with_entropy=with_entropy)
        logp = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device).index_put((rows, cols + 1), lp)
        if ent is not None:
            ent = torch.zeros_like(logp).index_put((rows, cols + 1), ent)
        return logp, ent

    @staticmethod
    def _scored_tokens(batch: Batch, idx: list[int]) -> float:
        off = batch.offsets
        return float(sum(batch.mask[int(off[i]) + 1:int(off[i + 1])].sum().item() for i in idx))

    # ----------------------------------------------------------------- the step
    def _plans(self, batch: Batch) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Minibatches (absolute sample indices) and, for this rank, each one's micro-batches."""
        minis = split_minibatches(batch.group_sizes, self.lc.minibatches)
        lens = batch.lengths.tolist()
        # a sample with advantage 0 adds nothing to the policy gradient: without a KL term it is
        # not forwarded at all (the token-mean denominator still counts its tokens)
        skip = self.lc.skip_zero_advantage and self.ref is None
        live = set(torch.nonzero(batch.adv != 0).flatten().tolist()) if skip else None
        micro = []
        for mini in minis:
            mini = [i for i in mini if live is None or i in live]
            plan = plan_micro_batches([lens[i] for i in mini], self.d.world, self.lc.micro_batch_tokens)
            micro.append([[mini[i] for i in rel] for rel in plan[self.d.rank]])
        return minis, micro

    @torch.no_grad()
    def _frozen_logprobs(self, model, batch: Batch, micro: list[list[list[int]]]) -> list[list[torch.Tensor]]:
        return [[self._logprobs(model, self._micro(batch, idx), False)[0] for idx in mbs] for mbs in micro]

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One learner step on a batch every rank holds; returns stats reduced over all ranks."""
        self.model.train()
        minis, micro = self._plans(batch)
        # π_prox differs from π_θ only from the second optimizer update on; with one update per
        # step the current forward pass *is* π_prox (policy_loss uses logp.detach()).
        prox = self._frozen_logprobs(self.model, batch, micro) if len(minis) > 1 else None
        ref = self._frozen_logprobs(self.ref, batch, micro) if self.ref is not None else None
        acc: dict[str, torch.Tensor] = {}
        norms = []
        for k, mini in enumerate(minis):
            denom = max(self._scored_tokens(batch, mini), 1.0)
            for j, idx in enumerate(micro[k]):
                mb = self._micro(batch, idx)
                logp, ent = self._logprobs(self.model, mb, with_entropy=True)
                loss, st = policy_loss(logp, mb["behav"], mb["mask"], mb["adv"], self.loss_cfg,
                                       prox_logp=None if prox is None else prox[k][j],
                                       ref_logp=None if ref is None else ref[k][j], entropy=ent, denom=denom)
                # FSDP averages gradients over ranks; the loss is already a global token mean
                (loss * self.d.world).backward()
                add_stats(acc, st)
            norms.append(self._clip_and_step())
        self.scheduler.step()
        out = self._reduce_stats(acc)
        # the objective is a mean over every scored token of the batch, skipped samples included;
        # the other statistics describe the tokens that were forwarded
        scored = sum(self._scored_tokens(batch, mini) for mini in minis)  # minibatches partition it
        out["forwarded_tokens"] = out["loss_tokens"]
        out["loss"] = out.get("loss", 0.0) * out["loss_tokens"] / max(scored, 1.0)
        out["loss_tokens"] = scored
        out.update(grad_norm=float(np.mean(norms)), grad_norm_max=float(np.max(norms)),
                   lr=float(self.optimizer.param_groups[0]["lr"]), updates=len(minis),
                   skipped_updates=sum(not math.isfinite(n) for n in norms))
        return out

    def _clip_and_step(self) -> float:
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.lc.grad_clip)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norm = float(norm)
        if math.isfinite(norm):
            self.optimizer.step()
        else:  # same decision on every rank: the norm is global
            log.warning("non-finite gradient norm: update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _reduce_stats(self, acc: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(acc)
        sums = torch.stack([acc[k].float().cpu() for k in keys if k not in MAX_KEYS] or [torch.zeros(())])
        maxes = torch.stack([acc[k].float().cpu() for k in keys if k in MAX_KEYS] or [torch.zeros(())])
        if self.d.world > 1:
            dist.all_reduce(sums, group=self.d.cpu_group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.d.cpu_group)
        it_s, it_m = iter(sums.tolist()), iter(maxes.tolist())
        total = {k: (next(it_m) if k in MAX_KEYS else next(it_s)) for k in keys}
        return finalize_stats(total)

    # ----------------------------------------------------------------- weights out
    def full_parameters(self, owned: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor in sync dtype), one parameter at a time. Every rank must run
        this to the end: each DTensor.full_tensor() is an all-gather over the training group.
        owned: never the parameter's own memory (a copy where the tensor would be it), so the
        tensors stay as they are while the next steps train (learner.sync_sends "later")."""
        from torch.distributed.tensor import DTensor

        for name, p in self.model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            t = (p.full_tensor() if isinstance(p, DTensor) else p.detach()).detach().to(self.sync_dtype)
            if owned and t.untyped_storage().data_ptr() == local.untyped_storage().data_ptr():
                t = t.clone()
            yield name, t
