"""Feasibility harness for the embedded demo: can the tiny pretrained model learn, by
outcome-only GRPO, to search and answer from what it found? Plain PyTorch, one process.

    build_world ──▶ corpus / train / heldout / swapped   (demo.toyworld, cached)
    pretrain_base_model ──▶ HF Qwen2 folder               (demo.pretrain, cached)
    Retrieval: packaged all-MiniLM-L6-v2 (retriever.encoder.Encoder: AutoModel, mean pooling,
               normalised) over a faiss IndexFlatIP of the corpus (and of the swapped corpus)
    loop:  B questions × G samples ──Rollouts (KV-cache sampling, multi-turn:
             <search> q </search> → \\n\\n<information>Doc i(Title: T) text</information>\\n\\n)
           ──EM reward──▶ group-mean-centred advantages (optional /std)
           ──token-mean policy-gradient loss over generated tokens (observations masked)──▶ Adam
    eval:  greedy held-out EM, right-search rate, EM on the swapped corpus, EM with retrieval off

    python bench/toyworld_study.py --out /tmp/toystudy --rl-steps 150

Prints one JSON line per evaluation and a summary (timings of each phase) at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.toyworld import build_world, format_information, make_prompt  # noqa: E402

EMPTY_INFO = "\n\n<information></information>\n\n"


# --------------------------------------------------------------------------- reward
def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def em(pred: str | None, golds: list[str]) -> float:
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


# --------------------------------------------------------------------------- retrieval
class Retrieval:
    """MiniLM + faiss Flat (inner product) over one or more corpora; query vectors cached."""

    def __init__(self, corpora: dict[str, Path], cache_dir: Path, threads: int = 2):
        import faiss

        from retriever.encoder import Encoder

        self.enc = Encoder(threads=threads)
        self.indexes, self.docs, self.qcache = {}, {}, {}
        for name, path in corpora.items():
            rows = [json.loads(line) for line in path.open()]
            self.docs[name] = [(r["id"], *_split(r["contents"])) for r in rows]
            digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
            emb_path = cache_dir / f"emb-{name}-{digest}.npy"
            if emb_path.is_file():
                emb = np.load(emb_path)
            else:
                emb = self.enc.encode([r["contents"] for r in rows], batch_size=128)
                np.save(emb_path, emb)
            idx = faiss.IndexFlatIP(emb.shape[1])
            idx.add(emb)
            self.indexes[name] = idx

    def search(self, queries: list[str], corpus: str, k: int) -> list[list[tuple[str, str, str]]]:
        new = sorted({q for q in queries if q not in self.qcache})
        if new:
            vecs = self.enc.encode(new, batch_size=128)
            self.qcache.update(zip(new, vecs))
        if not queries:
            return []
        q = np.stack([self.qcache[x] for x in queries])
        _, ids = self.indexes[corpus].search(q, k)
        return [[self.docs[corpus][j] for j in row] for row in ids]


def _split(contents: str) -> tuple[str, str]:
    first, _, rest = contents.partition("\n")
    return first.strip().strip('"'), rest


# --------------------------------------------------------------------------- rollouts
@dataclass
class Traj:
    question: str
    golds: list[str]
    gold_pid: str
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    retrieved: list[list[str]] = field(default_factory=list)
    answer: str | None = None
    done: bool = False
    reward: float = 0.0

    @property
    def right_search(self) -> bool:
        return any(self.gold_pid in r for r in self.retrieved)

    @property
    def right_top1(self) -> bool:
        return any(r and r[0] == self.gold_pid for r in self.retrieved)


class Roller:
    """Batched multi-turn sampling with a KV cache, turn by turn (left padding)."""

    def __init__(self, model, tok, retrieval: Retrieval | None, topk: int = 3, max_turns: int = 2,
                 max_new: int = 24):
        self.model, self.tok, self.retrieval = model, tok, retrieval
        self.topk, self.max_turns, self.max_new = topk, max_turns, max_new
        ids = tok.convert_tokens_to_ids(["</search>", "</answer>", "<search>", "<answer>"])
        self.end_search, self.end_answer, self.open_search, self.open_answer = ids
        self.stops = {self.end_search, self.end_answer, tok.eos_token_id}

    def run(self, items: list[dict], temperature: float, corpus: str = "true", search: bool = True) -> list[Traj]:
        trajs = [Traj(it["question"], it["golden_answers"], it.get("passage_id", "")) for it in items]
        for t in trajs:
            t.tokens = self.tok.encode(make_prompt(t.question), add_special_tokens=False)
            t.mask = [0] * len(t.tokens)
        for turn in range(self.max_turns + 1):
            active = [t for t in trajs if not t.done]
            if not active:
                break
            self._generate(active, temperature)
            self._observe(active, turn, corpus, search)
        return trajs

    def _generate(self, trajs: list[Traj], temperature: float) -> None:
        import torch
        from transformers import DynamicCache

        n, width = len(trajs), max(len(t.tokens) for t in trajs)
        ids = torch.full((n, width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, t in enumerate(trajs):
            ids[i, width - len(t.tokens):] = torch.tensor(t.tokens)
            mask[i, width - len(t.tokens):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache, live = DynamicCache(), torch.ones(n, dtype=torch.bool)
        out = [[] for _ in range(n)]
        with torch.inference_mode():
            for step in range(self.max_new):
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                    past_key_values=cache, use_cache=True).logits[:, -1].float()
                if temperature > 0:
                    nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(1)
                else:
                    nxt = logits.argmax(-1)
                for i in torch.nonzero(live).squeeze(1).tolist():
                    tokid = int(nxt[i])
                    out[i].append(tokid)
                    if tokid in self.stops:
                        live[i] = False
                if not live.any():
                    break
                ids = nxt.unsqueeze(1)
                mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], 1)
                pos = pos[:, -1:] + 1
        for t, gen in zip(trajs, out):
            t.tokens += gen
            t.mask += [1] * len(gen)

    def _observe(self, trajs: list[Traj], turn: int, corpus: str, search: bool) -> None:
        want: list[tuple[Traj, str]] = []
        for t in trajs:
            last = t.tokens[-1]
            gen = self._last_segment(t)
            if last == self.end_answer and self.open_answer in gen:
                body = gen[len(gen) - gen[::-1].index(self.open_answer):-1]
                t.answer = self.tok.decode(body).strip()
                t.done, t.reward = True, em(t.answer, t.golds)
            elif last == self.end_search and self.open_search in gen and turn < self.max_turns:
                body = gen[len(gen) - gen[::-1].index(self.open_search):-1]
                want.append((t, self.tok.decode(body).strip()))
            else:
                t.done = True  # invalid action, out of tokens or out of turns: no answer
        results = self.retrieval.search([q for _, q in want], corpus, self.topk) if (want and search) else []
        for j, (t, q) in enumerate(want):
            t.queries.append(q)
            if search:
                docs = results[j]
                t.retrieved.append([d[0] for d in docs])
                obs = format_information([(d[1], d[2]) for d in docs])
            else:
                t.retrieved.append([])
                obs = EMPTY_INFO
            ids = self.tok.encode(obs, add_special_tokens=False)
            t.tokens += ids
            t.mask += [0] * len(ids)

    @staticmethod
    def _last_segment(t: Traj) -> list[int]:
        start = len(t.mask) - t.mask[::-1].index(0) if 0 in t.mask else 0
        return t.tokens[start:]


# --------------------------------------------------------------------------- evaluation
def _info_texts(tok, t: Traj) -> list[str]:
    text = tok.decode(t.tokens)
    return re.findall(r"<information>(.*?)</information>", text, flags=re.S)


def _answer_in_info(tok, t: Traj) -> bool:
    infos = _info_texts(tok, t)
    return bool(infos) and f" {t.answer} " in f" {infos[-1]} "


def _answer_is_doc1_value(tok, t: Traj) -> bool:
    infos = _info_texts(tok, t)
    m = re.match(r"Doc 1\(Title: [^)]*\) [^\n]*? is ([^\n]+?) \.", infos[-1]) if infos else None
    return bool(m) and m.group(1) == t.answer

def evaluate(roller: Roller, items: list[dict], swapped: list[dict], temperature: float = 0.0,
             batch: int = 200) -> dict:
    def run(its, **kw):
        out = []
        for i in range(0, len(its), batch):
            out += roller.run(its[i:i + batch], temperature, **kw)
        return out

    base = run(items)
    sw = run(swapped, corpus="swapped")
    off = run(items, search=False)
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return {"em": mean([t.reward for t in base]),
            "search_rate": mean([bool(t.queries) for t in base]),
            "right_search": mean([t.right_search for t in base]),
            "right_top1": mean([t.right_top1 for t in base]),
            "em_swapped": mean([t.reward for t in sw]),
            "em_swapped_vs_true": mean([em(a.answer, b["golden_answers"]) for a, b in zip(sw, items)]),
            "em_no_retrieval": mean([t.reward for t in off]),
            "answered": mean([t.answer is not None for t in base]),
            "query_is_span": mean([f" {q} " in f" {t.question} " for t in base for q in t.queries]),
            "answer_in_info": mean([_answer_in_info(roller.tok, t) for t in base if t.queries and t.answer]),
            "answer_is_doc1_value": mean([_answer_is_doc1_value(roller.tok, t) for t in base
                                          if t.queries and t.answer]),
            "distinct_answers": len({t.answer for t in base}),
            "example": roller.tok.decode(base[0].tokens)}


# --------------------------------------------------------------------------- GRPO
@dataclass
class RLSpec:
    steps: int = 150
    prompts: int = 16  # questions per step (B)
    group: int = 8  # samples per question (G)
    lr: float = 3e-4
    temperature: float = 1.0
    std_norm: bool = False  # divide the centred advantages by the group std
    grad_clip: float = 1.0
    max_new: int = 24  # tokens per turn
    max_turns: int = 2  # searches allowed; one more turn to answer
    topk: int = 3
    search: bool = True  # False: every search returns an empty information block


def advantages(rewards: list[float], group: int, std_norm: bool) -> list[float]:
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group)
    a = r - r.mean(1, keepdims=True)
    if std_norm:
        a = a / (r.std(1, keepdims=True) + 1e-6)
    return a.reshape(-1).tolist()


def grpo_update(model, opt, trajs: list[Traj], adv: list[float], pad: int, grad_clip: float,
                micro: int = 64) -> dict:
    """Token-mean policy gradient over every generated token of the batch (denominator: all
    generated tokens, as the learner does); zero-advantage samples are not even forwarded."""
    import torch

    denom = sum(sum(t.mask) for t in trajs)
    keep = [(t, a) for t, a in zip(trajs, adv) if a != 0.0]
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(0, len(keep), micro):
        part = keep[i:i + micro]
        width = max(len(t.tokens) for t, _ in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        m = torch.zeros((len(part), width))
        for j, (t, _) in enumerate(part):
            ids[j, :len(t.tokens)] = torch.tensor(t.tokens)
            m[j, :len(t.mask)] = torch.tensor(t.mask, dtype=torch.float32)
        a = torch.tensor([x for _, x in part], dtype=torch.float32).unsqueeze(1)
        logits = model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        loss = -(a * logp * m[:, 1:]).sum() / max(1, denom)
        loss.backward()
        total += float(loss.detach())
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)) if keep else 0.0
    if keep:
        opt.step()
    return {"loss": total, "kept": len(keep), "grad_norm": gnorm}


def train_rl(roller: Roller, model, tok, train: list[dict], spec: RLSpec, seed: int, eval_fn, eval_every: int,
             log) -> list[dict]:
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, betas=(0.9, 0.99))
    order = list(range(len(train)))
    random.Random(f"rl/{seed}").shuffle(order)
    cursor, history, t0 = 0, [], time.time()
    for step in range(1, spec.steps + 1):
        ts, cs = time.time(), time.process_time()
        batch = []
        for _ in range(spec.prompts):
            batch.append(train[order[cursor % len(order)]])
            cursor += 1
        items = [it for it in batch for _ in range(spec.group)]
        model.eval()
        trajs = roller.run(items, spec.temperature, search=spec.search)
        tg = time.time() - ts
        model.train()
        adv = advantages([t.reward for t in trajs], spec.group, spec.std_norm)
        upd = grpo_update(model, opt, trajs, adv, tok.pad_token_id, spec.grad_clip)
        model.eval()
        rec = {"step": step, "reward": float(np.mean([t.reward for t in trajs])),
               "search_rate": float(np.mean([bool(t.queries) for t in trajs])),
               "right_search": float(np.mean([t.right_search for t in trajs])),
               "tokens": int(np.mean([len(t.tokens) for t in trajs])), "gen_s": round(tg, 2),
               "step_s": round(time.time() - ts, 2), "step_cpu_s": round(time.process_time() - cs, 2), "elapsed_s": round(time.time() - t0, 1), **upd}
        if step % eval_every == 0 or step == spec.steps:
            rec["eval"] = eval_fn()
            rec["eval"].pop("example", None)
        history.append(rec)
        log(rec)
    return history


# --------------------------------------------------------------------------- main
def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/toystudy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pretrain", default="{}", help="JSON overrides of demo.pretrain.PretrainSpec")
    p.add_argument("--rl", default="{}", help="JSON overrides of RLSpec")
    p.add_argument("--eval-n", type=int, default=300, help="held-out questions evaluated")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--tag", default="run")
    p.add_argument("--model", default=None, help="use this pretrained folder instead of pretraining")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from demo.pretrain import pretrain_base_model

    a = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    timings, logf = {}, (out / f"{a.tag}.jsonl")
    clock = {"t": time.time(), "c": time.process_time()}

    def lap(name):
        timings[name + "_s"] = round(time.time() - clock["t"], 1)
        timings[name + "_cpu_s"] = round(time.process_time() - clock["c"], 1)
        clock.update(t=time.time(), c=time.process_time())
    out.mkdir(parents=True, exist_ok=True)

    def log(rec):
        if "eval" in rec or "phase" in rec or rec.get("step", 0) % 10 == 0:
            print(json.dumps(rec), flush=True)
        with logf.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    paths = build_world(out / "world", seed=a.seed)
    lap("world")
    retrieval = Retrieval({"true": paths.corpus, "swapped": paths.corpus_swapped}, paths.dir, a.threads)
    lap("index")
    pt = json.loads(a.pretrain)
    pt_name = hashlib.sha1(json.dumps(pt, sort_keys=True).encode()).hexdigest()[:10]
    model_dir = Path(a.model) if a.model else pretrain_base_model(paths.dir, out / f"model-{pt_name}", seed=a.seed,
                                                                  threads=a.threads, **pt)
    lap("pretrain")
    rl = RLSpec(**json.loads(a.rl))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = Qwen2ForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32,
                                             attn_implementation="eager").eval()
    roller = Roller(model, tok, retrieval, topk=rl.topk, max_turns=rl.max_turns, max_new=rl.max_new)
    held = [json.loads(x) for x in paths.heldout.open()][:a.eval_n]
    held_sw = [json.loads(x) for x in paths.heldout_swapped.open()][:a.eval_n]
    train = [json.loads(x) for x in paths.train.open()]
    eval_fn = lambda: evaluate(roller, held, held_sw)  # noqa: E731
    lap("load")
    start = eval_fn()
    lap("eval")
    sampled = evaluate(roller, held[:100], held_sw[:100], temperature=1.0)
    log({"phase": "start", "greedy": start, "sampled": sampled,
         "pretrain": json.loads((model_dir / "pretrain.json").read_text())["curve"][-3:]
         if (model_dir / "pretrain.json").is_file() else None})
    lap("sampled_eval")
    hist = train_rl(roller, model, tok, train, rl, a.seed, eval_fn, a.eval_every, log)
    lap("rl")
    model.save_pretrained(str(out / f"rl-{a.tag}"))
    tok.save_pretrained(str(out / f"rl-{a.tag}"))
    summary = {"phase": "summary", "tag": a.tag, "rl": rl.__dict__, "pretrain": pt, "start": start,
               "end": hist[-1].get("eval") if hist else None, "timings": timings,
               "rl_step_s_mean": float(np.mean([h["step_s"] for h in hist])) if hist else 0.0}
    log(summary)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
