"""Generation engines: one interface, two implementations (vLLM, plain transformers).

    add(req_id, prompt_ids, SamplingSpec) ──▶ step() ──▶ [StepOutput(req_id, token_ids, logprobs,
        ▲                                        │                   version, finished, reason)]
        │                                        ▼
        │                      stop check on the new tokens (stop strings / EOS / max_tokens)
        │
    weight update between two step() calls:
        begin_update() ─▶ load_bucket(header, data) | load_tensors(named) ... ─▶ finish_update(v)
        (the update is armed lazily: only when the first bucket's bytes have arrived are the weights
        touched; `weights_dirty` says whether a failed update may have left them half-loaded)

Every generated token comes with its id, its logprob under the distribution it was sampled
from, and the policy version of the weights that produced it (the engine's `version` at the
step that sampled it). Weight updates happen only between steps, so the attribution is exact.

Behaviour logprobs (a deliberate choice): both engines report log p(token) under the *processed*
sampling distribution — logits / temperature, then top-k / top-p truncation and renormalisation —
which is the distribution the token was actually drawn from. vLLM returns raw (pre-temperature)
logprobs by default; we start it with `logprobs_mode="processed_logprobs"`. With temperature 1
and top_p 1 (the RL default) processed and raw coincide; a learner that trains at another
temperature must divide its logits by the same temperature. Greedy decoding (temperature 0)
reports the untempered log-softmax.

The vLLM engine (in-process, per-turn outputs, weight loads) is in actors/engine_vllm.py.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from common.config import ConfigError

log = logging.getLogger("scout.actors.engine")

STOP_WINDOW = 24  # tokens decoded to look for a stop string completed by the newest token


@dataclass
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None  # per-request seed (transformers engine); None = engine stream
    ignore_eos: bool = False  # keep going past EOS (fixed-length generation, benchmarks)


@dataclass
class StepOutput:
    req_id: str
    token_ids: list[int]
    logprobs: list[float]
    version: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" (stop string), "eos", "length", "abort"
    stop_string: str | None = None
    versions: list[int] | None = None  # per token, when they differ (a per-turn output spanning an update)
    final: bool = False  # a whole turn that the engine ended itself (stops, EOS, max_tokens applied)


@dataclass
class _Req:
    req_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    generated: list[int] = field(default_factory=list)
    state: Any = None  # implementation-specific (KV cache, generator)


class EngineError(RuntimeError):
    """The engine cannot do what was asked (bad model folder, failed weight load, ...)."""


def check_model_dir(path: str | os.PathLike | None) -> Path:
    if not path:
        raise EngineError("no model given: set --model PATH (a local HF causal-LM folder)")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise EngineError(f"{p} is not a local HF model folder (no config.json)")
    return p


def _can_end(stop: str, piece: str) -> bool:
    """Whether a token whose text is `piece` can complete `stop`: the stop string then ends inside
    the piece, so the piece holds it whole or starts with one of its suffixes (`</think>` ends in
    `>` like `</search>`, but cannot end it)."""
    return stop in piece or any(stop.endswith(piece[:k]) for k in range(1, min(len(piece), len(stop)) + 1))


class Engine(ABC):
    """Common state: tokenizer, policy version, request bookkeeping and stop detection."""

    name = "engine"

    def __init__(self, model_path: str | os.PathLike, version: int = 0):
        self.model_path = str(check_model_dir(model_path))
        self.version = version
        self.weights_dirty = False  # an update touched the weights and has not finished
        self._begin_due = False  # begin_update() called, not yet armed (no bytes loaded yet)
        self._reqs: dict[str, _Req] = {}
        self._stop_tails: dict[tuple[str, ...], dict[int, bool]] = {}  # stops -> token id -> may end one
        self._single_stops: dict[tuple[str, ...], dict[int, str]] = {}  # stops -> token id -> stop it is
        self.tokenizer = self._load_tokenizer()
        self.eos_ids = self._eos_ids()

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path)

    def _eos_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = Path(self.model_path) / "generation_config.json"
        if gen.is_file():
            import json

            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        return ids

    # ------------------------------------------------------------------ requests
    def add(self, req_id: str, prompt_ids: list[int], spec: SamplingSpec) -> None:
        if req_id in self._reqs:
            raise EngineError(f"request {req_id!r} is already running")
        if not prompt_ids:
            raise EngineError(f"request {req_id!r} has an empty prompt")
        if spec.max_tokens < 1:
            raise EngineError(f"request {req_id!r}: max_tokens must be >= 1")
        req = _Req(req_id, list(prompt_ids), spec)
        self._reqs[req_id] = req
        self._add(req)

    def abort(self, req_id: str) -> None:
        if self._reqs.pop(req_id, None) is not None:
            self._abort(req_id)

    def has_unfinished(self) -> bool:
        return bool(self._reqs)

    def num_unfinished(self) -> int:
        return len(self._reqs)

    def step(self) -> list[StepOutput]:
        """One decode step over every running request."""
        outs = []
        for out in self._step():
            req = self._reqs.get(out.req_id)
            if req is None:  # aborted meanwhile
                continue
            if not out.final:
                self._apply_stop(req, out)
            if out.finished:
                self._reqs.pop(out.req_id, None)
            outs.append(out)
        return outs

    def single_token_stops(self, stops: tuple[str, ...]) -> dict[int, str]:
        """Token id -> stop string, for each stop string the tokenizer encodes as exactly one token
        that decodes back to exactly that string (`</search>` on the demo's); once per stop tuple."""
        found = self._single_stops.get(stops)
        if found is None:
            found = {}
            for s in stops:
                ids = self.tokenizer.encode(s, add_special_tokens=False) if s else []
                if len(ids) == 1 and self.tokenizer.decode(ids, skip_special_tokens=False) == s:
                    found.setdefault(int(ids[0]), s)
            self._single_stops[stops] = found
        return found

    def _apply_stop(self, req: _Req, out: StepOutput) -> None:
        """Cut at the first stop string / EOS / max_tokens; abort the request in the engine unless
        the engine finished it itself (vLLM does, on a single-token stop: see actors/engine_vllm.py)."""
        spec, gen = req.spec, req.generated
        tails = singles = None
        if spec.stop:
            tails = self._stop_tails.get(spec.stop)
            if tails is None:
                tails = self._stop_tails[spec.stop] = {}
            singles = self.single_token_stops(spec.stop)
        for i, tok in enumerate(out.token_ids):
            gen.append(tok)
            # a single-token stop is a hit on its own; others may end one spelled in several tokens
            hit = (singles.get(tok) or self._stop_hit(req, tails)) if tails is not None else None
            eos = tok in self.eos_ids and not spec.ignore_eos
            reason = "stop" if hit else "eos" if eos else "length" if len(gen) >= spec.max_tokens else None
            if reason:
                del out.token_ids[i + 1:], out.logprobs[i + 1:]
                if not out.finished:
                    self._abort(req.req_id)
                out.finished, out.finish_reason, out.stop_string = True, reason, hit
                return
        if out.finished and out.finish_reason is None:
            out.finish_reason = "length"

    def _stop_hit(self, req: _Req, tails: dict[int, bool]) -> str | None:
        """The stop string completed by the newest token, if any. A stop string completed by a
        token ends inside that token's text, so tokens whose text cannot end one skip the window
        decode (`tails`: that answer per token id, for these stops; see `_can_end`)."""
        tok = req.generated[-1]
        may_end = tails.get(tok)
        if may_end is None:
            piece = self.tokenizer.decode([tok], skip_special_tokens=False)
            may_end = tails[tok] = any(_can_end(s, piece) for s in req.spec.stop if s)
        if not may_end:
            return None
        tail = self.tokenizer.decode(req.generated[-STOP_WINDOW:], skip_special_tokens=False)
        found = [s for s in req.spec.stop if s and s in tail]
        if not found:  # the common case (a tag that is no stop string): one decode, not two
            return None
        last = self.tokenizer.decode(req.generated[-STOP_WINDOW:-1], skip_special_tokens=False) \
            if len(req.generated) > 1 else ""
        return next((s for s in found if s not in last), None)

    # ------------------------------------------------------------------ weights
    def sync_setup(self, plan: dict) -> None:
        """Join the weight-sync group described by a SyncPlan (as a plain dict)."""
        self._receiver_call("setup", plan)

    def begin_update(self) -> None:
        """Start an update. Nothing changes yet: the engine arms it when the first tensors are in
        hand, so a transfer that fails before that (a peer of the sync group died) leaves the
        current weights intact and usable."""
        self._begin_due = True

    def _arm(self) -> None:
        if self._begin_due:
            self._begin_due = False
            self.weights_dirty = True
            self._begin_update()
        self.weights_dirty = True

    def load_bucket(self, header: dict, data: Any = None) -> int:
        """Receive one bucket through the BucketReceiver and load its tensors; returns count."""
        return self._receiver_call("receive", header, data)

    def release_sync_buffers(self) -> None:
        """After SyncDone: free the buffers the last update was received into."""
        self._receiver_call("release")

    def load_tensors(self, named: list[tuple[str, Any]]) -> int:
        self._arm()
        return self._load_tensors(named)

    def finish_update(self, version: int) -> None:
        self._finish_update()
        self.version = version
        self.weights_dirty = False

    def update_weights(self, named: list[tuple[str, Any]], version: int) -> float:
        """Convenience: a whole update from HF-named tensors in one call; returns seconds."""
        t0 = time.perf_counter()
        self.begin_update()
        self.load_tensors(named)
        self.finish_update(version)
        return time.perf_counter() - t0

    def close(self) -> None:
        self._reqs.clear()

    # ------------------------------------------------------------------ implementation hooks
    @abstractmethod
    def _add(self, req: _Req) -> None: ...

    @abstractmethod
    def _abort(self, req_id: str) -> None: ...

    @abstractmethod
    def _step(self) -> list[StepOutput]: ...

    @abstractmethod
    def _begin_update(self) -> None: ...

    @abstractmethod
    def _load_tensors(self, named: list[tuple[str, Any]]) -> int: ...

    @abstractmethod
    def _finish_update(self) -> None: ...

    @abstractmethod
    def _receiver_call(self, what: str, *args) -> Any: ...


# =========================================================================== transformers
class TransformersEngine(Engine):
    """Plain transformers: the fallback engine and the logprob reference (`score`).

    Requests are decoded one at a time per step, each with its own KV cache. Weight updates
    copy tensors into the parameters in place."""

    name = "transformers"

    def __init__(self, model_path, *, seed: int = 0, dtype: str = "auto", device: str | None = None,
                 recompute_kv: bool = True, version: int = 0):
        super().__init__(model_path, version)
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype).to(self.device)
        self.model.eval()
        self.recompute_kv = recompute_kv
        self.seed = seed
        self._n_added = 0
        self._receiver = None
        self._params = None

    # ----------------------------------------------------------------- sampling
    def _processed_logprobs(self, logits, spec: SamplingSpec):
        """log p under the distribution actually sampled from (see module docstring)."""
        torch = self.torch
        logits = logits.float()
        if spec.temperature <= 1e-5:
            return torch.log_softmax(logits, -1)
        logits = logits / spec.temperature
        if spec.top_k > 0 and spec.top_k < logits.shape[-1]:
            kth = torch.topk(logits, spec.top_k).values[..., -1, None]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if spec.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=False)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum <= 1 - spec.top_p
            drop[..., -1] = False  # always keep the most likely token
            logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.log_softmax(logits, -1)

    def _add(self, req: _Req) -> None:
        torch = self.torch
        seed = req.spec.seed if req.spec.seed is not None else self.seed * 1_000_003 + self._n_added
        self._n_added += 1
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        req.state = {"cache": None, "gen": gen}

    def _abort(self, req_id: str) -> None:
        pass

    def _step(self) -> list[StepOutput]:
        torch = self.torch
        outs = []
        with torch.no_grad():
            for req in list(self._reqs.values()):
                st = req.state
                if st["cache"] is None:
                    ids = req.prompt_ids + req.generated
                else:
                    ids = req.generated[-1:]
                x = torch.tensor([ids], device=self.device)
                res = self.model(input_ids=x, past_key_values=st["cache"], use_cache=True)
                st["cache"] = res.past_key_values
                lp = self._processed_logprobs(res.logits[0, -1], req.spec)
                if req.spec.temperature <= 1e-5:
                    tok = int(torch.argmax(lp))
                else:
                    tok = int(torch.multinomial(lp.exp(), 1, generator=st["gen"]))
                outs.append(StepOutput(req.req_id, [tok], [float(lp[tok])], self.version))
        return outs

    def score(self, token_ids: list[int], prompt_len: int, temperature: float = 1.0) -> list[float]:
        """log p(token_t | tokens_<t) for t >= prompt_len, recomputed from scratch."""
        torch = self.torch
        if not 1 <= prompt_len <= len(token_ids):
            raise EngineError(f"prompt_len {prompt_len} outside 1..{len(token_ids)}")
        with torch.no_grad():
            x = torch.tensor([token_ids], device=self.device)
            logits = self.model(input_ids=x).logits[0].float()
        t = temperature if temperature > 1e-5 else 1.0
        lp = torch.log_softmax(logits[prompt_len - 1:-1] / t, -1)
        tgt = torch.tensor(token_ids[prompt_len:], device=self.device)
        return lp.gather(-1, tgt[:, None])[:, 0].cpu().tolist()

    # ----------------------------------------------------------------- weights
    def _named_params(self) -> dict[str, Any]:
        if self._params is None:
            self._params = dict(self.model.state_dict(keep_vars=True))
        return self._params

    def _begin_update(self) -> None:
        self._named_params()

    def _load_tensors(self, named: Iterable[tuple[str, Any]]) -> int:
        params = self._named_params()
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        n = 0
        with self.torch.no_grad():
            for name, tensor in named:
                if tied and name == "lm_head.weight":
                    continue  # tied to the embedding (vLLM ignores it too)
                p = params.get(name)
                if p is None:
                    raise EngineError(f"weight update names unknown parameter {name!r}")
                if tuple(p.shape) != tuple(tensor.shape):
                    raise EngineError(f"weight {name}: shape {tuple(tensor.shape)}, model has {tuple(p.shape)}")
                p.copy_(tensor.to(device=p.device, dtype=p.dtype))
                n += 1
        return n

    def _finish_update(self) -> None:
        if self.recompute_kv:
            for req in self._reqs.values():
                req.state["cache"] = None  # next step re-prefills prompt + generated under new weights

    def _receiver_call(self, what: str, *args) -> Any:
        from actors.vllm_ext import make_receiver

        if what == "setup":
            if self._receiver is not None:
                self._receiver.close()
            self._receiver = make_receiver(self.device)
            return self._receiver.setup(*args)
        if what == "release":
            if self._receiver is not None:
                self._receiver.release()
            return None
        if self._receiver is None:
            raise EngineError("weight bucket received before any SyncPlan")
        if what == "receive":
            named = self._receiver.receive(*args)  # a failed transfer raises here, weights untouched
            self._arm()
            return self._load_tensors(named)
        if what == "close":
            self._receiver.close()
            self._receiver = None
        return None

    def close(self) -> None:
        super().close()
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None


