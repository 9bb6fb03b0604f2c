"""Write examples/data/pets.txt: a small generated English-like corpus for the text examples.

Each document (separated by a blank line) introduces a few people with their pets and
then refers back to them, so predicting a later sentence needs what was said 50-300
characters earlier: a character model gains from longer backprop windows, and plain SGD
on it produces the occasional large gradient that clipping is for. Deterministic:

    .venv/bin/python examples/make_corpus.py          # ~290 KB, 1000 documents
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
ANIMALS = ["cat", "dog", "fox", "owl", "hen", "goat", "duck", "frog"]
COLORS = ["red", "blue", "green", "black", "white", "grey", "brown", "pink"]
PETS = ["tom", "rex", "max", "luna", "milo", "nala", "otto", "pip", "kiki", "zed"]
VERBS = ["feeds", "walks", "brushes", "finds", "calls", "hugs"]
PLACES = ["park", "garden", "barn", "river", "market", "house"]


def document(rng: random.Random) -> str:
    people = rng.sample(NAMES, rng.randint(2, 3))
    pets = rng.sample(PETS, len(people))  # unique within a document: a name identifies a pet
    facts = {p: (rng.choice(COLORS), rng.choice(ANIMALS), pet) for p, pet in zip(people, pets)}
    lines = []
    for p in people:
        color, animal, pet = facts[p]
        lines.append(f"{p} has a {color} {animal} named {pet} .")
    for _ in range(rng.randint(3, 6)):
        p = rng.choice(people)
        color, animal, pet = facts[p]
        form = rng.randrange(4)
        if form == 0:
            lines.append(f"in the {rng.choice(PLACES)} {p} {rng.choice(VERBS)} {pet} , the {color} {animal} .")
        elif form == 1:
            lines.append(f"{pet} is the {animal} of {p} and it is {color} .")
        elif form == 2:
            lines.append(f"( {p} says : my {animal} {pet} is {color} )")
        else:
            q = rng.choice([x for x in people if x != p])
            lines.append(f"{q} asks {p} about {pet} ; {p} says the {animal} is well .")
    return "\n".join(lines)


def main(path: str = str(Path(__file__).parent / "data" / "pets.txt"), documents: int = 1000, seed: int = 0) -> None:
    rng = random.Random(seed)
    text = "\n\n".join(document(rng) for _ in range(documents)) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(f"{path}: {len(text)} characters, {documents} documents")


if __name__ == "__main__":
    main(*sys.argv[1:2])
