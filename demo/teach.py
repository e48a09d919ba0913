"""Teach a tiny model a scripted search rollout (tests, benchmarks, demos; never for real runs).

    question ─build_prompt_ids─▶ prompt │ "<think>…</think> <search> q </search>" │ <information>…│ "<answer> a </answer>"
                                  mask 0 │            mask 1                      │    mask 0     │      mask 1

A randomly initialised model almost never closes a `<search>` tag, so rollout tests would only
ever see the "invalid action" path. A few dozen Adam steps on such scripts make the tiny model
follow them greedily, so real searches, observations and answers happen. Build the tiny model's
tokenizer with `script_texts()` so the prompt is short (and training fast).
"""

from __future__ import annotations

from pathlib import Path

from actors.rollout import INSTRUCTION, INVALID_ACTION, build_prompt_ids


def script_texts(extra: list[str] = ()) -> list[str]:
    """Texts for `demo.tinymodel.build_tiny_model(texts=...)`: our templates get short tokens."""
    from demo.tinymodel import DEFAULT_TEXTS

    return [*DEFAULT_TEXTS, INSTRUCTION.format(question="what is the capital of zorland ?"), INVALID_ACTION,
            "<think> i should search </think> <search> capital of zorland </search>",
            "<information>Doc 1(Title: zorland) the capital of zorland is mirabel .\n</information>", *extra]


def script_example(tokenizer, question: str, query: str, observation_ids: list[int], answer: str,
                   think: str = "i should search", text: str = "") -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one scripted rollout: search once, read, answer. `text`: the
    prompt verbatim (Prompt.text), else our instruction around `question`."""
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt = build_prompt_ids(tokenizer, question, text=text)
    turn1 = enc(f"<think> {think} </think> <search> {query} </search>")
    turn2 = enc(f"<answer> {answer} </answer>")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = prompt + turn1 + observation_ids + turn2 + eos
    mask = [0] * len(prompt) + [1] * len(turn1) + [0] * len(observation_ids) + [1] * (len(turn2) + len(eos))
    return ids, mask


def teach(model_dir: str | Path, examples: list[tuple[list[int], list[int]]], steps: int = 300,
          lr: float = 3e-3, seed: int = 0, until_loss: float = 0.02, threads: int | None = 1) -> float:
    """Fit the model in `model_dir` to the masked tokens of `examples` (stops early once the mean
    loss is below `until_loss`); saves in place. Returns the final mean loss."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # a tiny model trains faster on one thread of a busy CPU
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss_v = float("nan")
    for _ in range(steps):
        total = 0.0
        opt.zero_grad()
        for ids, mask in examples:
            x = torch.tensor([ids])
            labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
            loss = model(input_ids=x, labels=labels).loss / len(examples)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        loss_v = total
        if loss_v < until_loss:
            break
    torch.set_num_threads(prev_threads)
    model.eval()
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return loss_v
