"""How well a demo base model copies a name from the question into its search, before any RL.

    python bench/copy_probe.py BASE_MODEL_DIR WORLD_DIR [--limit 200] [--json]

For each held-out entity (and as many training entities) the probe feeds the prompt, a think
block and `<search> the <relation> of` (the multi-hop world: `birthplace`), and reads:

    P(syllable 1)          the name's first syllable comes next
    P(syllable 2 | 1)      given the first, the second one comes next
    greedy syllable 2      the second syllable is the model's top token after the first

A training name's second syllable can be recalled from pretraining; a held-out name's only
copied from the question. The gap between the two rows is what RL's held-out right-search rate
has to overcome (docs/DEMO_DESIGN.md, "Copying unfamiliar names"). It also prints the answer
copy that pretraining's copy check uses (demo.pretrain.answer_copy: at the answer of the prior's
own transcripts, the probability on the values of the last information block).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def probe(model, tok, world, ids: list[int]) -> dict:
    import torch

    from demo.toyworld import make_prompt, question_text

    p1 = p2 = right = 0.0
    for eid in ids:
        name = world.entities[eid]
        first, second = name.split()
        if world.chains:
            from demo.multihop import BIRTHPLACE, chain_question

            question, rel = chain_question(name), BIRTHPLACE
        else:
            rel = world.relations[eid][0]
            question = question_text(name, rel)
        prefix = tok.encode(make_prompt(question) + f"<think> let me think </think>\n<search> the {rel} of",
                            add_special_tokens=False)
        t1, t2 = (tok.encode(" " + s, add_special_tokens=False)[0] for s in (first, second))
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([prefix + [t1]])).logits[0].log_softmax(-1)
        p1 += logp[-2, t1].exp().item()
        p2 += logp[-1, t2].exp().item()
        right += float(logp[-1].argmax().item() == t2)
    n = max(1, len(ids))
    return {"entities": len(ids), "p_syllable_1": round(p1 / n, 3), "p_syllable_2_given_1": round(p2 / n, 3),
            "greedy_syllable_2": round(right / n, 3)}


def main() -> int:
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from demo.pretrain import answer_copy, default_spec
    from demo.toyworld import load_world

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="a demo base model folder (demo.dir/base-model)")
    p.add_argument("world", type=Path, help="its world folder (demo.dir/world)")
    p.add_argument("--limit", type=int, default=200, help="entities per row")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args()
    for path, what in ((a.model / "config.json", "model"), (a.world / "world.json", "world")):
        if not path.is_file():
            p.error(f"{path.parent} is not a demo {what} folder (no {path.name})")
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(a.model))
    model = Qwen2ForCausalLM.from_pretrained(str(a.model), torch_dtype=torch.float32).eval()
    world = load_world(a.world)
    persons = set(world.chains) if world.chains else set(range(len(world.entities)))
    rows = {"heldout": probe(model, tok, world, [i for i in world.heldout_ids if i in persons][:a.limit]),
            "train": probe(model, tok, world, [i for i in world.train_ids if i in persons][:a.limit])}
    rows["answer_copy"] = round(answer_copy(model, tok, world, default_spec(world).prior), 3)
    if a.json:
        print(json.dumps(rows))
        return 0
    print("| names | P(syllable 1) | P(syllable 2 given 1) | greedy syllable 2 right |\n|---|---|---|---|")
    for name in ("heldout", "train"):
        r = rows[name]
        print(f"| {name} ({r['entities']}) | {r['p_syllable_1']:.3f} | {r['p_syllable_2_given_1']:.3f} "
              f"| {r['greedy_syllable_2']:.3f} |")
    print(f"\nanswer copy (the pretraining copy check's measure): {rows['answer_copy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
