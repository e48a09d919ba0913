"""Multi-turn search rollouts over one engine: think, search, read, answer.

    Prompt ─template─▶ prompt ids (mask 0) ─engine.add─▶ decode steps (mask 1, logprob, version)
                                                            │ turn ends at </search> | </answer>
                                                            │ | EOS | max_new_tokens
        ┌───────────────────────────────────────────────────┼──────────────────────────────┐
        ▼ </answer> / EOS / budget                          ▼ <search> q </search>         ▼ anything else
      done ─▶ reward (last <answer>)        queued; all queued queries of the worker's      corrective
                                            active rollouts go out as ONE batch (thread)    observation
                                                            │                                (mask 0)
                                    RetrievalError ─▶ rollout marked retrieval_failed, done
                                                            ▼
                         "\\n\\n<information>Doc 1(Title: …) …</information>\\n\\n" (mask 0, ≤ max_obs_tokens)
                                                            ▼
                                              next turn: engine.add(all ids so far)

Token ids are kept exactly as the engine produced them: generated ids are appended as ids,
observations are tokenized on their own and appended as ids; text is decoded only to parse
actions and score answers, never re-encoded. Up to `max_turns` searches, then one final turn;
at most `max_turns + 1` generation turns in all.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np

from actors.behaviour import behaviour_bits, passages_hit
from actors.engine import Engine, SamplingSpec, StepOutput
from actors.reward import RewardResult, compute_reward
from actors.tokentext import TextCodec
from common.protocol import Passage, Prompt, TrajectoryGroup
from retriever.client import RetrievalError, format_passages

log = logging.getLogger("scout.actors.rollout")

INSTRUCTION = (
    "Work out the answer to the question below. Think step by step inside <think> and </think>. "
    "Whenever you are missing a fact, look it up by writing a query between <search> and </search>; "
    "the search results will be shown to you between <information> and </information>. "
    "You may search several times. When you are sure, write only the final answer between "
    "<answer> and </answer>, for example <answer> Paris </answer>.\nQuestion: {question}\n"
)
INVALID_ACTION = ("\nThat was not a valid step. To look something up write <search> query </search>; "
                  "to finish write <answer> answer </answer>.\n")
STOPS = ("</search>", "</answer>")
OBS_CACHE_SIZE = 4096  # observation texts whose token ids a runner keeps
_SEARCH_RE = re.compile(r"<search>(.*?)</search>", re.DOTALL)


class Searcher(Protocol):
    def search(self, queries: list[str], topk: int) -> list[list[Passage]]: ...


def build_prompt_ids(tokenizer, question: str, template: str | None = None, text: str = "",
                     codec: TextCodec | None = None) -> list[int]:
    """Our instruction + question (or `actor.prompt_template`, a format string with {question}),
    or `text` verbatim when the data brought its own prompt (Prompt.text); through the chat
    template when the tokenizer has one. `codec`: the caller's TextCodec of this tokenizer (the
    same ids, cheaper per call)."""
    codec = codec or TextCodec(tokenizer, backend=False)
    text = text or (template or INSTRUCTION).format(question=question.strip())
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return codec.encode(rendered, special=False)
    return codec.encode(text, special=True)


@dataclass
class Trajectory:
    """One sample of a group: the whole token stream plus per-token mask / logprob / version."""

    group_id: str
    index: int
    golds: list[str]
    tokens: list[int]
    prompt_len: int
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    retrieved: list[list[str]] = field(default_factory=list)  # passage ids found per search
    turns: int = 0
    num_searches: int = 0
    num_invalid: int = 0
    search_hit: bool = False  # some search returned a passage holding a gold answer (actors/behaviour.py)
    bits: int = 0  # BEHAVIOUR_BITS, set once when the rollout finishes (actors/behaviour.py)
    retrieval_failed: bool = False
    done: bool = False
    finish: str = ""
    turn_start: int = 0
    result: RewardResult | None = None

    def __post_init__(self):
        n = len(self.tokens)
        self.mask, self.logprobs, self.versions = [0] * n, [0.0] * n, [-1] * n
        self.turn_start = n

    @property
    def req_id(self) -> str:
        return f"{self.group_id}/{self.index}/t{self.turns}"

    def append_observation(self, ids: list[int]) -> None:
        self.tokens += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)

    def response_text(self) -> str:
        return "".join(self.turn_texts)


@dataclass
class GroupState:
    group_id: str
    prompt: Prompt
    samples: list[Trajectory]
    created_at: float

    @property
    def done(self) -> bool:
        return all(s.done for s in self.samples)

    def to_message(self, peer_id: str, run_id: str) -> TrajectoryGroup:
        s = self.samples
        cat = lambda attr, dt: np.fromiter(itertools.chain.from_iterable(getattr(t, attr) for t in s), dt)  # noqa: E731
        return TrajectoryGroup(
            group_id=self.group_id, peer_id=peer_id, run_id=run_id, prompt_id=self.prompt.prompt_id,
            num_searches=[t.num_searches for t in s], retrieval_failed=[t.retrieval_failed for t in s],
            correct=[bool(t.result and t.result.correct) for t in s], created_at=self.created_at,
            behaviour=[t.bits for t in s], bad_searches=[t.num_invalid for t in s],
            lengths=np.asarray([len(t.tokens) for t in s], dtype=np.int32), tokens=cat("tokens", np.int32),
            loss_mask=cat("mask", np.uint8), logprobs=cat("logprobs", np.float32),
            versions=cat("versions", np.int32),
            rewards=np.asarray([t.result.reward if t.result else 0.0 for t in s], dtype=np.float32))


@dataclass
class RunnerStats:
    tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    searches: int = 0
    search_batches: int = 0
    search_seconds: float = 0.0
    retrieval_failures: int = 0
    invalid_actions: int = 0


class RolloutRunner:
    """Drives rollouts of many groups over one engine; `poll()` is one scheduling round."""

    def __init__(self, engine: Engine, searcher: Searcher | None, acfg, greedy: bool = False,
                 search_threads: int = 2, on_finished: Callable[[Trajectory], None] | None = None):
        self.engine, self.searcher, self.cfg = engine, searcher, acfg
        self.tok = engine.tokenizer
        self.text = TextCodec(self.tok)
        self.spec = SamplingSpec(max_tokens=acfg.max_new_tokens, temperature=0.0 if greedy else acfg.temperature,
                                 top_p=1.0 if greedy else acfg.top_p, stop=STOPS)
        self.groups: dict[str, GroupState] = {}
        self.running: dict[str, Trajectory] = {}  # engine request id -> trajectory
        self.queued: list[tuple[Trajectory, str]] = []  # searches waiting for the next batch
        self.in_search: dict[concurrent.futures.Future, list[tuple[Trajectory, str]]] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(search_threads, thread_name_prefix="search")
        self.max_batches = search_threads
        self.stats = RunnerStats()
        self.on_finished = on_finished
        self._eos = engine.eos_ids
        self._obs_cache: collections.OrderedDict[str, list[int]] = collections.OrderedDict()  # text -> ids, LRU
        self._completed: list[GroupState] = []  # groups whose last sample finished since the last poll

    # ------------------------------------------------------------------ groups
    def start_group(self, prompt: Prompt, n: int, group_id: str | None = None) -> GroupState:
        if n < 1:
            raise ValueError(f"a group needs at least one sample, got n={n}")
        gid = group_id or f"{prompt.prompt_id}-{uuid.uuid4().hex[:12]}"
        ids = build_prompt_ids(self.tok, prompt.question, self.cfg.prompt_template, prompt.text, self.text)
        samples = [Trajectory(gid, i, list(prompt.golden_answers), list(ids), len(ids)) for i in range(n)]
        g = self.groups[gid] = GroupState(gid, prompt, samples, time.time())
        for t in samples:
            self._next_turn(t)
        return g

    def active_groups(self) -> int:
        return len(self.groups)

    def busy(self) -> bool:
        return bool(self.running or self.queued or self.in_search)

    def abort_all(self) -> None:
        for rid in list(self.running):
            self.engine.abort(rid)
        self.running.clear()
        self.queued.clear()
        self.in_search.clear()
        self.groups.clear()
        self._completed.clear()

    def close(self) -> None:
        self.abort_all()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ scheduling round
    def poll(self) -> list[GroupState]:
        """Step the engine once (if anything runs), handle finished turns, move searches.
        Returns the groups that completed in this round."""
        if self.engine.has_unfinished():
            t0 = time.perf_counter()
            outs = self.engine.step()
            self.stats.step_seconds += time.perf_counter() - t0
            self.stats.steps += 1
            for out in outs:
                self._on_output(out)
        self._collect_searches()
        self._dispatch_searches()
        return self._pop_finished()

    def wait_searches(self, timeout: float) -> None:
        """Block until some search batch completes (used when the engine has nothing to do)."""
        if self.in_search:
            concurrent.futures.wait(list(self.in_search), timeout=timeout,
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def _pop_finished(self) -> list[GroupState]:
        done, self._completed = self._completed, []
        return [g for g in done if self.groups.pop(g.group_id, None) is g]

    def _on_output(self, out: StepOutput) -> None:
        t = self.running.get(out.req_id)
        if t is None:
            return
        n = len(out.token_ids)
        t.tokens += out.token_ids
        t.mask += [1] * n
        t.logprobs += out.logprobs
        t.versions += [out.version] * n if out.versions is None else out.versions
        self.stats.tokens += n
        if out.finished:
            del self.running[out.req_id]
            self._end_turn(t, out)

    # ------------------------------------------------------------------ turns
    def _turn_text(self, t: Trajectory) -> str:
        ids = t.tokens[t.turn_start:]
        while ids and ids[-1] in self._eos:
            ids = ids[:-1]
        return self.text.decode(ids)

    def _end_turn(self, t: Trajectory, out: StepOutput) -> None:
        text = self._turn_text(t)
        t.turn_texts.append(text)
        t.turns += 1
        last_turn = t.turns >= self.cfg.max_turns + 1
        if out.stop_string == "</answer>" or (out.finish_reason != "stop" and "</answer>" in text):
            return self._finish(t, "answer")
        if out.finish_reason in ("eos", "abort"):
            return self._finish(t, out.finish_reason)
        if last_turn:
            return self._finish(t, "max_turns")
        if out.stop_string == "</search>":  # not the last turn, so a search is still allowed
            found = _SEARCH_RE.findall(text)
            query = found[-1].strip() if found else ""
            if query:
                t.num_searches += 1
                t.queries.append(query)
                self.queued.append((t, query))
                return
        t.num_invalid += 1
        self.stats.invalid_actions += 1
        self._observe(t, self._encode_cached(INVALID_ACTION))

    def _encode_cached(self, text: str) -> list[int]:
        """Token ids of an observation text (callers must not mutate them). The samples of a group
        mostly search the same words and read the same passages, so most are repeats."""
        ids = self._obs_cache.get(text)
        if ids is None:
            ids = self._obs_cache[text] = self.text.encode(text, special=False)
            if len(self._obs_cache) > OBS_CACHE_SIZE:
                self._obs_cache.popitem(last=False)
        else:
            self._obs_cache.move_to_end(text)
        return ids

    def _observe(self, t: Trajectory, ids: list[int]) -> None:
        if len(t.tokens) + len(ids) >= self.cfg.max_total_tokens:
            return self._finish(t, "max_total_tokens")
        t.append_observation(ids)
        self._next_turn(t)

    def _next_turn(self, t: Trajectory) -> None:
        room = self.cfg.max_total_tokens - len(t.tokens)
        if room < 1:
            return self._finish(t, "max_total_tokens")
        spec = self.spec if room >= self.spec.max_tokens else replace(self.spec, max_tokens=room)
        t.turn_start = len(t.tokens)
        self.running[t.req_id] = t
        self.engine.add(t.req_id, t.tokens, spec)

    def _finish(self, t: Trajectory, why: str) -> None:
        t.done, t.finish = True, why
        if t.retrieval_failed:  # never scored as if it had read real search results
            t.result = RewardResult(0.0, False, None, 0.0, 0.0, False)
        else:
            t.result = compute_reward(t.response_text(), t.golds, self.cfg.reward, self.cfg.format_reward)
        t.bits = behaviour_bits(t.result.format_ok, t.turn_texts, why, t.search_hit)
        g = self.groups.get(t.group_id)
        if g is not None and g.done:
            self._completed.append(g)
        if self.on_finished is not None:
            self.on_finished(t)

    # ------------------------------------------------------------------ searches
    def _dispatch_searches(self) -> None:
        if not self.queued or len(self.in_search) >= self.max_batches:
            return
        batch, self.queued = self.queued, []
        if self.searcher is None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_exception(RetrievalError("no retriever configured"))
        else:
            fut = self.pool.submit(self._search, [q for _, q in batch])
        self.in_search[fut] = batch

    def _search(self, queries: list[str]) -> tuple[list[list[Passage]], float]:
        """One batched call; the retriever client does its own deadlines and retries."""
        t0 = time.perf_counter()
        return self.searcher.search(queries, self.cfg.topk), time.perf_counter() - t0

    def _collect_searches(self) -> None:
        for fut in [f for f in self.in_search if f.done()]:
            batch = self.in_search.pop(fut)
            try:
                results, seconds = fut.result()
                if len(results) != len(batch):
                    raise RetrievalError(f"retriever answered {len(results)} lists for {len(batch)} queries")
            except RetrievalError as e:
                self._fail_batch(batch, e)
                continue
            except Exception as e:  # a broken answer fails these rollouts, not the worker
                log.exception("search batch failed")
                self._fail_batch(batch, e)
                continue
            self.stats.search_batches += 1
            self.stats.searches += len(batch)
            self.stats.search_seconds += seconds
            for (t, _), passages in zip(batch, results):
                if t.group_id in self.groups and not t.done:
                    t.retrieved.append([p.id for p in passages])
                    t.search_hit = t.search_hit or passages_hit(t.golds, passages)
                    self._observe(t, self.observation_ids(passages))

    def _fail_batch(self, batch, err: BaseException) -> None:
        log.error("retrieval failed for %d queries: %s", len(batch), err)
        self.stats.retrieval_failures += len(batch)
        for t, _ in batch:
            if t.group_id in self.groups and not t.done:
                t.retrieval_failed = True
                self._finish(t, "retrieval_failed")

    def observation_ids(self, passages: list[Passage]) -> list[int]:
        """<information> block with the passages, passage text cut to max_obs_tokens tokens."""
        body = self._encode_cached(format_passages(passages).strip())[: self.cfg.max_obs_tokens]
        return self._encode_cached("\n\n<information>") + body + self._encode_cached("</information>\n\n")


class NoSearch:
    """Retrieval disabled (`actor.no_search`, the demo's control run): every search finds nothing."""

    def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        return [[] for _ in queries]

    def close(self) -> None:
        pass


def make_searcher(cfg) -> Searcher:
    """Synchronous retriever client from config: `actor.retriever_url` (an external Search-R1
    server) when set, else the scout retriever service at `actor.retriever_endpoint`; with
    `actor.no_search`, a searcher that finds nothing."""
    if cfg.actor.no_search:
        return NoSearch()
    from retriever.client import SyncRetriever, make_client  # lazy: actors import without it

    return SyncRetriever(make_client(cfg))
