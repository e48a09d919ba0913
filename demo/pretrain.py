"""Pretrain the embedded demo's base model on CPU: language, tags and a generic copy prior.

    world_dir (demo.toyworld) ──load_world──▶ World
         │ pretraining_transcripts(seed): training entities only, values re-drawn, answers
         │ never gold (see demo/toyworld.py)
         ▼
    build_tiny_model (demo.tinymodel): byte-level BPE trained on those transcripts (every
         │ world word checked to be one token) + randomly initialised Qwen2
         ▼
    AdamW, warm-up + cosine, batches of similar-length transcripts (each tokenised segment by
         │ segment, exactly as the rollout concatenates prompt / generated / observation tokens),
         │ next-token loss on every token
         ▼
    out_dir: HF folder (safetensors, tokenizer, generation_config) + pretrain.json (the cache key,
             the settings, timings and the loss curve)

`pretrain_base_model` skips all work when out_dir/pretrain.json records the same key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from demo.toyworld import PriorSpec, Transcript, World, load_world, pretraining_transcripts, world_words

log = logging.getLogger("scout.demo.pretrain")

PRETRAIN_FORMAT = 2


@dataclass(frozen=True)
class PretrainSpec:
    layers: int = 2
    hidden: int = 64
    heads: int = 2  # head size 32: vLLM's CPU attention supports 32, 64, 80, 96, ... (not 16)
    intermediate: int = 192
    vocab_size: int = 1024
    steps: int = 2500
    batch: int = 48
    lr: float = 3e-3
    warmup: int = 100
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    tokenizer_texts: int = 4000
    prior: PriorSpec = field(default_factory=PriorSpec)
    # the copy check: at check_step, the answer copy (answer_copy below) must reach
    # check_min_copy, else pretraining starts again without invented names (another tokenizer
    # sample, initialisation and data order) for fallback_steps (0: steps), at most max_restarts
    # times (0 = no check). The copy forms abruptly, between steps ~750 and ~1,000 where it forms
    # at all; in one world of ten it did not form with invented names (docs/DEMO_DESIGN.md).
    # Without invented names the old recipe's 1,500 steps suffice. Whether it forms also depends
    # on the CPU's arithmetic: on an AVX2-only VM seed 1's world failed at its first two
    # initialisations and passed at the third, so three restarts, not one (DEMO_DESIGN.md)
    check_step: int = 1250
    check_min_copy: float = 0.1
    max_restarts: int = 3
    fallback_steps: int = 1500

    def key(self, world_digest: str, seed: int) -> str:
        fields = {**asdict(self), "prior": self.prior.key_fields()}
        if not self.max_restarts:  # added later: base models pretrained without the check keep their keys
            for name in ("check_step", "check_min_copy", "max_restarts", "fallback_steps"):
                del fields[name]
        blob = json.dumps({"format": PRETRAIN_FORMAT, "world": world_digest, "seed": seed, **fields},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_spec(spec: PretrainSpec) -> None:
    if spec.hidden % spec.heads or spec.hidden // spec.heads not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(f"hidden/heads = {spec.hidden}/{spec.heads}: the head size must be one of "
                         f"{VLLM_CPU_HEAD_SIZES} (vLLM's CPU attention)")
    if spec.fallback_steps < 0 or spec.max_restarts < 0 or spec.steps < 1:
        raise ValueError(f"steps {spec.steps}, fallback_steps {spec.fallback_steps}, max_restarts "
                         f"{spec.max_restarts}: steps must be >= 1, the others >= 0")


def _check_tokenizer(tok, world: World) -> None:
    split = [w for w in world_words(world) if len(tok.encode(" " + w, add_special_tokens=False)) != 1]
    if split:
        raise RuntimeError(f"tokenizer splits {len(split)} world words (e.g. {split[:5]}): raise vocab_size")


def encode_transcript(tok, t: Transcript) -> list[int]:
    """Token ids of a transcript, segment by segment (as a rollout concatenates them), + eos."""
    ids: list[int] = []
    for text, _generated in t.segments:
        ids += tok.encode(text, add_special_tokens=False)
    return ids + [tok.eos_token_id]


def _batches(tok, world: World, spec: PretrainSpec, seed: int, pool_batches: int = 64):
    """Endless batches (lists of id lists) of freshly sampled transcripts. Not sorted by length:
    that would put all answer-at-once transcripts (the short ones) in the same batches."""
    round_ = 0
    while True:
        ts = pretraining_transcripts(world, spec.batch * pool_batches, seed=seed * 1_000_003 + round_, prior=spec.prior)
        seqs = [encode_transcript(tok, t) for t in ts]
        yield from (seqs[i:i + spec.batch] for i in range(0, len(seqs), spec.batch))
        round_ += 1


def _lr_at(step: int, spec: PretrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (spec.min_lr_frac + (1 - spec.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def _train(model, tok, world: World, spec: PretrainSpec, seed: int, log_every: int, check=None) -> list[dict]:
    """Next-token training for spec.steps; `check(step, model)` runs at spec.check_step and may
    abandon the run (returns False: the curve so far comes back, its last entry marked)."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98))
    pad = tok.pad_token_id
    curve, t0, c0, run_loss, run_n = [], time.time(), time.process_time(), 0.0, 0
    model.train()
    for step, batch in zip(range(spec.steps), _batches(tok, world, spec, seed)):
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s)
        labels = ids.clone()
        labels[ids == pad] = -100
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        logits = model(input_ids=ids).logits[:, :-1]  # right padding: causal attention needs no mask
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        run_loss, run_n = run_loss + float(loss.detach()), run_n + 1
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            entry = {"step": step + 1, "loss": run_loss / run_n, "seconds": round(time.time() - t0, 1),
                     "cpu_seconds": round(time.process_time() - c0, 1)}
            curve.append(entry)
            log.info("pretrain step %d/%d loss %.4f (%.0f s)", step + 1, spec.steps, entry["loss"], entry["seconds"])
            run_loss, run_n = 0.0, 0
        if check is not None and step + 1 == spec.check_step and step + 1 < spec.steps:
            model.eval()
            ok = check(step + 1, model)
            model.train()
            if not ok:
                curve.append({"step": step + 1, "abandoned": True})
                break
    model.eval()
    return curve


