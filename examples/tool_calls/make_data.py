"""A generated dataset for a tool-calling prefix: chats in which the assistant calls tools the way the server reads
them (``tool_choice: "auto"``, the hermes format), or answers in text when no tool fits.

Each chat is what the server renders for a model whose chat template ignores tools: a system message telling the
tools and the call format (server/api/tool_formats.py, word for word), then the user's turns. The tools of a chat
are 1-3 of a small pool (weather, time, currency conversion, unit conversion, reminders), in random order.
Three kinds of assistant turns, each the one trained on (loss on the last assistant turn only is not needed:
every assistant turn is right):

- a question one of the tools answers -> ``<tool_call>`` with its name and arguments taken from the question;
- a question none of them answers (small talk, thanks, what it can do) -> a short text answer;
- a tool's answer in the history -> a sentence that passes it on.

Cities, zones, currencies and amounts of the test split are ones the training split never shows, so a prefix
must copy arguments from the question rather than remember them. Deterministic for a given seed.

    python examples/tool_calls/make_data.py --out examples/tool_calls/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from server.api.tool_formats import TOOL_CALL_FORMATS, with_tools_in_text

HERMES = TOOL_CALL_FORMATS["hermes"]

TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
    "get_time": {
        "description": "The current time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "convert_currency": {
        "description": "Convert an amount of money from one currency to another",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "from": {"type": "string", "description": "ISO code"},
                "to": {"type": "string", "description": "ISO code"},
            },
            "required": ["amount", "from", "to"],
        },
    },
    "set_reminder": {
        "description": "Remind the user of something at a time",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "time": {"type": "string"}},
            "required": ["text", "time"],
        },
    },
}

# The test split's values never occur in training.
CITIES = {
    "train": [
        "Paris", "Rome", "Oslo", "Madrid", "Berlin", "Vienna", "Prague", "Lisbon", "Dublin", "Athens", "Cairo",
        "Nairobi", "Lagos", "Tokyo", "Seoul", "Hanoi", "Bangkok", "Delhi", "Sydney", "Lima", "Bogota", "Toronto",
        "Chicago", "Denver", "Boston", "Helsinki", "Warsaw", "Zurich", "Istanbul", "Dubai",
    ],
    "test": ["Quito", "Accra", "Osaka", "Porto", "Krakow", "Perth", "Montreal", "Tunis", "Riga", "Manila"],
}  # fmt: skip
CURRENCIES = {
    "train": ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK", "INR", "BRL", "MXN"],
    "test": ["PLN", "ZAR", "KRW", "THB"],
}
REMINDERS = {
    "train": ["call mom", "buy milk", "water the plants", "pay the rent", "book a dentist appointment",
              "send the report", "pick up the kids", "feed the cat", "renew my passport", "back up my laptop"],
    "test": ["return the library books", "charge the car", "order a birthday cake"],
}  # fmt: skip
TIMES = {"train": ["7am", "8:30", "noon", "3pm", "6pm", "9pm", "tomorrow morning"], "test": ["10:15", "5pm"]}

WEATHER_ASKS = [
    "What's the weather in {city}?", "How is the weather in {city} right now?", "Is it raining in {city}?",
    "weather {city}", "Tell me the weather in {city} in {unit}.", "What's the temperature in {city} in {unit}?",
]  # fmt: skip
TIME_ASKS = ["What time is it in {city}?", "What's the local time in {city}?", "time in {city}?"]
CURRENCY_ASKS = [
    "Convert {amount} {src} to {dst}.", "How much is {amount} {src} in {dst}?", "{amount} {src} to {dst}?",
]  # fmt: skip
REMINDER_ASKS = [
    "Remind me to {text} at {time}.",
    "Set a reminder to {text} at {time}.",
    "At {time}, remind me to {text}.",
]
SMALL_TALK = [
    ("Hello!", "Hello! How can I help you?"),
    ("Hi there", "Hi! What can I do for you?"),
    ("Thanks!", "You're welcome!"),
    ("Thank you so much.", "You're welcome! Anything else?"),
    ("Who are you?", "I am an assistant that can use a few tools to help you."),
    ("Good morning", "Good morning! How can I help?"),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("What is 2 + 2?", "2 + 2 is 4."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks quietly,\nclouds hum a slow song."),
]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowing"]


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **TOOLS[name]}}


def call_turn(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """An assistant's call as the server's history carries it (and the system prompt's format writes it)."""
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def ask(rng: random.Random, split: str, name: str) -> tuple[str, dict[str, Any], str]:
    """A question for tool ``name``, its call's arguments, and what the tool might answer."""
    city = rng.choice(CITIES[split])
    if name == "get_weather":
        unit = rng.choice(["celsius", "fahrenheit"])
        template = rng.choice(WEATHER_ASKS)
        arguments: dict[str, Any] = {"city": city, "unit": unit} if "{unit}" in template else {"city": city}
        degrees = rng.randint(-5, 35) if unit == "celsius" else rng.randint(20, 95)
        return template.format(city=city, unit=unit), arguments, f"{degrees} degrees, {rng.choice(WEATHER)}"
    if name == "get_time":
        return rng.choice(TIME_ASKS).format(city=city), {"city": city}, f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}"
    if name == "convert_currency":
        src, dst = rng.sample(CURRENCIES[split], 2)
        amount = rng.choice([5, 10, 20, 50, 75, 100, 250, 1000, 12.5])
        question = rng.choice(CURRENCY_ASKS).format(amount=amount, src=src, dst=dst)
        return question, {"amount": amount, "from": src, "to": dst}, f"{amount * rng.uniform(0.2, 5):.2f} {dst}"
    text, time = rng.choice(REMINDERS[split]), rng.choice(TIMES[split])
    return rng.choice(REMINDER_ASKS).format(text=text, time=time), {"text": text, "time": time}, "reminder set"


