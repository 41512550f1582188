"""E2E-style restaurant records and their descriptions, generated deterministically (the paper's Figure 1 task).

A record is a meaning representation in the E2E NLG challenge's format,

    name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], area[riverside], near[Burger King]

and its description is one of many phrasings built from varied sentence frames, clause orders and wordings,
so that the task is not one template. Validation and test records use restaurant names never seen in
training, so a model has to copy names rather than memorise them. Every phrasing contains each value's
surface form (e.g. "city centre", "less than £20", "family friendly" / "not family friendly"), which is what
``slot_errors`` checks.

    python examples/table_to_text/restaurants.py --out examples/table_to_text/data   # writes train/validation/test
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

SLOTS = ("name", "eatType", "food", "priceRange", "area", "familyFriendly", "near")
EAT_TYPES = ("coffee shop", "pub", "restaurant")
FOODS = ("English", "French", "Italian", "Indian", "Chinese", "Japanese", "Fast food")
PRICES = ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30")
AREAS = ("city centre", "riverside")
NEAR = (
    "Café Rouge", "Burger King", "The Bakers", "Raja Indian Cuisine", "Ranch", "All Bar One", "Crowne Plaza Hotel",
    "The Sorrento", "Express by Holiday Inn", "Rainbow Vegetarian Café", "The Portland Arms", "Clare Hall",
    "Yippee Noodle Bar", "Avalon", "The Six Bells",
)  # fmt: skip
TRAIN_NAMES = (
    "The Eagle", "The Mill", "Aromi", "Zizzi", "Fitzbillies", "Wildwood", "The Punter", "Cotto", "Giraffe",
    "Strada", "The Cricketers", "Alimentum", "The Golden Curry", "Loch Fyne", "Green Man", "The Phoenix",
    "Midsummer House", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "The Dumpling Tree", "The Olive Grove",
    "The Plough", "The Rice Boat", "The Vaults", "The Waterman", "Taste of Cambridge", "The Twenty Two",
    "The Wrestlers",
)  # fmt: skip
HELD_OUT_NAMES = (
    "The Copper Kettle", "Lantern House", "The Red Lion", "Saffron Garden", "The Blue Door", "Millers Yard",
    "The Old Forge", "Juniper", "The Brass Monkey", "Orchard Table", "The Silver Birch", "Kingfisher",
)  # fmt: skip
INCLUDE = {"eatType": 0.85, "food": 0.75, "priceRange": 0.6, "area": 0.7, "familyFriendly": 0.6, "near": 0.5}
PROMPT_SUFFIX = "\nDescription:"  # the prefix-tuned model's prompt is the record, then this


@dataclass(frozen=True)
class Record:
    slots: dict[str, str]

    @property
    def mr(self) -> str:
        return ", ".join(f"{k}[{self.slots[k]}]" for k in SLOTS if k in self.slots)


def make_record(rng: random.Random, names: tuple[str, ...]) -> Record:
    slots = {"name": rng.choice(names)}
    while len(slots) < 4:  # at least three attributes besides the name
        slots = {"name": slots["name"]}
        for slot, p in INCLUDE.items():
            if rng.random() < p:
                slots[slot] = rng.choice(
                    {
                        "eatType": EAT_TYPES,
                        "food": FOODS,
                        "priceRange": PRICES,
                        "area": AREAS,
                        "familyFriendly": ("yes", "no"),
                        "near": NEAR,
                    }[slot]
                )
    return Record(slots)


# -- realisation ---------------------------------------------------------------

_PRICE_ADJ = {"cheap": "cheap", "moderate": "moderately priced", "high": "high-priced"}
_PRICE_CLAUSE = {
    "cheap": ["has cheap prices", "offers cheap food", "is cheap"],
    "moderate": ["has moderate prices", "is moderately priced", "offers food at moderate prices"],
    "high": ["has high prices", "is high-priced", "has a high price range"],
    "less than £20": ["has prices less than £20", "serves meals for less than £20", "costs less than £20"],
    "£20-25": ["has a price range of £20-25", "has prices of £20-25", "costs £20-25 per person"],
    "more than £30": ["has prices of more than £30", "costs more than £30", "charges more than £30 per meal"],
}
_AREA = {
    "city centre": ["in the city centre", "located in the city centre", "in the heart of the city centre"],
    "riverside": ["in the riverside area", "by the riverside", "located on the riverside"],
}
_NEAR = ["near {}", "close to {}", "not far from {}"]
_FAMILY = {
    "yes": ["is family friendly", "is kid friendly", "is family-friendly", "is child friendly"],
    "no": ["is not family friendly", "is not kid friendly", "is not family-friendly", "is not child friendly"],
}


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def realise(record: Record, rng: random.Random) -> str:
    """One description of ``record``; different ``rng`` states give different phrasings."""
    s = record.slots
    name, eat = s["name"], s.get("eatType")
    food = s.get("food")
    food_word = food.lower() if food == "Fast food" else food
    price = s.get("priceRange")
    rest: list[str] = []  # verb phrases for a second sentence or a trailing clause

    # The noun phrase: [price adjective] [food] eatType|place.
    words = []
    if price in _PRICE_ADJ and rng.random() < 0.5:
        words.append(_PRICE_ADJ[price])
    elif price:
        rest.append(rng.choice(_PRICE_CLAUSE[price]))
    food_in_np = food is not None and eat is not None and rng.random() < 0.6
    if food_in_np:
        words.append(food_word)
    elif food:
        verb = rng.choice(["serves", "offers", "provides"])
        rest.append(f"{verb} fast food" if food == "Fast food" else f"{verb} {food} food")
    words.append(eat or rng.choice(["place", "venue"]))
    np = _a(" ".join(words))
    pps = []
    if "area" in s:
        pps.append(rng.choice(_AREA[s["area"]]).removeprefix("located "))
    if "near" in s:
        pps.append(rng.choice(_NEAR).format(s["near"]))
    rng.shuffle(pps)
    if "familyFriendly" in s:
        rest.append(rng.choice(_FAMILY[s["familyFriendly"]]))
    rng.shuffle(rest)

    frame = rng.randrange(4)
    where = " ".join(pps)
    if frame == 0:
        head = f"{name} is {np}" + (f" {where}" if where else "")
    elif frame == 1:
        head = f"There is {np} called {name}" + (f" {where}" if where else "")
    elif frame == 2 and where:
        head = f"{where[0].upper()}{where[1:]}, {name} is {np}"
    else:
        head = f"{name}, {np}" + (f" {where}" if where else "") + ","
        if not rest:
            return head.rstrip(",") + " is worth a visit."
        return f"{head} {_join(rest)}."
    if not rest:
        return head + "."
    if frame == 1 or len(rest) > 1 or rng.random() < 0.5:  # "There is X ... and is Y" would not parse
        return f"{head}. It {_join(rest)}."
    return f"{head} and {rest[0]}."


def references(record: Record, rng: random.Random, n: int) -> list[str]:
    """``n`` phrasings, distinct where the record allows."""
    out: list[str] = []
    for _ in range(20 * n):
        text = realise(record, rng)
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    while len(out) < n:
        out.append(out[0])
    return out


# -- checking slots --------------------------------------------------------------

_NOT_FRIENDLY = re.compile(r"\b(not|n't|non)[- ](family|kid|child|children)[- ]friendly", re.I)
_FRIENDLY = re.compile(r"\b(family|kid|child|children)[- ]friendly", re.I)
_ALTERNATIVES = {"eatType": EAT_TYPES, "food": FOODS, "area": AREAS, "near": NEAR}


def _mentions(text: str, value: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(value.lower()) + r"(?!\w)", text.lower()) is not None


def _price_mentioned(text: str, value: str) -> bool:
    t = text.lower()
    if value == "moderate":
        return "moderate" in t
    if value == "high":
        return re.search(r"\b(high|expensive)", t) is not None
    return _mentions(text, value)


def slot_errors(record: Record, text: str) -> list[str]:
    """The record's slots that ``text`` gets wrong: value missing, or another value of that slot mentioned.

    Names are masked before the other slots are checked ("Raja Indian Cuisine" is not a food mention).
    """
    errors = []
    full = text
    for value in (*TRAIN_NAMES, *HELD_OUT_NAMES, *NEAR):
        text = re.sub(re.escape(value), "<NAME>", text, flags=re.I)
    for slot, value in record.slots.items():
        if slot in ("name", "near"):
            others = [v for v in NEAR if v != value] if slot == "near" else []
            if not _mentions(full, value) or any(_mentions(full, v) for v in others):
                errors.append(slot)
            continue
        if slot == "familyFriendly":
            negative = _NOT_FRIENDLY.search(text) is not None
            ok = negative if value == "no" else (_FRIENDLY.search(text) is not None and not negative)
        elif slot == "priceRange":
            others = [p for p in PRICES if p != value and p not in value and value not in p]
            ok = _price_mentioned(text, value) and not any(_price_mentioned(text, p) for p in others)
        elif slot == "food" and value == "Fast food":
            ok = _mentions(text, "fast food") and not any(_mentions(text, f) for f in FOODS[:-1])
        else:
            others = [v for v in _ALTERNATIVES.get(slot, ()) if v != value and value.lower() not in v.lower()]
            ok = _mentions(text, value) and not any(_mentions(text, v) for v in others)
        if not ok:
            errors.append(slot)
    return errors


# -- splits ----------------------------------------------------------------------


def build_split(split: str, count: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(f"{seed}-{split}")
    names = TRAIN_NAMES if split == "train" else HELD_OUT_NAMES
    rows = []
    for _ in range(count):
        record = make_record(rng, names)
        refs = references(record, rng, 3)
        rows.append({"mr": record.mr, "slots": record.slots, "references": refs})
    return rows


def parse_mr(mr: str) -> Record:
    return Record(dict(re.findall(r"(\w+)\[([^\]]*)\]", mr)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("validation", args.validation), ("test", args.test)):
        rows = build_split(split, count, args.seed)
        (out / f"{split}.records.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        # Training format for `prefix-serve train`: one line per reference (several phrasings per record).
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                refs = row["references"] if split == "train" else row["references"][:1]
                for ref in dict.fromkeys(refs):  # type: ignore[call-overload]
                    pair = {"prompt": str(row["mr"]) + PROMPT_SUFFIX, "completion": " " + ref}
                    f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        print(f"{split}: {len(rows)} records -> {out / (split + '.jsonl')}")


if __name__ == "__main__":
    main()
