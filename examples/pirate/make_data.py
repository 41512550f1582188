"""A small generated dataset for a style prefix: rewrite any sentence the way a pirate would say it.

The prompt is ``Pirate: <sentence>\\n`` and the completion the sentence with pirate words swapped in
("you" -> "ye", "my" -> "me", "hello" -> "ahoy", "is"/"are"/"am" -> "be", ...) and a pirate interjection
around it. Deterministic for a given seed.

    python examples/pirate/make_data.py --out examples/pirate/data
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SUBJECTS = ["I", "you", "we", "my friend", "the captain", "our cook", "your sister", "the old man", "my brother"]
VERBS = ["found", "lost", "want", "see", "need", "like", "have", "stole", "hid", "bought"]
OBJECTS = [
    "the treasure", "a map", "my hat", "your boat", "the gold", "some bread", "the key", "a parrot", "my boots",
    "the ship", "a bottle of rum", "your sword", "the money", "a small island", "the old chest",
]  # fmt: skip
PLACES = ["at the harbour", "on the beach", "in the kitchen", "near the inn", "at sea", "in town", "on the hill"]
TIMES = ["yesterday", "today", "tonight", "this morning", "last week", "every day", "tomorrow"]
OPENERS = ["Hello", "Hi", "Yes", "No", "Excuse me", "Listen", "Look"]
QUESTIONS = [
    "Where is {o}?", "Do you have {o}?", "Is this {o}?", "Are you coming {p}?", "Have you seen {o}?",
    "Can you help me find {o}?", "Why are you {p}?",
]  # fmt: skip
STATEMENTS = [
    "{s} {v} {o} {t}.", "{s} {v} {o} {p}.", "{op}, {s_l} {v} {o}.", "{s} {v} {o} {p} {t}.", "{op}, my friend.",
    "The weather is nice {t}.", "I am very tired {t}.", "You are my best friend.", "We are going {p} {t}.",
    "This is my favourite place.", "Stop talking and listen to me.", "My money is gone.",
]  # fmt: skip

SWAPS = [
    (r"\bhello\b|\bhi\b", "ahoy"), (r"\byes\b", "aye"), (r"\bno\b", "nay"), (r"\bmy friend\b", "me hearty"),
    (r"\bfriend\b", "matey"), (r"\bmy\b", "me"), (r"\byour\b", "yer"), (r"\byou\b", "ye"),
    (r"\bam\b|\bare\b|\bis\b", "be"), (r"\bthe\b", "th'"), (r"\bmoney\b|\bgold\b", "doubloons"),
    (r"\bboat\b", "vessel"), (r"\bexcuse me\b", "avast"), (r"\blisten\b|\blook\b", "hark"),
    (r"ing\b", "in'"), (r"\btreasure\b", "booty"), (r"\bstop\b", "belay"),
]  # fmt: skip
INTERJECTIONS = ["Arr! {}", "{} Arr!", "Yo ho ho! {}", "{} Shiver me timbers!", "Arr, {}"]


def sentence(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(QUESTIONS).format(o=rng.choice(OBJECTS), p=rng.choice(PLACES))
    s = rng.choice(SUBJECTS)
    text = rng.choice(STATEMENTS).format(
        s=s, s_l=s if s == "I" else s.lower(), v=rng.choice(VERBS), o=rng.choice(OBJECTS), t=rng.choice(TIMES),
        p=rng.choice(PLACES), op=rng.choice(OPENERS),
    )  # fmt: skip
    return text[0].upper() + text[1:]


def piratify(text: str, rng: random.Random) -> str:
    out = text
    for pattern, word in SWAPS:

        def swap(m: re.Match[str], word: str = word) -> str:
            return word.capitalize() if m.group(0)[0].isupper() else word

        out = re.sub(pattern, swap, out, flags=re.I)
    template = rng.choice(INTERJECTIONS)
    if template.startswith("Arr, "):
        out = out[0].lower() + out[1:] if not out.startswith("I ") else out
    return template.format(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--validation", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("validation", args.validation)):
        rng = random.Random(f"{args.seed}-{split}")
        with (out / f"{split}.jsonl").open("w") as f:
            for _ in range(count):
                text = sentence(rng)
                pair = {"prompt": f"Pirate: {text}\n", "completion": piratify(text, rng)}
                f.write(json.dumps(pair) + "\n")
        print(f"{split}: {count} examples -> {out / (split + '.jsonl')}")


if __name__ == "__main__":
    main()
