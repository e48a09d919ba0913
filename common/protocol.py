"""Scout's messages, by exchange: every message an actor, the learner and the retriever send
each other, as one typed definition with a version (the frames they travel in: common/wire.py).

    control       Hello / HelloAck / Heartbeat / ErrorReply      actor ⇄ learner, any client ⇄ any server
    work          WorkRequest → WorkAssignment (Prompts)         actor → learner (credits for groups)
    trajectories  TrajectoryGroup → GroupAck                     actor → learner
    retrieval     RetrieveRequest → RetrieveReply (Passages)     actor → retriever router
                  ShardHello, ShardSearch → ShardResult          router ⇄ its shard processes
                  ShardSearchTokens → ShardResult                (BM25 indexes: token ids, not vectors)

Weight sync has messages of its own, beside the code that speaks them: common/weightsync/messages.py.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.wire import MAX_STR, ArraySpec, Message, construct_checked, encode, register

MAX_ANSWERS = 256  # golden answers in one Prompt
MAX_QUERY_CHARS = 4096
MAX_QUERIES = 4096
MAX_TOPK = 100
MAX_GROUP = 1024
MAX_GROUP_TOKENS = 1 << 24
MAX_PROMPTS = 4096


# --------------------------------------------------------------------------- control plane
@register
class Hello(Message):
    """A peer announces itself. A restarted process announces a fresh run_id."""

    TYPE = "hello"
    role: Literal["actor", "learner", "retriever", "client"]
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    worker: int = Field(default=0, ge=0)
    gpu: str = Field(default="cpu", max_length=64)
    host: str = Field(default="", max_length=256)
    pid: int = Field(default=0, ge=0)
    version: int = Field(default=-1, ge=-1)  # policy version currently loaded


@register
class HelloAck(Message):
    TYPE = "hello_ack"
    learner_run_id: str = Field(max_length=256)
    version: int = Field(ge=0)
    n_samples: int = Field(ge=1, le=MAX_GROUP)
    max_staleness: int = Field(ge=0)
    sync_endpoint: str = Field(default="", max_length=512)


@register
class Heartbeat(Message):
    TYPE = "heartbeat"
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    seq: int = Field(ge=0)
    version: int = Field(default=-1, ge=-1)
    time: float = 0.0


@register
class ErrorReply(Message):
    TYPE = "error"
    code: Literal["bad_request", "unauthorised", "unavailable", "internal", "timeout", "stale"]
    message: str = Field(max_length=MAX_STR)
    request_id: str = Field(default="", max_length=256)


# --------------------------------------------------------------------------- prompts / work
class Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt_id: int = Field(ge=0)
    question: str = Field(min_length=1, max_length=MAX_STR)
    golden_answers: list[str] = Field(max_length=MAX_ANSWERS)
    data_source: str = Field(default="", max_length=256)
    # the user message verbatim when the data brings its own template (Search-R1's processed
    # parquet); empty: the actor wraps `question` in its instruction
    text: str = Field(default="", max_length=MAX_STR)


@register
class WorkRequest(Message):
    """An actor asks for up to `max_prompts` prompts (one GRPO group each)."""

    TYPE = "work_request"
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    max_prompts: int = Field(ge=1, le=MAX_PROMPTS)
    version: int = Field(ge=-1)


@register
class WorkAssignment(Message):
    """The learner hands out prompts: each is a credit for one group. Empty means wait, unless
    `ended`: the learner's run is over (the actor exits, or with --stay waits for a new run)."""

    TYPE = "work_assignment"
    VERSION = 2  # 2: Prompt.text (a version-1 actor would wrap a templated prompt a second time), ended
    prompts: list[Prompt] = Field(max_length=MAX_PROMPTS)
    version: int = Field(ge=0)  # learner's current policy version
    min_version: int = Field(ge=0)  # oldest policy version whose tokens will still be accepted
    n_samples: int = Field(ge=1, le=MAX_GROUP)
    retry_after_s: float = Field(default=0.0, ge=0.0, le=3600.0)
    ended: bool = False  # the learner finished its run: no more prompts will come from this run


# --------------------------------------------------------------------------- trajectories
# TrajectoryGroup.behaviour: per-sample bits for the behaviour metrics of the Search-R1 paper, as
# the actor saw each rollout (actors/behaviour.py says when each is set)
BEHAVIOUR_BITS = {"valid_format": 1, "think_before_search": 2, "answered": 4, "search_hit": 8}
_BEHAVIOUR_MAX = sum(BEHAVIOUR_BITS.values())
_GROUP_BODY_KEYS = frozenset({"group_id", "peer_id", "run_id", "prompt_id", "num_searches", "retrieval_failed",
                              "correct", "created_at", "behaviour", "bad_searches"})
