"""A seeded synthetic world that the built-in tiny model learns: creatures with a colour, a home and a food.

Homes follow the creature's name ending and foods mostly follow the home (patterns a model can
generalise), colours are arbitrary (pure memorisation). So the tasks range from robust to fragile,
and pruning visibly moves accuracy. Rounding the weights to 4 bits does not (benchmarks/tiny_precision.py):
the tiny model has no accuracy/memory trade-off for the search to find.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS = ["red", "blue", "green", "yellow"]
HOMES = ["forest", "river", "desert", "mountain"]
FOODS = ["leaves", "fish", "seeds", "insects"]
ENDINGS = {"forest": "a", "river": "o", "desert": "i", "mountain": "u"}  # name ending -> usual home
CONSONANTS = "bdfgklmnprstvz"
N_CREATURES = 160
N_TEST = 110  # creatures asked about in the test split; the rest form the validation split

QUESTIONS = {
    "colour": ("Question: what colour is the {name}?\nAnswer:", COLOURS),
    "home": ("Question: where does the {name} live?\nAnswer:", HOMES),
    "food": ("Question: what does the {name} eat?\nAnswer:", FOODS),
}
STATEMENTS = {
    "colour": ["the {name} is {value} .", "a {name} has {value} skin .", "look , the {value} {name} !"],
    "home": ["the {name} lives in the {value} .", "you find the {name} in the {value} ."],
    "food": ["the {name} eats {value} .", "every day the {name} looks for {value} ."],
}


@dataclass(frozen=True)
class Creature:
    name: str
    colour: str
    home: str
    food: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def make_world(seed: int = 0) -> list[Creature]:
    """Deterministic creatures with unique names; 90% follow the home rule, 80% the food rule."""
    rng = random.Random(seed)
    creatures, names = [], set()
    while len(creatures) < N_CREATURES:
        home = rng.choice(HOMES) if rng.random() < 0.1 else None
        usual = rng.choice(HOMES)
        stem = "".join(rng.choice(CONSONANTS) + rng.choice("aeiou") for _ in range(2)) + rng.choice(CONSONANTS)
        name = stem + ENDINGS[usual]
        if name in names:
            continue
        names.add(name)
        home = home or usual
        food = FOODS[HOMES.index(home)] if rng.random() < 0.8 else rng.choice(FOODS)
        creatures.append(Creature(name, rng.choice(COLOURS), home, food))
    return creatures


def statement(c: Creature, attribute: str, rng: random.Random) -> str:
    return rng.choice(STATEMENTS[attribute]).format(name=c.name, value=c.value(attribute))


def qa_text(c: Creature, attribute: str) -> str:
    prompt, _ = QUESTIONS[attribute]
    return prompt.format(name=c.name) + " " + c.value(attribute)


def corpus(creatures: list[Creature], n_docs: int, seed: int = 1) -> list[str]:
    """Pretraining documents: a few facts about one or two creatures, as statements and Q/A lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for c in rng.sample(creatures, rng.choice([1, 2])):
            for attribute in rng.sample(list(QUESTIONS), rng.choice([2, 3])):
                parts.append(qa_text(c, attribute) if rng.random() < 0.4 else statement(c, attribute, rng))
        docs.append(" ".join(p.replace("\n", " ") for p in parts))
    return docs


def task_docs(creatures: list[Creature], attribute: str) -> list[dict]:
    """lm-eval multiple-choice docs: {"name", "choices", "label"}."""
    _, options = QUESTIONS[attribute]
    return [{"name": c.name, "choices": options, "label": options.index(c.value(attribute))} for c in creatures]


def alpaca_records(creatures: list[Creature], seed: int = 2) -> list[dict]:
    """Instruction data about the same world, phrased unlike the evaluation prompts."""
    rng = random.Random(seed)
    records = []
    for c in creatures:
        records.append({
            "instruction": f"Describe the {c.name}.",
            "input": "",
            "output": f"The {c.name} is {c.colour}, lives in the {c.home} and eats {c.food}.",
        })
        attribute = rng.choice(list(QUESTIONS))
        records.append({
            "instruction": "Complete the fact about this creature.",
            "input": c.name,
            "output": statement(c, attribute, rng),
        })
        records.append({
            "instruction": f"Which {'colour' if attribute == 'colour' else attribute} belongs to the {c.name}?",
            "input": "",
            "output": c.value(attribute),
        })
    rng.shuffle(records)
    return records