def answer(name: str, arguments: dict[str, Any], result: str) -> str:
    """The assistant's sentence passing a tool's answer on."""
    if name == "get_weather":
        return f"In {arguments['city']} it is {result} right now."
    if name == "get_time":
        return f"It is {result} in {arguments['city']}."
    if name == "convert_currency":
        return f"{arguments['amount']} {arguments['from']} is about {result}."
    return f"Done: I will remind you to {arguments['text']} at {arguments['time']}."


def chat(rng: random.Random, split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One chat as a client sends it (OpenAI messages, the last the assistant's turn) and its tools."""
    names = rng.sample(sorted(TOOLS), rng.randint(1, 3))
    tools = [tool(name) for name in names]
    kind = rng.random()
    if kind < 0.2:
        question, reply = rng.choice(SMALL_TALK)
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
        ]
    else:
        name = rng.choice(names)
        question, arguments, result = ask(rng, split, name)
        messages = [{"role": "user", "content": question}, call_turn(name, arguments)]
        if kind > 0.75:  # the tool answered: pass it on
            messages += [
                {"role": "tool", "tool_call_id": "call_0", "content": result},
                {"role": "assistant", "content": answer(name, arguments, result)},
            ]
    return messages, tools


def training_line(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat as the server renders it for a template that ignores tools, in prefix-serve train's format."""
    shown = with_tools_in_text(HERMES, messages, tools)  # the system message added, an assistant's calls in its text
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in shown]}


def test_line(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat for the evaluation: what a client sends (the messages before the last turn, the tools), and the last
    turn expected: its calls (name and arguments) or its text."""
    last = messages[-1]
    calls = [[c["function"]["name"], json.loads(c["function"]["arguments"])] for c in last.get("tool_calls") or []]
    expected = {"calls": calls} if calls else {"text": last["content"]}
    return {"messages": messages[:-1], "tools": tools, "expected": expected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--validation", type=int, default=32)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("validation", args.validation), ("test", args.test)):
        rng = random.Random(f"{args.seed}-{split}")
        values = "test" if split == "test" else "train"
        with (out / f"{split}.jsonl").open("w") as f:
            for _ in range(count):
                line = (test_line if split == "test" else training_line)(*chat(rng, values))
                f.write(json.dumps(line) + "\n")
        print(f"{split}: {count} chats -> {out / (split + '.jsonl')}")


if __name__ == "__main__":
    main()