_GROUP_BODY_ORDER = ("group_id", "peer_id", "run_id", "prompt_id", "num_searches", "retrieval_failed", "correct",
                     "created_at", "behaviour", "bad_searches")
_INT_SET, _BOOL_SET = {int}, {bool}
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce


def _check_group(lengths: np.ndarray, tokens: np.ndarray, loss_mask: np.ndarray, logprobs: np.ndarray,
                 versions: np.ndarray, rewards: np.ndarray, num_searches: list, retrieval_failed: list,
                 correct: list, behaviour: list, bad_searches: list) -> None:
    """Cross-field and value checks of a TrajectoryGroup (raises ValueError). Runs on every received
    group, so each check is one vectorised pass without gathers."""
    n = lengths.shape[0]
    if not 1 <= n <= MAX_GROUP:
        raise ValueError(f"group size {n} outside 1..{MAX_GROUP}")
    if rewards.shape[0] != n or len(num_searches) != n or len(retrieval_failed) != n or len(correct) != n:
        for name, k in (("rewards", rewards.shape[0]), ("num_searches", len(num_searches)),
                        ("retrieval_failed", len(retrieval_failed)), ("correct", len(correct))):
            if k != n:
                raise ValueError(f"{name} has {k} entries, group has {n}")
    # Per-sample arrays are short: plain Python beats numpy's per-call overhead (and cannot overflow).
    lens = lengths.tolist()
    if min(lens) < 1:
        raise ValueError("every sample needs at least one token")
    total = sum(lens)
    if total > MAX_GROUP_TOKENS:
        raise ValueError(f"group has {total} tokens, cap is {MAX_GROUP_TOKENS}")
    if tokens.shape[0] != total or loss_mask.shape[0] != total or logprobs.shape[0] != total \
            or versions.shape[0] != total:
        for name, arr in (("tokens", tokens), ("loss_mask", loss_mask), ("logprobs", logprobs), ("versions", versions)):
            if arr.shape[0] != total:
                raise ValueError(f"{name} has {arr.shape[0]} entries, lengths sum to {total}")
    # Per-token arrays: one vectorised pass each, no gathers. total >= 1 here.
    if int(_MIN(tokens)) < 0:
        raise ValueError("negative token id")
    if int(_MAX(loss_mask)) > 1:
        raise ValueError("loss_mask must be 0 or 1")
    if np.count_nonzero((versions < 0).view(np.uint8) & loss_mask):
        raise ValueError("generated token without a policy version")
    # max propagates NaN (and NaN <= x is False); min exposes -inf
    if not float(_MAX(logprobs)) <= 1e-4 or not math.isfinite(float(_MIN(logprobs))):
        raise ValueError("behaviour logprobs must be finite and <= 0")
    if not all(map(math.isfinite, rewards.tolist())):
        raise ValueError("rewards must be finite")
    if min(num_searches) < 0:
        raise ValueError("num_searches must be >= 0")
    for name, values, top in (("behaviour", behaviour, _BEHAVIOUR_MAX), ("bad_searches", bad_searches, None)):
        if values:  # optional: empty = not reported
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries, group has {n}")
            if min(values) < 0 or (top is not None and max(values) > top):
                raise ValueError(f"{name} values must be in 0..{top if top is not None else 'any'}")