def answer_copy(model, tok, world: World, prior: PriorSpec, n: int = 60) -> float:
    """The copy the prior teaches, measured: over n of the prior's own transcripts that searched
    (training entities and invented names only, never a held-out one), the probability the
    model gives, where the answer starts, to the values its last information block shows.
    Guessing puts about topk / (number of values) there (0.015 for the demo); a model that
    copies, 0.2-0.4 after 1,250 steps (0.6-0.85 in the multi-hop world: one passage a block)."""
    import torch

    ts = [t for t in pretraining_transcripts(world, 8 * n, seed=-7, prior=prior) if t.searched][:n]
    mass = 0.0
    for t in ts:
        ids: list[int] = []
        for text, _generated in t.segments[:-1]:
            ids += tok.encode(text, add_special_tokens=False)
        answer = tok.encode(t.segments[-1][0], add_special_tokens=False)
        first = tok.encode(" " + t.answer, add_special_tokens=False)[0]
        ids += answer[:answer.index(first)]  # "<answer>", as the rollout's tokens have it
        last_block = [text for text, generated in t.segments if not generated][-1]
        values = {tok.encode(" " + v, add_special_tokens=False)[0] for v in re.findall(r" is (\S+) \.", last_block)}
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
        mass += float(probs[sorted(values)].sum())
    return mass / max(1, len(ts))


def default_spec(world: World) -> PretrainSpec:
    """The recipe's pretraining: the multi-hop world's prior also searches for what it read."""
    if world.chains:
        from demo.multihop import MULTIHOP_PRIOR, WORLD_VOCAB

        # longer transcripts (copying comes later); one token for each one-word country. Its
        # check has never failed (0.63-0.84 at step 1,250 over five worlds): the fallback, never
        # measured, keeps the full 3,000 steps (a restarted run stays well under 20 min)
        return PretrainSpec(prior=MULTIHOP_PRIOR, steps=3000, vocab_size=WORLD_VOCAB, fallback_steps=0)
    return PretrainSpec()


