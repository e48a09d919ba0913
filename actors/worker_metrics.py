"""The Prometheus metrics of one actor worker (labels worker, gpu), its 10 s windowed rates, and
the per-rollout counters behind the behaviour metrics (actors/behaviour.py).

Where the worker's time goes: `scout_actor_phase_seconds_total{phase}` over PHASES (see
actors/worker.py). Behaviour rates are ratios of counters, e.g. think-before-search =
rate(scout_actor_rollout_behaviour_total{behaviour="think_before_search"}) /
rate(scout_actor_searching_rollouts_total).
"""

from __future__ import annotations

import collections
import time

import numpy as np

from actors.rollout import Trajectory
from common.metrics import Metrics
from common.protocol import BEHAVIOUR_BITS

PHASES = ("engine", "rollout", "send", "link", "weight_load", "search_wait", "no_work")


class WorkerMetrics:
    """Prometheus metrics of one worker (labels worker, gpu) plus windowed rates."""

    def __init__(self, worker: int, gpu: str):
        m = self.m = Metrics(role="actor", labels={"worker": str(worker), "gpu": gpu})
        self.tokens = m.counter("scout_actor_generated_tokens_total", "tokens sampled by the engine")
        self.groups = m.counter("scout_actor_groups_total", "groups finished, by learner verdict", ("result",))
        self.rollouts = m.counter("scout_actor_rollouts_total", "rollouts finished, by how they ended", ("finish",))
        self.searches = m.counter("scout_actor_searches_total", "search calls made by rollouts")
        self.retrieval_failed = m.counter("scout_actor_retrieval_failed_total", "rollouts ended by a retrieval failure")
        self.correct = m.counter("scout_actor_correct_total", "rollouts whose answer exactly matches a gold answer")
        self.searches_per = m.histogram("scout_actor_searches_per_rollout", "searches in one rollout",
                                        buckets=(0, 1, 2, 3, 4, 5, 6, 8, 10))
        self.reward = m.histogram("scout_actor_reward", "reward of a finished rollout",
                                  buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0))
        self.reward_mean = m.gauge("scout_actor_reward_mean", "mean reward over the last 10 s window")
        self.tokens_per_s = m.gauge("scout_actor_tokens_per_second", "tokens/s over the last window")
        self.groups_per_s = m.gauge("scout_actor_groups_per_second", "groups/s over the last window")
        self.idle = m.gauge("scout_actor_engine_idle_fraction", "share of wall time not spent in engine steps")
        self.version = m.gauge("scout_actor_policy_version", "policy version loaded in the engine")
        self.lag = m.gauge("scout_actor_version_lag", "learner version minus the engine's version")
        self.load_s = m.histogram("scout_actor_weight_load_seconds", "wall time of one weight update")
        self.inflight = m.gauge("scout_actor_groups_in_flight", "groups generating or awaiting an ack")
        self.links = m.counter("scout_actor_link_resets_total", "learner link resets (fresh run_id)")
        self.phase = m.counter("scout_actor_phase_seconds_total", "worker wall time by phase (see actors/worker.py)",
                               ("phase",))
        self.phase_total = dict.fromkeys(PHASES, 0.0)
        self.search_s = m.counter("scout_actor_search_seconds_total", "retrieval call time (search threads; "
                                  "overlaps the engine)")
        # the Search-R1 paper's behaviour metrics (actors/behaviour.py); rates are ratios of counters
        self.behaviour = m.counter("scout_actor_rollout_behaviour_total", "finished rollouts showing a behaviour: "
                                   "valid_format, think_before_search, answered, search_hit", ("behaviour",))
        self.searching = m.counter("scout_actor_searching_rollouts_total", "finished rollouts with at least one "
                                   "search (the base of think_before_search and search_hit)")
        self.bad_searches = m.counter("scout_actor_bad_searches_total", "turns that were no action or an empty query")
        self.heap_trimmed = m.counter("scout_actor_heap_trimmed_bytes_total", "RSS given back to the OS by "
                                      "malloc_trim (actor.heap_trim_s)")
        self.groups_sent = m.counter("scout_actor_groups_sent_total", "groups sent to the learner")
        self.groups_rewarded = m.counter("scout_actor_groups_rewarded_total", "groups sent with some sample's "
                                         "reward above 0 (sparse rewards: the share that carries a signal)")
        self._search_seen = 0.0
        self.window_t = time.monotonic()
        self.window = collections.Counter()
        self.rewards: list[float] = []
        self.snapshot: dict[str, float] = {}

    def add_phase(self, phase: str, seconds: float) -> None:
        if seconds > 0:
            self.phase.labels(phase=phase).inc(seconds)
            self.phase_total[phase] += seconds

    def searched(self, total_seconds: float) -> None:
        """The runner's cumulative retrieval time; the counter follows it."""
        if total_seconds > self._search_seen:
            self.search_s.inc(total_seconds - self._search_seen)
            self._search_seen = total_seconds

    def roll(self) -> bool:
        """Close a 10 s window: rates and idle fraction. Returns True when a window closed."""
        now = time.monotonic()
        dt = now - self.window_t
        if dt < 10.0:
            return False
        w = self.window
        snap = {"tokens_per_s": w["tokens"] / dt, "groups_per_s": w["groups"] / dt,
                "engine_idle_fraction": max(0.0, 1.0 - w["step_us"] / 1e6 / dt),
                "reward_mean": float(np.mean(self.rewards)) if self.rewards else 0.0,
                "searches_per_rollout": w["searches"] / max(1, w["rollouts"]),
                "phases": {k: round(v, 3) for k, v in self.phase_total.items()}}
        self.tokens_per_s.set(snap["tokens_per_s"])
        self.groups_per_s.set(snap["groups_per_s"])
        self.idle.set(snap["engine_idle_fraction"])
        self.reward_mean.set(snap["reward_mean"])
        self.snapshot = snap
        self.window_t, self.window, self.rewards = now, collections.Counter(), []
        return True


def count_behaviour(mm: WorkerMetrics, t: Trajectory) -> None:
    """One finished rollout into the behaviour counters (actors/behaviour.py)."""
    bits = t.bits
    for name, bit in BEHAVIOUR_BITS.items():
        if bits & bit:
            mm.behaviour.labels(behaviour=name).inc()
    if t.num_searches:
        mm.searching.inc()
    mm.bad_searches.inc(t.num_invalid)