@register
class TrajectoryGroup(Message):
    """n samples of one prompt (a GRPO group), flattened sample after sample.

    Per token (length = sum(lengths)): tokens, loss_mask (1 = generated by the policy),
    logprobs (behaviour logprob of generated tokens, 0 elsewhere), versions (policy version
    that generated the token, -1 for prompt/observation tokens). Per sample: lengths, rewards;
    in the body, num_searches, retrieval_failed, correct and (optional, empty = not reported)
    behaviour (BEHAVIOUR_BITS) and bad_searches (empty queries and turns that were no action).
    """

    TYPE = "trajectory_group"
    VERSION = 2  # 2: behaviour, bad_searches
    ARRAYS = {
        "lengths": ArraySpec(("int32",)),
        "tokens": ArraySpec(("int32",)),
        "loss_mask": ArraySpec(("uint8",)),
        "logprobs": ArraySpec(("float32",)),
        "versions": ArraySpec(("int32",)),
        "rewards": ArraySpec(("float32",)),
    }
    group_id: str = Field(min_length=1, max_length=256)
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    prompt_id: int = Field(ge=0)
    num_searches: list[int] = Field(max_length=MAX_GROUP)
    retrieval_failed: list[bool] = Field(max_length=MAX_GROUP)
    correct: list[bool] = Field(max_length=MAX_GROUP)
    created_at: float = 0.0  # generation start (unix seconds), for end-to-end latency
    behaviour: list[int] = Field(default_factory=list, max_length=MAX_GROUP)
    bad_searches: list[int] = Field(default_factory=list, max_length=MAX_GROUP)
    lengths: np.ndarray
    tokens: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    rewards: np.ndarray

    @model_validator(mode="after")
    def _consistent(self) -> "TrajectoryGroup":
        _check_group(self.lengths, self.tokens, self.loss_mask, self.logprobs, self.versions, self.rewards,
                     self.num_searches, self.retrieval_failed, self.correct, self.behaviour, self.bad_searches)
        return self

    @classmethod
    def _fast_construct(cls, body: dict, arrays: dict, dtypes: dict) -> "TrajectoryGroup | None":
        """Hot path of `decode`: explicit checks that accept only what the pydantic schema accepts
        (exact types, lengths, bounds) plus the same `_check_group`, then a construct without a second
        validation. Anything unusual returns None and the full validation runs, which produces the
        error message, so errors read the same on both paths (tests/test_protocol.py checks that the
        fast path never accepts what pydantic rejects)."""
        if body.keys() != _GROUP_BODY_KEYS or arrays.keys() != cls.ARRAYS.keys():
            return None
        for key in ("group_id", "peer_id", "run_id"):
            v = body[key]
            if type(v) is not str or not 1 <= len(v) <= 256:
                return None
        pid, created = body["prompt_id"], body["created_at"]
        if type(pid) is not int or pid < 0 or type(created) is not float:
            return None
        for key, item_type in (("num_searches", _INT_SET), ("retrieval_failed", _BOOL_SET), ("correct", _BOOL_SET)):
            v = body[key]
            if type(v) is not list or len(v) > MAX_GROUP or set(map(type, v)) != item_type:
                return None
        for key in ("behaviour", "bad_searches"):  # may be empty
            v = body[key]
            if type(v) is not list or len(v) > MAX_GROUP or (v and set(map(type, v)) != _INT_SET):
                return None
        try:
            _check_group(arrays["lengths"], arrays["tokens"], arrays["loss_mask"], arrays["logprobs"],
                         arrays["versions"], arrays["rewards"], body["num_searches"], body["retrieval_failed"],
                         body["correct"], body["behaviour"], body["bad_searches"])
        except Exception:  # any doubt: the full validation decides and words the error
            return None
        return construct_checked(cls, {
            "array_dtypes": dtypes, "group_id": body["group_id"], "peer_id": body["peer_id"],
            "run_id": body["run_id"], "prompt_id": pid, "num_searches": body["num_searches"],
            "retrieval_failed": body["retrieval_failed"], "correct": body["correct"], "created_at": created,
            "behaviour": body["behaviour"], "bad_searches": body["bad_searches"], "lengths": arrays["lengths"], "tokens": arrays["tokens"], "loss_mask": arrays["loss_mask"],
            "logprobs": arrays["logprobs"], "versions": arrays["versions"], "rewards": arrays["rewards"]})

    def _body(self) -> dict:
        d = self.__dict__
        return {k: d[k] for k in _GROUP_BODY_ORDER}

    @property
    def n(self) -> int:
        return int(self.lengths.shape[0])

    @functools.cached_property
    def version_span(self) -> tuple[int, int]:
        """(oldest, newest) policy version among generated tokens, (-1, -1) if none were generated;
        one gather, computed once (the learner asks on arrival, at every take and in training)."""
        gen = self.versions[self.loss_mask.view(bool)]
        return (int(gen.min()), int(gen.max())) if gen.size else (-1, -1)

    def oldest_version(self) -> int:
        """Oldest policy version among generated tokens (-1 if none were generated)."""
        return self.version_span[0]

    def sample_slices(self) -> list[slice]:
        ends = np.cumsum(self.lengths.astype(np.int64))
        starts = ends - self.lengths
        return [slice(int(s), int(e)) for s, e in zip(starts, ends)]