def check_context_length(acfg) -> None:
    """actor.max_total_tokens must fit the model's context (max_position_embeddings)."""
    import json

    cfg_path = Path(acfg.model or "") / "config.json"
    try:
        limit = int(json.loads(cfg_path.read_text()).get("max_position_embeddings") or 0)
    except (OSError, ValueError):
        return  # a missing or unreadable config is reported by the engine itself
    if limit and acfg.max_total_tokens > limit:
        raise ConfigError(f"actor.max_total_tokens ({acfg.max_total_tokens}) exceeds the model's context of "
                          f"{limit} tokens (max_position_embeddings in {cfg_path}); set actor.max_total_tokens "
                          f"<= {limit}")


def make_engine(acfg, version: int = 0) -> Engine:
    """Engine from the actor config section (`actor.engine`)."""
    check_context_length(acfg)
    if acfg.engine == "vllm":
        from actors.engine_vllm import VllmEngine  # lazy: vLLM is imported only by its engine

        return VllmEngine(acfg.model, max_model_len=acfg.max_total_tokens, seed=acfg.seed, dtype=acfg.dtype,
                          kv_cache_gib=acfg.kv_cache_gib, gpu_memory_utilization=acfg.gpu_memory_utilization,
                          recompute_kv=acfg.recompute_kv_on_update, per_turn_outputs=acfg.per_turn_outputs,
                          cpu_gemm_buckets=acfg.cpu_gemm_buckets, version=version)
    return TransformersEngine(acfg.model, seed=acfg.seed, dtype=acfg.dtype,
                              recompute_kv=acfg.recompute_kv_on_update, version=version)
