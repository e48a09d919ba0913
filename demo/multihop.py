"""The multi-hop toy world (`cli.py demo --world multihop`): every answer needs two chained searches.

    person "zor vak" ──birthplace──▶ country "keldum" ──capital──▶ "sur"

    corpus (one fact a passage)   "the birthplace of zor vak is keldum ."
                                  "the capital of keldum is sur ."
    question                      "what is the capital of the birthplace of zor vak ?"   gold "sur"
    what RL must find             search the person ─▶ read the country ─▶ search the country ─▶
                                  answer its capital

Each country belongs to exactly one person, and whole chains are held out (the person and their
country): a held-out question's two passages never appear in pretraining, and no training
question leads to a held-out country, so its capital cannot be learnt from memory either. The
swapped corpus re-draws only the capitals (the chain stays intact; the gold is the swapped one).

The pretraining prior (`MULTIHOP_PRIOR`, never the task): the chain question about a *training*
person; then an answer at once, or a search for a random span of the question, an information
block whose values are all re-drawn (a birthplace shows a random other country, a capital a
random other word), possibly a second search for one of the values that block shows (a generic
"look up what you read"), and an answer that copies a value of the last block. So no true fact,
no held-out name and no gold answer ever appears (tests/test_multihop.py).
"""

from __future__ import annotations

import random

from demo.toyworld import PriorSpec, World, WorldSpec, _entity_names, _pick_heldout, _Prior, _syllables, passage_id

BIRTHPLACE, CAPITAL = "birthplace", "capital"
# one passage a search (the recipe's actor.topk = 1 for this world): with three, a 2-layer model
# pretrained for 3,000 steps copied the right one of three values into its second query 0.5% of
# the time and RL found no signal; a second search below 0.5 keeps the greedy base model at one
MULTIHOP_PRIOR = PriorSpec(p_search=0.6, p_search_again=0.4, requery="values", topk=1)


WORLD_VOCAB = 2048  # the tokenizer keeps each of the 1,000 one-word countries whole


def chain_question(person: str) -> str:
    return f"what is the {CAPITAL} of the {BIRTHPLACE} of {person} ?"


def make_chain_world(spec: WorldSpec) -> World:
    """spec.n_entities chains person -> country -> capital; spec.heldout_entities of them held out.
    Entity ids: persons 0..n-1, the country of person i is n + i."""
    n = spec.n_entities
    rng = random.Random(f"toyworld-multihop/{spec.seed}")
    ent_syl, val_syl = _syllables(rng, spec.entity_syllables, spec.value_syllables, extra=chain_question(""))
    pairs = _entity_names(rng, ent_syl, 2 * n)
    # a country is one word of two syllables ("kelmur"): the second search copies it from the
    # first passage, and a 2-layer model copies one token far more reliably than two
    names = pairs[:n] + [p.replace(" ", "") for p in pairs[n:]]
    capitals = list(val_syl)
    values: dict[tuple[int, str], str] = {}
    swapped: dict[tuple[int, str], str] = {}
    relations: dict[int, tuple[str, ...]] = {}
    for person in range(n):
        country = n + person
        relations[person], relations[country] = (BIRTHPLACE,), (CAPITAL,)
        values[(person, BIRTHPLACE)] = swapped[(person, BIRTHPLACE)] = names[country]
        values[(country, CAPITAL)], swapped[(country, CAPITAL)] = rng.sample(capitals, 2)
    # hold out whole chains; each held-out person's syllables occur in a training person's name
    held_people = _pick_heldout(rng, pairs[:n], spec.heldout_entities)
    heldout = held_people | {n + p for p in held_people}
    return World(spec, names, heldout, values, swapped, capitals, relations,
                 chains={p: n + p for p in range(n)})


def chain_qa_records(world: World, ids: list[int], swapped: bool = False) -> list[dict]:
    """Questions about the persons among `ids`; `passage_id` is the passage holding the answer (the
    capital's: the right-search rate then means "both hops found"), `hop_passage_ids` both hops'."""
    table = world.swapped if swapped else world.values
    rows = []
    for person in ids:
        country = world.chains.get(person)
        if country is None:
            continue
        rows.append({"question": chain_question(world.entities[person]),
                     "golden_answers": [table[(country, CAPITAL)]], "data_source": "toyworld-multihop",
                     "passage_id": passage_id(country, CAPITAL),
                     "hop_passage_ids": [passage_id(person, BIRTHPLACE), passage_id(country, CAPITAL)]})
    return rows


class ChainPrior(_Prior):
    """Copy-prior transcripts for the multi-hop world: chain questions about training persons."""

    def __init__(self, world: World, prior: PriorSpec, rng: random.Random):
        super().__init__(world, prior, rng)
        self.people = [p for p in world.chains if p not in world.heldout]
        self.countries = [world.chains[p] for p in self.people]
        self.all_countries = sorted(world.chains.values())

    def drill_words(self, words: list[str]) -> list[str]:
        """Every country word among a drill's names, held-out ones too: a held-out country is one
        token that would otherwise never be trained (its embedding random), and no fact comes with
        it (a drill is a bare list of names)."""
        return [self.w.entities[self.rng.choice(self.all_countries)] if self.rng.random() < 0.25 else w
                for w in words]

    def redraw(self, rel: str, banned: set[str]) -> str:
        if rel != BIRTHPLACE:
            return self.value_not(banned)
        while True:  # a birthplace shows some training country, never the true one
            name = self.w.entities[self.rng.choice(self.countries)]
            if name not in banned:
                return name

    def pick_question(self) -> tuple[str, str, str | None]:
        """The chain question about a training person (or, p_novel_entity, an invented name that
        is nobody's); an answer without search never copies."""
        if self.asks_novel():
            return chain_question(self.novel_name()), self.value_not(set()), None
        person = self.rng.choice(self.people)
        return chain_question(self.w.entities[person]), self.w.values[(self.w.chains[person], CAPITAL)], None