@register
class GroupAck(Message):
    TYPE = "group_ack"
    group_id: str = Field(max_length=256)
    accepted: bool
    reason: str = Field(default="", max_length=1024)
    version: int = Field(ge=0)


# --------------------------------------------------------------------------- retrieval
class Passage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(max_length=1024)
    title: str = Field(max_length=MAX_STR)
    text: str = Field(max_length=1 << 20)
    score: float


@register
class RetrieveRequest(Message):
    TYPE = "retrieve_request"
    request_id: str = Field(min_length=1, max_length=256)
    queries: list[str] = Field(min_length=1, max_length=MAX_QUERIES)
    topk: int = Field(ge=1, le=MAX_TOPK)

    @model_validator(mode="after")
    def _queries(self) -> "RetrieveRequest":
        for i, q in enumerate(self.queries):
            if not q.strip():
                raise ValueError(f"query {i} is empty")
            if len(q) > MAX_QUERY_CHARS:
                raise ValueError(f"query {i} has {len(q)} characters, cap is {MAX_QUERY_CHARS}")
        return self


@register
class RetrieveReply(Message):
    TYPE = "retrieve_reply"
    request_id: str = Field(max_length=256)
    results: list[list[Passage]] = Field(max_length=MAX_QUERIES)


# Internal to the retriever service: router <-> shard processes (DEALER shard -> ROUTER router).
@register
class ShardHello(Message):
    """A shard process has loaded its index and is ready to search."""

    TYPE = "shard_hello"
    shard: int = Field(ge=0)
    pid: int = Field(ge=0)
    count: int = Field(ge=0)  # vectors held by this shard
    dim: int = Field(ge=1)
    device: str = Field(default="cpu", max_length=64)


@register
class ShardSearch(Message):
    """Router -> shard: search these (already encoded, normalised) query vectors."""

    TYPE = "shard_search"
    ARRAYS = {"vectors": ArraySpec(("float32",), ndim=2)}
    seq: int = Field(ge=0)
    topk: int = Field(ge=1, le=MAX_TOPK)
    vectors: np.ndarray

    @model_validator(mode="after")
    def _check(self) -> "ShardSearch":
        if not 1 <= self.vectors.shape[0] <= MAX_QUERIES:
            raise ValueError(f"{self.vectors.shape[0]} query vectors, expected 1..{MAX_QUERIES}")
        return self


@register
class ShardSearchTokens(Message):
    """Router -> shard of a BM25 index: search these tokenized queries. `tokens` holds every
    query's token ids (the index's global vocabulary) back to back, `lengths` the ids per query
    (0: a query without an indexed word). A type of its own beside ShardSearch, so dense shards
    and routers are unchanged."""

    TYPE = "shard_search_tokens"
    ARRAYS = {"tokens": ArraySpec(("int32",), ndim=1), "lengths": ArraySpec(("int32",), ndim=1)}
    seq: int = Field(ge=0)
    topk: int = Field(ge=1, le=MAX_TOPK)
    tokens: np.ndarray
    lengths: np.ndarray

    @model_validator(mode="after")
    def _check(self) -> "ShardSearchTokens":
        if not 1 <= len(self.lengths) <= MAX_QUERIES:
            raise ValueError(f"{len(self.lengths)} queries, expected 1..{MAX_QUERIES}")
        if len(self.lengths) and int(self.lengths.min()) < 0:
            raise ValueError("a query has a negative token count")
        if int(self.lengths.sum(dtype=np.int64)) != len(self.tokens):
            raise ValueError(f"lengths add up to {int(self.lengths.sum(dtype=np.int64))}, "
                             f"{len(self.tokens)} tokens sent")
        return self


@register
class ShardResult(Message):
    """Shard -> router: top-k per query. ids are global corpus rows, -1 where none."""

    TYPE = "shard_result"
    ARRAYS = {"scores": ArraySpec(("float32",), ndim=2), "ids": ArraySpec(("int64",), ndim=2)}
    seq: int = Field(ge=0)
    shard: int = Field(ge=0)
    scores: np.ndarray
    ids: np.ndarray

    @model_validator(mode="after")
    def _check(self) -> "ShardResult":
        if self.scores.shape != self.ids.shape:
            raise ValueError(f"scores {self.scores.shape} and ids {self.ids.shape} differ in shape")
        return self



def error_frames(code: str, message: str, request_id: str = "") -> list[Any]:
    return encode(ErrorReply(code=code, message=message[:MAX_STR], request_id=request_id[:256]))
