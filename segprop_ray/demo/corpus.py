"""A small synthetic English-like corpus with learnable structure, generated from a seed.

Nothing can be downloaded here, so the demo and the tests make their own text: short stories
about animals with fixed traits (each animal always has the same colour, sound and home) and
counting sentences whose numbers add up. A tiny model can learn the associations, so the loss
visibly falls, yet the text is varied enough not to be memorised in a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ANIMALS = {
    "cow": ("brown", "moo", "barn"),
    "cat": ("black", "meow", "house"),
    "dog": ("white", "woof", "yard"),
    "duck": ("yellow", "quack", "pond"),
    "horse": ("grey", "neigh", "field"),
    "owl": ("spotted", "hoot", "tree"),
    "pig": ("pink", "oink", "pen"),
    "frog": ("green", "croak", "lake"),
}
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
FRUITS = ["apples", "pears", "plums", "figs", "lemons"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
VERBS = ["sees", "finds", "likes", "follows", "visits"]


def _animal_sentence(rng: random.Random) -> str:
    animal = rng.choice(list(ANIMALS))
    colour, sound, home = ANIMALS[animal]
    templates = [
        f"the {animal} is {colour} .",
        f"the {colour} {animal} says {sound} .",
        f"the {animal} lives in the {home} .",
        f"in the {home} the {animal} says {sound} .",
        f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {colour} {animal} .",
    ]
    return rng.choice(templates)


def _counting_sentence(rng: random.Random) -> str:
    name, fruit = rng.choice(NAMES), rng.choice(FRUITS)
    a = rng.randint(0, 5)
    b = rng.randint(0, 5)
    return f"{name} has {NUMBERS[a]} {fruit} and gets {NUMBERS[b]} more , so {name} has {NUMBERS[a + b]} {fruit} ."


def generate_document(rng: random.Random) -> str:
    """One document: 3 to 8 sentences."""
    sentences = [
        _counting_sentence(rng) if rng.random() < 0.3 else _animal_sentence(rng) for _ in range(rng.randint(3, 8))
    ]
    return " ".join(sentences)


def generate_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """``num_docs`` documents, the same for the same seed."""
    rng = random.Random(seed)
    return [generate_document(rng) for _ in range(num_docs)]


def write_jsonl(texts: list[str], path: str | Path) -> Path:
    """Write ``{"text": ...}`` lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def generate_mc_items(num_items: int, seed: int = 0) -> list[dict]:
    """Multiple-choice items about the corpus's fixed facts, in the MMLU layout (question, choices, answer).

    Each asks for an animal's sound, colour or home among four options; a model that learned the
    corpus can answer them, a random one is at chance (25 %).
    """
    rng = random.Random(seed)
    traits = {"says": 1, "is": 0, "lives in the": 2}
    items = []
    for _ in range(num_items):
        animal = rng.choice(list(ANIMALS))
        relation = rng.choice(list(traits))
        right = ANIMALS[animal][traits[relation]]
        wrong = rng.sample(sorted({a[traits[relation]] for a in ANIMALS.values()} - {right}), 3)
        choices = wrong + [right]
        rng.shuffle(choices)
        items.append({"question": f"the {animal} {relation}", "choices": choices, "answer": choices.index(right)})
    return items


def write_mc_jsonl(items: list[dict], path: str | Path) -> Path:
    """Write multiple-choice items as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


QUESTIONS = ("what colour is the {animal} ?", "what does the {animal} say ?", "where does the {animal} live ?")
ANSWERS = ("the {animal} is {value} .", "the {animal} says {value} .", "the {animal} lives in the {value} .")


def _question(rng: random.Random) -> dict[str, str]:
    if rng.random() < 0.3:
        name, fruit, a, b = rng.choice(NAMES), rng.choice(FRUITS), rng.randint(0, 5), rng.randint(0, 5)
        prompt = f"{name} has {NUMBERS[a]} {fruit} and gets {NUMBERS[b]} more . how many {fruit} does {name} have ?"
        return {"prompt": prompt, "completion": f"{name} has {NUMBERS[a + b]} {fruit} ."}
    animal, trait = rng.choice(list(ANIMALS)), rng.randrange(3)
    return {"prompt": QUESTIONS[trait].format(animal=animal),
            "completion": ANSWERS[trait].format(animal=animal, value=ANIMALS[animal][trait])}


def generate_instructions(num_examples: int, seed: int = 0) -> list[dict[str, str]]:
    """Question/answer pairs about the corpus's facts (``prompt``, ``completion``), the same for the same seed."""
    rng = random.Random(seed)
    return [_question(rng) for _ in range(num_examples)]


def generate_chats(num_chats: int, seed: int = 0, turns: tuple[int, int] = (1, 3)) -> list[dict]:
    """Conversations (``messages``) of 1-3 question/answer turns, some with a system message."""
    rng = random.Random(seed)
    chats = []
    for _ in range(num_chats):
        messages = [{"role": "system", "content": "answer about the farm ."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(*turns)):
            pair = _question(rng)
            messages += [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["completion"]}]
        chats.append({"messages": messages})
    return chats


def write_records(records: list[dict], path: str | Path) -> Path:
    """Write records as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def vocabulary() -> list[str]:
    """Every word the generators can emit (for a word-level tokenizer): the stories' words first, in the order they
    always had, then the questions' words."""
    words = set(NAMES) | set(FRUITS) | set(NUMBERS) | set(VERBS) | {".", ",", "the", "is", "says", "lives", "in"}
    words |= {"has", "and", "gets", "more", "so"}
    for animal, traits in ANIMALS.items():
        words |= {animal, *traits}
    questions = {"what", "colour", "does", "say", "where", "live", "?", "how", "many", "have", "answer", "about",
                 "farm"}
    return sorted(words) + sorted(questions - words)