def pretrain_base_model(world_dir: str | Path, out_dir: str | Path, seed: int = 0, spec: PretrainSpec | None = None,
                        threads: int = 0, log_every: int = 100, **overrides) -> Path:
    """Build and pretrain the demo base model from the world in `world_dir`; returns `out_dir`.
    Keyword overrides replace PretrainSpec fields (e.g. steps=2000). Cached by pretrain.json."""
    import torch

    world = load_world(world_dir)
    spec = spec or default_spec(world)
    if isinstance(overrides.get("prior"), dict):
        overrides["prior"] = PriorSpec(**overrides["prior"])
    if overrides:
        spec = PretrainSpec(**{**asdict(spec), "prior": spec.prior, **overrides})
    check_spec(spec)
    out = Path(out_dir)
    key = spec.key(world.spec.digest(), seed)
    meta_path = out / "pretrain.json"
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("key") == key and (out / "config.json").is_file():
                return out
        except (OSError, json.JSONDecodeError):
            pass
    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.time()
    model, tok, curve, checks = _train_with_restarts(out, world, spec, seed, log_every)
    model.save_pretrained(str(out), safe_serialization=True)
    meta = {"key": key, "seed": seed, "world": world.spec.digest(), "spec": asdict(spec),
            "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
            "seconds": round(time.time() - t0, 1), "copy_checks": checks, "curve": curve}
    tmp = meta_path.with_name("pretrain.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)
    return out


def _build(out: Path, world: World, spec: PretrainSpec, init: int):
    """The tokenizer (trained on a sample of transcripts drawn with `init`) and the initial model,
    written to `out`; returns (model, tokenizer)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from demo.tinymodel import build_tiny_model

    texts = [t.text for t in pretraining_transcripts(world, spec.tokenizer_texts, seed=-1 - init, prior=spec.prior)]
    texts.append(" ".join(w for w in world_words(world) for _ in range(4)))  # make sure every word merges
    build_tiny_model(out, texts=texts, layers=spec.layers, hidden=spec.hidden, heads=spec.heads,
                     intermediate=spec.intermediate, vocab_size=spec.vocab_size, max_positions=1024, seed=init)
    tok = AutoTokenizer.from_pretrained(str(out))
    _check_tokenizer(tok, world)
    torch.manual_seed(init)
    return Qwen2ForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32), tok


def _train_with_restarts(out: Path, world: World, spec: PretrainSpec, seed: int, log_every: int):
    """Build and pretrain; when the copy check fails at spec.check_step, start again with the
    prior *without invented names* for spec.fallback_steps, a tokenizer trained on its
    transcripts, another initialisation and data order (attempt k uses seed + 7919 k), at most spec.max_restarts
    times; the last attempt always runs to the end. (In seed 4's world, the one of ten where the
    answer copy did not form, four attempts with invented names out of five stayed at chance,
    0.015, whatever the initialisation or tokenizer sample; without them it formed.) Returns
    (model, tokenizer, curve of the kept attempt, [{attempt, seed, step, answer_copy, passed,
    p_novel_entity}])."""
    import dataclasses

    first = spec
    checks: list[dict] = []
    for attempt in range(first.max_restarts + 1):
        init = seed + 7919 * attempt
        if attempt:
            spec = dataclasses.replace(first, prior=dataclasses.replace(first.prior, p_novel_entity=0.0),
                                       steps=first.fallback_steps or first.steps)
        model, tok = _build(out, world, spec, init)
        last = attempt == spec.max_restarts

        def check(step: int, m) -> bool:
            copy = answer_copy(m, tok, world, spec.prior)
            passed = copy >= spec.check_min_copy
            checks.append({"attempt": attempt, "seed": init, "step": step, "answer_copy": round(copy, 3),
                           "passed": passed, "p_novel_entity": spec.prior.p_novel_entity})
            if passed or not last:
                log.info("pretrain copy check at step %d: answer copy %.3f (%s)", step, copy,
                         "passed" if passed else "failed: starting again")
            else:
                log.warning("pretrain copy check at step %d: answer copy %.3f, below %.2f at the last of %d "
                            "attempts: going on, but RL from this base model may never find a reward (try "
                            "another --seed; docs/DEMO_DESIGN.md, the copy check)", step, copy,
                            spec.check_min_copy, spec.max_restarts + 1)
            return passed or last

        curve = _train(model, tok, world, spec, init, log_every, check=check if spec.max_restarts else None)
        if not curve or not curve[-1].get("abandoned"):
            return model, tok, curve, checks
    raise AssertionError("unreachable: the last attempt is never abandoned")
