"""Ingest back-pressure (issue #18, item 2): simulated actors (bench/ingest_sim.py, real processes,
the real protocol) send to the real IngestServer faster than a slow trainer drains it.

The trainer takes one batch per 10 answered groups, so arrivals outrun it whatever the timing:
the buffer must stay within learner.buffer_groups, the surplus must be refused with "buffer full"
and counted, every group sent must get an answer, and every accepted group must come out of the
buffer (trained, or dropped stale and counted). Count-based, not timed.
"""

from __future__ import annotations

import json
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from common.config import load_config
from learner.ingest import Dispatcher, IngestServer

BUFFER, PER_STEP, VOCAB, ROWS = 4, 2, 1000, 64


class WatchedServer(IngestServer):
    """The real server; records the most groups its buffer ever held right after a group arrived."""

    peak = 0

    def _on_group(self, g):
        ack = super()._on_group(g)
        self.peak = max(self.peak, len(self.buffer))
        return ack


def received(srv: IngestServer) -> dict[str, float]:
    """scout_learner_groups_received_total by result, as /metrics shows it."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(srv.metrics.render().decode()):
        for s in fam.samples:
            if s.name == "scout_learner_groups_received_total":
                out[s.labels["result"]] = s.value
    return out


def start_sims(procs, endpoint: str, tmp_path, mode: str, count: int, groups: int) -> list:
    out = []
    for i in range(count):
        path = tmp_path / f"{mode}-{i}.json"
        p = procs.start(["bench/ingest_sim.py", "--endpoint", endpoint, "--actors", "4", "--first", str(10 * i),
                         "--mode", mode, "--size", "demo", "--vocab", str(VOCAB), "--rows", str(ROWS),
                         "--groups", str(groups), "--ack-timeout-ms", "20000", "--out", str(path)])
        out.append((p, path))
    return out


def test_actors_faster_than_the_trainer_are_refused_counted_and_nothing_accepted_is_lost(ipc_path, procs, tmp_path):
    cfg = load_config(None, [f"learner.ingest_endpoint='{ipc_path('ingest')}'", "learner.n_samples=8",
                             f"learner.groups_per_step={PER_STEP}", f"learner.buffer_groups={BUFFER}",
                             "learner.max_staleness=1", "learner.retry_after_s=0.05",
                             "learner.buffer_full_delay_s=0.02"])
    rows = [{"question": f"q{i}?", "golden_answers": [f"a{i}"], "data_source": "t"} for i in range(ROWS)]
    srv = WatchedServer(cfg, Dispatcher(rows, seed=1), vocab_size=VOCAB).start()
    # flood: actors that ignore credits (groups for any prompt, back to back); credit: the worker's way
    floods = start_sims(procs, srv.endpoint, tmp_path, "flood", 2, 60)
    credits = start_sims(procs, srv.endpoint, tmp_path, "credit", 1, 20)
    taken, version, answered_at_last_take = 0, 0, 0
    deadline = time.monotonic() + 120  # no hang: the actors give up after 20 s without an answer
    try:
        while any(p.poll() is None for p, _ in floods + credits):
            assert time.monotonic() < deadline, "simulated actors still running after 120 s"
            answered = sum(srv.snapshot().get(k, 0) for k in ("accepted", "rejected", "buffer_full", "stale", "duplicate"))
            floods_done = all(p.poll() is not None for p, _ in floods)
            # a slow trainer: one batch per 10 answered groups (once the floods are over: whenever one is there)
            if answered - answered_at_last_take < 10 and not floods_done:
                time.sleep(0.01)
                continue
            batch = srv.take_groups(PER_STEP, 0.5)
            if batch is not None:
                taken, version, answered_at_last_take = taken + len(batch), version + 1, answered
                srv.release(version)  # a new policy version: older groups in the buffer may go stale
        rest = srv.take_groups(len(srv.buffer), 5) if srv.buffer else []
        taken += len(rest or [])
        srv.release(version)
    finally:
        srv.stop()
    for p, _ in floods + credits:
        assert p.wait(30) == 0, "a simulated actor process failed"
    sims = [json.loads(path.read_text()) for _, path in floods + credits]
    sent = sum(s["sent"] for s in sims)
    answers: dict[str, int] = {}
    for s in sims:
        for reason, n in s["answers"].items():
            answers[reason] = answers.get(reason, 0) + n
    counts, metric = srv.snapshot(), received(srv)
    print(f"sent {sent}, answers {answers}, learner {counts}, /metrics {metric}, peak buffer {srv.peak}",
          file=sys.stderr)

    assert srv.peak <= BUFFER  # memory bounded: never more groups held than the buffer's capacity
    assert answers.get("buffer full", 0) > 0  # the surplus was refused, with its reason...
    refused = {r: n for r, n in answers.items() if r not in ("accepted", "stale")}
    assert metric.get("buffer_full", 0) == sum(refused.values())  # ...and counted on /metrics
    assert metric.get("stale", 0) == answers.get("stale", 0)
    # every group sent got an answer: accepted or refused with a reason, nothing silently lost
    assert "unanswered" not in answers and sum(answers.values()) == sent
    assert sum(metric.values()) == sent and metric.get("accepted", 0) == answers.get("accepted", 0)
    # every accepted group left the buffer: taken by the trainer, or dropped stale in the buffer (counted)
    stale_in_buffer = counts.get("stale", 0) - metric.get("stale", 0)
    assert counts["buffer"] == 0 and taken + stale_in_buffer == metric["accepted"]
    assert taken > 0 and sum(s["answers"].get("accepted", 0) for s in sims[len(floods):]) > 0  # credit actors got through


def test_a_flooding_actor_is_held_to_one_refusal_per_delay(ipc_path, procs, tmp_path):
    """learner.buffer_full_delay_s: with the buffer full and nobody training, 4 actors ignoring
    credits (one group in flight each) get each "buffer full" answer no sooner than the delay, so
    the refusals take at least (refused / 4) delays while the ingest thread stays mostly idle;
    every group is still answered and counted."""
    delay = 0.25
    cfg = load_config(None, [f"learner.ingest_endpoint='{ipc_path('flood')}'", "learner.n_samples=8",
                             f"learner.groups_per_step={PER_STEP}", f"learner.buffer_groups={BUFFER}",
                             "learner.max_staleness=1", f"learner.buffer_full_delay_s={delay}"])
    rows = [{"question": f"q{i}?", "golden_answers": [f"a{i}"], "data_source": "t"} for i in range(ROWS)]
    srv = WatchedServer(cfg, Dispatcher(rows, seed=1), vocab_size=VOCAB).start()
    try:
        t0 = time.monotonic()
        (p, path), = start_sims(procs, srv.endpoint, tmp_path, "flood", 1, 40)
        assert p.wait(120) == 0, "the simulated actors failed"
        took, busy = time.monotonic() - t0, srv.busy_seconds()
    finally:
        srv.stop()
    sim, metric = json.loads(path.read_text()), received(srv)
    print(f"{sim['answers']} in {took:.2f} s, ingest thread busy {busy:.3f} s", file=sys.stderr)
    assert sim["sent"] >= 40 and sum(sim["answers"].values()) == sim["sent"]  # every group answered
    assert sim["answers"].get("accepted", 0) == BUFFER == srv.peak  # the buffer filled, then refusals
    refused = sim["answers"]["buffer full"]
    assert metric["buffer_full"] == refused and metric["accepted"] == BUFFER  # counted on /metrics
    assert took >= refused / 4 * delay  # each actor waited out the delay for every refusal
    assert busy < took / 4  # the ingest thread was mostly idle through the flood
    assert not srv._deferred  # nothing left held back
