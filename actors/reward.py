"""Outcome reward for a rollout: the last `<answer>` against the gold answers.

    response text ──extract_answer──▶ last <answer> … </answer>
        └──normalize_answer (lowercase, drop punctuation, drop a/an/the, collapse spaces)
              ├─ "em"        1 if equal to any normalised gold answer
              ├─ "f1"        best token-level F1 over the gold answers
              └─ "substring" 1 if any normalised gold answer occurs inside the prediction
    optional format term:  reward = (1 - w) * score + w * format_ok(text)      (w = actor.format_reward)

With w = 0 (the default, as in Search-R1) the reward is the plain score. `correct` is always the
exact-match verdict, whatever score is selected, so that metrics stay comparable across runs.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_DROP_PUNCT = str.maketrans("", "", string.punctuation)
_TAG_RE = re.compile(r"<(/?)(think|search|answer)>")

KINDS = ("em", "f1", "substring")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, strip punctuation and articles, collapse spaces."""
    return " ".join(_ARTICLES_RE.sub(" ", text.lower().translate(_DROP_PUNCT)).split())


def extract_answer(text: str) -> str | None:
    """Content of the last complete <answer> … </answer> block, or None."""
    matches = _ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def exact_match(prediction: str, golds: list[str]) -> float:
    return float(normalize_answer(prediction) in [normalize_answer(g) for g in golds])


def _substring(pred: str, golds_n: list[str]) -> float:
    return float(any(g and g in pred for g in golds_n))


def substring_match(prediction: str, golds: list[str]) -> float:
    return _substring(normalize_answer(prediction), [normalize_answer(g) for g in golds])


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if pred_tokens == gold_tokens:  # the common case once a policy answers right
        return 1.0 if pred_tokens else 0.0
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_f1(pred: str, golds_n: list[str]) -> float:
    tokens = pred.split()
    return max((_f1(tokens, g.split()) for g in golds_n), default=0.0)


def f1_score(prediction: str, golds: list[str]) -> float:
    return _best_f1(normalize_answer(prediction), [normalize_answer(g) for g in golds])


def format_ok(text: str) -> bool:
    """Well-formed response: tags never nested or left open, and it ends with one answer."""
    stripped = text.strip()
    if not stripped.endswith("</answer>"):
        return False
    open_tag: str | None = None
    for m in _TAG_RE.finditer(stripped):
        closing, name = m.group(1) == "/", m.group(2)
        if not closing:
            if open_tag is not None:
                return False
            open_tag = name
        else:
            if open_tag != name:
                return False
            open_tag = None
    return open_tag is None and len(_ANSWER_RE.findall(stripped)) == 1


@dataclass
class RewardResult:
    reward: float
    correct: bool  # exact match, whatever score kind is selected
    answer: str | None
    em: float
    f1: float
    format_ok: bool


def compute_reward(response: str, golds: list[str], kind: str = "em", format_weight: float = 0.0) -> RewardResult:
    """Score one response (the model-generated text only, observations excluded)."""
    if kind not in KINDS:
        raise ValueError(f"reward kind {kind!r}: expected one of {KINDS}")
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight {format_weight} outside [0, 1]")
    answer = extract_answer(response)
    fmt = format_ok(response)
    if answer is None or not golds:
        em = f1 = score = 0.0
    else:
        pred, golds_n = normalize_answer(answer), [normalize_answer(g) for g in golds]
        em, f1 = float(pred in golds_n), _best_f1(pred, golds_n)
        score = em if kind == "em" else f1 if kind == "f1" else _substring(pred, golds_n)
    reward = (1.0 - format_weight) * score + format_weight * float(fmt)
    return RewardResult(reward=reward, correct=em == 1.0, answer=answer, em=em, f1=f1, format_ok=fmt)
