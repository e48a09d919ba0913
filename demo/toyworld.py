"""Deterministic toy world for the embedded demo: invented entities, one fact per passage.

    WorldSpec(seed) ──make_world──▶ World: entities (two invented syllables, "zor vak"),
         │                          relations (capital, founder, river), one invented value
         │                          per (entity, relation); entities split train / held-out
         ├─▶ corpus.jsonl           "the capital of zor vak is mel ba ." one fact per passage
         ├─▶ corpus_swapped.jsonl   same passages, every value replaced by another one
         ├─▶ train.jsonl            questions on train entities (Search-R1 QA format)
         ├─▶ heldout.jsonl          questions on held-out entities
         ├─▶ heldout_swapped.jsonl  held-out questions, gold = the swapped corpus value
         └─▶ world.json             the spec and a digest (the cache key)

    World ──pretraining_transcripts──▶ copy-prior transcripts for base-model pretraining:
         question → <think> → either <search> random span of the question </search> + an
         <information> block of training-entity passages whose values are all re-drawn at
         random → <answer> a random name of that block </answer>, or <answer> a random name
         </answer> without searching. No true fact and no held-out entity ever appears in them,
         and no answer is ever the gold value (checked by tests/test_toyworld.py).

The prompt and observation formats here are the ones the actors must use for the demo model:
`make_prompt(question)` and `format_information(docs)` (Search-R1's `Doc i(Title: T) text`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPT_TEMPLATE = "question: {question}\n"
DATA_SOURCE = "toyworld"
RELATIONS = ("capital", "founder", "river")
# all three words long: the distance from a query back to the question stays the same
THINK_PHRASES = ("let me think", "i am unsure", "let me see", "what is it")
WORLD_FORMAT = 1

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()
_CODAS = "k l m n r s x".split()
# syllables that are English words or tag-like pieces would blur the encoder / template
_BANNED = {"bus", "gas", "gun", "his", "kin", "man", "men", "nun", "pal", "pen", "pun", "run", "sin",
           "sun", "ten", "tin", "van", "ban", "bin", "bun", "den", "din", "fan", "fin", "fun", "gum",
           "him", "kim", "lil", "mal", "mil", "mom", "mum", "nil", "pin", "ram", "rim", "rum", "sam",
           "sir", "sis", "tim", "tom", "ton", "tux", "fix", "fox", "lax", "lex", "max", "mix", "box",
           "sex", "six", "tax", "vex", "wax", "kos", "dos", "bos", "los", "mas", "nos", "pas", "ras",
           "tas", "vas", "gus", "bal", "del", "dal", "gel", "sol", "pol", "tel", "vol", "bel", "mel",
           "nel", "sal", "val", "vel", "don", "dan", "son", "ron", "lon", "lin", "lan", "ren", "zen"}


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 0
    n_entities: int = 1000
    heldout_entities: int = 200
    relations_per_entity: int = 1  # facts per entity (passages are one fact each)
    entity_syllables: int = 150  # inventory sizes (names are two syllables: "zor vak"); a large
    value_syllables: int = 200  # entity inventory keeps names apart for the dense encoder
    value_words: int = 1  # 1: a value is one invented word ("sur"); 2: two ("sur fil")
    hops: int = 1  # 2: the multi-hop world of demo/multihop.py (n_entities chains person -> country)

    def digest(self) -> str:
        fields = asdict(self)
        if fields["hops"] == 1:  # added later: single-hop worlds keep the digest (and caches) they had
            del fields["hops"]
        blob = json.dumps({"format": WORLD_FORMAT, **fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class World:
    spec: WorldSpec
    entities: list[str]  # index = entity id
    heldout: set[int]  # entity ids held out (never in pretraining, never trained on)
    values: dict[tuple[int, str], str]  # (entity id, relation) -> value
    swapped: dict[tuple[int, str], str]  # (entity id, relation) -> a different value
    value_names: list[str] = field(default_factory=list)  # the value inventory
    relations: dict[int, tuple[str, ...]] = field(default_factory=dict)  # entity id -> its relations
    chains: dict[int, int] = field(default_factory=dict)  # multi-hop: person id -> its country's id

    @property
    def train_ids(self) -> list[int]:
        return [i for i in range(len(self.entities)) if i not in self.heldout]

    @property
    def heldout_ids(self) -> list[int]:
        return sorted(self.heldout)


# --------------------------------------------------------------------------- text formats
def question_text(entity: str, relation: str) -> str:
    return f"what is the {relation} of {entity} ?"


def passage_text(entity: str, relation: str, value: str) -> str:
    return f"the {relation} of {entity} is {value} ."


def make_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def format_information(docs: list[tuple[str, str]]) -> str:
    """Search-R1 observation for (title, text) passages, best first."""
    body = "\n".join(f"Doc {i + 1}(Title: {t}) {x}" for i, (t, x) in enumerate(docs))
    return f"\n\n<information>{body.strip()}</information>\n\n"


def passage_id(eid: int, relation: str) -> str:
    return f"e{eid}-{relation}"


# --------------------------------------------------------------------------- the world
def _syllables(rng: random.Random, n_entity: int, n_value: int, extra: str = "") -> tuple[list[str], list[str]]:
    pool = sorted({o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS} - _BANNED)
    # nor pieces of the template's words ("ver" in "river"): answers must stand apart as words
    template = " ".join([question_text("", ""), passage_text("", "", ""), *RELATIONS, *THINK_PHRASES, "question",
                         extra])
    pool = [s for s in pool if s not in template]
    rng.shuffle(pool)
    if n_entity + n_value > len(pool):
        raise ValueError(f"only {len(pool)} syllables available, asked for {n_entity + n_value}")
    return pool[:n_entity], pool[n_entity:n_entity + n_value]


def _pick_heldout(rng: random.Random, entities: list[str], k: int) -> set[int]:
    """k held-out entities, each of whose syllables also occurs in some training entity (so
    pretraining has seen every token a held-out name is made of)."""
    order = list(range(len(entities)))
    rng.shuffle(order)
    count: dict[str, int] = {}
    for name in entities:
        for s in set(name.split()):
            count[s] = count.get(s, 0) + 1
    held: set[int] = set()
    for eid in order:
        syl = set(entities[eid].split())
        if all(count[s] > 1 for s in syl):
            held.add(eid)
            for s in syl:
                count[s] -= 1
            if len(held) == k:
                return held
    raise ValueError(f"cannot hold out {k} entities and keep every syllable in training")


def make_world(spec: WorldSpec) -> World:
    """The world of `spec`, identical on every machine for the same spec."""
    if not 0 < spec.heldout_entities < spec.n_entities:
        raise ValueError("heldout_entities must be between 1 and n_entities - 1")
    if spec.hops == 2:
        from demo.multihop import make_chain_world

        return make_chain_world(spec)
    if spec.hops != 1:
        raise ValueError(f"hops must be 1 or 2, not {spec.hops}")
    rng = random.Random(f"toyworld/{spec.seed}")
    ent_syl, val_syl = _syllables(rng, spec.entity_syllables, spec.value_syllables)
    if not 1 <= spec.relations_per_entity <= len(RELATIONS):
        raise ValueError(f"relations_per_entity must be 1..{len(RELATIONS)}")
    entities = _entity_names(rng, ent_syl, spec.n_entities)
    if spec.value_words == 1:
        value_names = list(val_syl)
    elif spec.value_words == 2:
        value_names = [f"{a} {b}" for a in val_syl for b in val_syl if a != b]
    else:
        raise ValueError("value_words must be 1 or 2")
    values: dict[tuple[int, str], str] = {}
    swapped: dict[tuple[int, str], str] = {}
    relations: dict[int, tuple[str, ...]] = {}
    for eid in range(spec.n_entities):
        relations[eid] = tuple(rng.sample(RELATIONS, spec.relations_per_entity))
        vals = rng.sample(value_names, 2 * len(relations[eid]))  # distinct true and swapped values
        for k, rel in enumerate(relations[eid]):
            values[(eid, rel)] = vals[k]
            swapped[(eid, rel)] = vals[len(relations[eid]) + k]
    heldout = _pick_heldout(rng, entities, spec.heldout_entities)
    return World(spec, entities, heldout, values, swapped, value_names, relations)


def _entity_names(rng: random.Random, syllables: list[str], n: int) -> list[str]:
    """n two-syllable names; never both "a b" and "b a" (the dense encoder mixes them up)."""
    pairs = [(a, b) for a in syllables for b in syllables if a != b]
    rng.shuffle(pairs)
    chosen: list[str] = []
    taken: set[tuple[str, str]] = set()
    for a, b in pairs:
        if (b, a) not in taken:
            taken.add((a, b))
            chosen.append(f"{a} {b}")
            if len(chosen) == n:
                return chosen
    raise ValueError(f"{len(syllables)} syllables give only {len(chosen)} entity names")


def corpus_records(world: World, swapped: bool = False) -> list[dict]:
    table = world.swapped if swapped else world.values
    out = []
    for eid, name in enumerate(world.entities):
        for rel in world.relations[eid]:
            text = passage_text(name, rel, table[(eid, rel)])
            out.append({"id": passage_id(eid, rel), "contents": f'"{name}"\n{text}'})
    return out


def qa_records(world: World, ids: list[int], swapped: bool = False) -> list[dict]:
    if world.chains:
        from demo.multihop import chain_qa_records

        return chain_qa_records(world, ids, swapped)
    table = world.swapped if swapped else world.values
    return [{"question": question_text(world.entities[eid], rel), "golden_answers": [table[(eid, rel)]],
             "data_source": DATA_SOURCE, "passage_id": passage_id(eid, rel)}
            for eid in ids for rel in world.relations[eid]]


@dataclass(frozen=True)
class WorldPaths:
    dir: Path
    corpus: Path
    train: Path
    heldout: Path
    corpus_swapped: Path
    heldout_swapped: Path
    meta: Path

    @classmethod
    def under(cls, d: Path) -> "WorldPaths":
        return cls(d, d / "corpus.jsonl", d / "train.jsonl", d / "heldout.jsonl", d / "corpus_swapped.jsonl",
                   d / "heldout_swapped.jsonl", d / "world.json")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def build_world(out_dir: str | Path, seed: int = 0, **spec_kw) -> WorldPaths:
    """Write the world's files under `out_dir` (skipped when world.json already records the
    same spec); returns their paths."""
    spec = WorldSpec(seed=seed, **spec_kw)
    paths = WorldPaths.under(Path(out_dir))
    if paths.meta.is_file():
        try:
            meta = json.loads(paths.meta.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        files = (paths.corpus, paths.train, paths.heldout, paths.corpus_swapped, paths.heldout_swapped)
        if meta.get("digest") == spec.digest() and all(p.is_file() for p in files):
            return paths
    paths.dir.mkdir(parents=True, exist_ok=True)
    world = make_world(spec)
    _write_jsonl(paths.corpus, corpus_records(world))
    _write_jsonl(paths.corpus_swapped, corpus_records(world, swapped=True))
    _write_jsonl(paths.train, qa_records(world, world.train_ids))
    _write_jsonl(paths.heldout, qa_records(world, world.heldout_ids))
    _write_jsonl(paths.heldout_swapped, qa_records(world, world.heldout_ids, swapped=True))
    meta = {"digest": spec.digest(), "spec": asdict(spec), "format": WORLD_FORMAT,
            "passages": len(world.values), "relations": list(RELATIONS),
            "prompt_template": PROMPT_TEMPLATE}
    tmp = paths.meta.with_name("world.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(paths.meta)
    return paths


def load_world(world_dir: str | Path) -> World:
    """Rebuild the World recorded in `world_dir/world.json`."""
    meta = json.loads((Path(world_dir) / "world.json").read_text())
    return make_world(WorldSpec(**meta["spec"]))


# --------------------------------------------------------------------------- pretraining prior
@dataclass(frozen=True)
class PriorSpec:
    """Shape of the copy prior taught in pretraining (never the task)."""

    p_search: float = 0.45  # first action is a search; otherwise an answer at once
    p_search_again: float = 0.0  # after an information block, search once more (then answer)
    topk: int = 3  # passages per information block (as the actors will retrieve)
    answer_from: str = "values"  # after a search: a random "values" (value-like names) or any "names"
    p_copy_entity: float = 0.0  # an answer without search copies the question's entity (else a random value)
    p_drill: float = 0.5  # share of generic copy drills: a list of random names, then a span of it again
    drill_names: int = 6  # names per drill list
    requery: str = "question"  # a search after an information block: a span of the "question", or
    #                            one of the "values" that block shows (the multi-hop world's prior)
    # share of questions about an invented name that is nobody's: its search must copy both
    # syllables from the question, where a training name's second syllable can be recalled
    # (without them, base models of some seeds copied held-out names' second syllable 9% of the time)
    p_novel_entity: float = 0.3

    def key_fields(self) -> dict:
        """The fields for a cache key: those added later (`requery`, `p_novel_entity`) only when
        set, so base models pretrained before them keep the keys they had."""
        fields = asdict(self)
        for name, before in (("requery", "question"), ("p_novel_entity", 0.0)):
            if fields[name] == before:
                del fields[name]
        return fields


@dataclass
class Transcript:
    """One pretraining sequence as the rollout would build it: `segments` alternate between
    text the policy generates (`True`) and text the environment adds (`False`)."""

    segments: list[tuple[str, bool]]
    question: str = ""
    gold: str = ""
    answer: str = ""
    searched: bool = False
    kind: str = "transcript"  # or "drill"

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


class _Prior:
    """Samples transcripts about training entities only, with re-drawn values everywhere."""

    def __init__(self, world: World, prior: PriorSpec, rng: random.Random):
        self.w, self.p, self.rng = world, prior, rng
        self.train = world.train_ids
        self.by_name = {world.entities[i]: i for i in self.train}
        self.held_names = {world.entities[i] for i in world.heldout}
        self.rel_names = RELATIONS + tuple(sorted({r for i in self.train for r in world.relations[i]} - set(RELATIONS)))
        self.by_rel = {r: [i for i in self.train if r in world.relations[i]] for r in self.rel_names}
        self.by_syl: dict[str, list[int]] = {}
        for i in self.train:
            for s in world.entities[i].split():
                self.by_syl.setdefault(s, []).append(i)
        self.syllables = sorted({s for i in self.train for s in world.entities[i].split()
                                 if len(world.entities[i].split()) == 2})  # a person's, not a country's
        self.names_taken = {n for e in world.entities for n in (e, " ".join(reversed(e.split())))}

    def asks_novel(self) -> bool:
        """Whether this question is about an invented name (p_novel_entity); draws nothing when
        the share is 0, so priors without invented names sample exactly as before."""
        return bool(self.p.p_novel_entity) and self.rng.random() < self.p.p_novel_entity

    def novel_name(self) -> str:
        """Two syllables of training names that spell no entity of the world (held-out ones
        included), in either order: a name the model can only copy, never recall."""
        while True:
            name = " ".join(self.rng.sample(self.syllables, 2))
            if name not in self.names_taken:
                return name

    def value_not(self, banned: set[str]) -> str:
        while True:
            v = self.rng.choice(self.w.value_names)
            if v not in banned:
                return v

    def redraw(self, rel: str, banned: set[str]) -> str:
        """A value for a shown passage of relation `rel`, never one in `banned` (a hook: the
        multi-hop prior draws countries for birthplaces)."""
        return self.value_not(banned)

    def span(self, words: list[str]) -> list[str]:
        spans = [(a, b) for a in range(len(words)) for b in range(a + 1, len(words) + 1)]
        a, b = self.rng.choice(spans)
        return words[a:b]

    def retrieve(self, span: list[str]) -> list[tuple[int, str]]:
        """Imitates what the dense retriever returns for `span` (lexically): the named entity's
        passages (asked relation first), else passages sharing a syllable or the relation."""
        k, rng, rel_of = self.p.topk, self.rng, self.w.relations
        rels = [r for r in self.rel_names if r in span]
        named = [self.by_name[b] for b in (" ".join(span[j:j + 2]) for j in range(len(span) - 1))
                 if b in self.by_name]
        out: list[tuple[int, str]] = []
        if named:
            own = rel_of[named[0]]
            out = [(named[0], r) for r in sorted(own, key=lambda r: (r not in rels, rng.random()))]
        near = [i for s in span for i in self.by_syl.get(s, []) if i not in named]
        for i in rng.sample(near, min(k, len(near))):
            out.append((i, rng.choice(rel_of[i])))
        pool = self.by_rel[rels[0]] if rels else self.train
        while len(out) < k:
            i = rng.choice(pool)
            out.append((i, rels[0] if rels and rels[0] in rel_of[i] else rng.choice(rel_of[i])))
        return out[:k]

    def information(self, span: list[str], gold: str) -> tuple[str, list[str]]:
        """Observation text (values re-drawn, never a true one) and the answer candidates it holds."""
        docs, names = [], []
        for eid, rel in self.retrieve(span):
            name = self.w.entities[eid]
            value = self.redraw(rel, {gold, self.w.values[(eid, rel)]})
            docs.append((name, passage_text(name, rel, value)))
            names += [n for n in ((value,) if self.p.answer_from == "values" else (name, value)) if n not in names]
        return format_information(docs), names

    def drill(self) -> Transcript:
        """Generic copying: a list of random names (training entities, values), then the same
        list again. (A fixed length makes it a copy at a fixed distance, which a tiny model
        learns within a few hundred steps and then reuses for the transcripts' copy prior;
        drills of varying length or partial copies were not learned in the CPU budget.)"""
        rng, pool = self.rng, self.w.value_names
        while True:
            names = [self.w.entities[rng.choice(self.train)] if rng.random() < 0.5 else rng.choice(pool)
                     for _ in range(self.p.drill_names)]
            words = " ".join(names).split()
            if not any(f"{a} {b}" in self.held_names for a, b in zip(words, words[1:])):
                break  # two neighbouring names must not spell a held-out entity
        listed = " ".join(self.drill_words(words))
        return Transcript([(f" {listed} ; {listed} .", True)], kind="drill")

    def drill_words(self, words: list[str]) -> list[str]:
        """The words a drill lists (a hook: the multi-hop prior mixes in country words)."""
        return words

    def pick_question(self) -> tuple[str, str, str | None]:
        """(question, gold, the entity an answer without search may copy) about a training entity,
        or (p_novel_entity) about an invented name, with an invented gold."""
        if self.asks_novel():
            name, rel = self.novel_name(), self.rng.choice(self.rel_names)
            return question_text(name, rel), self.value_not(set()), name
        eid = self.rng.choice(self.train)
        rel = self.rng.choice(self.w.relations[eid])
        return question_text(self.w.entities[eid], rel), self.w.values[(eid, rel)], self.w.entities[eid]

    def sample(self) -> Transcript:
        if self.rng.random() < self.p.p_drill:
            return self.drill()
        rng = self.rng
        question, gold, entity = self.pick_question()
        segs: list[tuple[str, bool]] = [(make_prompt(question), False)]
        think = f"<think> {rng.choice(THINK_PHRASES)} </think>\n"
        if rng.random() >= self.p.p_search:
            copy = entity is not None and rng.random() < self.p.p_copy_entity
            answer = entity if copy else self.value_not({gold})
            segs.append((f"{think}<answer> {answer} </answer>", True))
            return Transcript(segs, question, gold, answer, False)
        words = question.split()
        names: list[str] = []
        for turn in range(2):  # a follow-up search copies a span of the question, or a value it read
            span = self.span(words) if turn == 0 or self.p.requery == "question" else rng.choice(names).split()
            segs.append(((think if turn == 0 else "") + f"<search> {' '.join(span)} </search>", True))
            obs, names = self.information(span, gold)
            segs.append((obs, False))
            if rng.random() >= self.p.p_search_again:
                break
        answer = rng.choice(names)
        segs.append((f"<answer> {answer} </answer>", True))
        return Transcript(segs, question, gold, answer, True)


def pretraining_transcripts(world: World, n: int, seed: int = 0, prior: PriorSpec = PriorSpec()) -> list[Transcript]:
    """n pretraining sequences, copy-prior transcripts and copy drills (deterministic for
    (world, seed, prior))."""
    rng = random.Random(f"prior/{world.spec.digest()}/{seed}")
    if world.chains:
        from demo.multihop import ChainPrior

        sampler: _Prior = ChainPrior(world, prior, rng)
    else:
        sampler = _Prior(world, prior, rng)
    return [sampler.sample() for _ in range(n)]


def world_words(world: World) -> list[str]:
    """Every word the world and its templates use (the tokenizer must keep each whole)."""
    words = set(" ".join(world.entities + world.value_names).split())
    words |= set(question_text("x", "y").split()) | set(passage_text("x", "y", "z").split()) | set(RELATIONS)
    words |= set(" ".join(THINK_PHRASES).split()) | set(PROMPT_TEMPLATE.format(question="").replace(":", " ").split())
    if world.chains:
        from demo.multihop import chain_question

        words |= set(chain_question("x y").split()) | {r for rs in world.relations.values() for r in rs}
    return sorted(words - {"x", "y", "z"})
