"""Synthetic agent conversations: the training and evaluation data of the small bundled model.

A 2-core CPU cannot train on real chat data in an hour, but it can teach a small model the GLM-4.5
*protocol*: when to think and how to close the thought, when to call a tool and how to write the call,
how to copy arguments out of the request, and how to answer from a tool result after `<|observation|>`.
This module generates such conversations in the OpenAI shape the trainer and the server share
(`{"messages": [...], "tools": [...], "enable_thinking": bool}`) from templates, with a split of the
vocabulary (cities, tool words) so that evaluation can use things the model never saw:

- `split="train"`: training cities and tool words;
- `split="heldout"`: held-out cities (new seed, new numbers), the three fixed tools and known tool words;
- `split="unseen_tools"`: every tool call goes to a random tool built from held-out words.

Each conversation also carries `"meta"`: what a correct model must do (the expected call and the values
the final answer must mention); the trainer ignores it, the evaluation script reads it.

    python -m glm45_tiny.synthetic --out data/train.jsonl --num 40000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SPLITS = ("train", "heldout", "unseen_tools")

CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Oslo", "Stockholm",
    "Helsinki", "Copenhagen", "Dublin", "Lisbon", "Athens", "Budapest", "Zurich", "Geneva", "Brussels",
    "Amsterdam", "Munich", "Hamburg", "Milan", "Naples", "Venice", "Florence", "Seville", "Valencia",
    "Porto", "Krakow", "Riga", "Tallinn", "Vilnius", "Sofia", "Bucharest", "Belgrade", "Zagreb",
    "Ljubljana", "Istanbul", "Ankara", "Cairo", "Nairobi", "Lagos", "Accra", "Dakar", "Casablanca",
    "Tunis", "Johannesburg", "Cape Town", "Durban", "Tokyo", "Osaka", "Kyoto", "Seoul", "Busan",
    "Beijing", "Shanghai", "Shenzhen", "Hong Kong", "Taipei", "Manila", "Hanoi", "Bangkok", "Jakarta",
    "Singapore", "Kuala Lumpur", "Delhi", "Mumbai", "Chennai", "Kolkata", "Dhaka", "Karachi", "Lahore",
    "Tehran", "Baghdad", "Riyadh", "Dubai", "Doha", "Muscat", "Tashkent", "Almaty", "Sydney",
    "Melbourne", "Brisbane", "Perth", "Auckland", "Wellington", "Toronto", "Montreal", "Vancouver",
    "Calgary", "Chicago", "Boston", "Seattle", "Denver", "Austin", "Dallas", "Houston", "Miami",
    "Atlanta", "Phoenix", "San Diego", "Los Angeles", "New York", "Mexico City", "Bogota", "Lima",
    "Quito", "Santiago", "Buenos Aires", "Montevideo", "Sao Paulo", "Rio de Janeiro", "Havana",
    "Reykjavik", "Edinburgh", "Glasgow", "Manchester", "Lyon", "Marseille", "Nice", "Bordeaux",
    "Toulouse", "Cologne", "Leipzig", "Dresden", "Antwerp", "Rotterdam", "Utrecht", "Bergen",
    "Gothenburg", "Malmo", "Aarhus", "Turku", "Gdansk", "Poznan", "Brno", "Graz", "Salzburg",
]
# Never used in training: the held-out evaluation asks about these.
HELDOUT_CITIES = [
    "Tbilisi", "Yerevan", "Baku", "Minsk", "Kyiv", "Odesa", "Chisinau", "Skopje", "Tirana", "Sarajevo",
    "Podgorica", "Valletta", "Nicosia", "Beirut", "Amman", "Kuwait City", "Manama", "Kabul", "Kathmandu",
    "Colombo", "Yangon", "Phnom Penh", "Vientiane", "Ulaanbaatar", "Harbin", "Chengdu", "Wuhan",
    "Sapporo", "Nagoya", "Fukuoka", "Incheon", "Daegu", "Cebu", "Davao", "Surabaya", "Bandung",
    "Penang", "Hyderabad", "Pune", "Jaipur", "Addis Ababa", "Kampala", "Kigali", "Lusaka", "Harare",
    "Maputo", "Luanda", "Windhoek", "Gaborone", "Abuja", "Bamako", "Niamey", "Khartoum", "Algiers",
    "Tripoli", "Rabat", "Marrakesh", "Adelaide", "Hobart", "Darwin", "Christchurch", "Ottawa", "Quebec",
    "Winnipeg", "Halifax", "Portland", "Detroit", "Nashville", "Memphis", "Orlando", "Tampa",
    "Pittsburgh", "Baltimore", "Guadalajara", "Monterrey", "Caracas", "Medellin", "La Paz", "Asuncion",
    "Cordoba", "Recife", "Salvador", "Brasilia", "Panama City", "San Jose", "Kingston", "Nassau",
]
CONDITIONS = ["sunny", "cloudy", "rainy", "snowy", "windy", "foggy", "stormy", "clear", "overcast", "humid"]
UNITS = {"celsius": ("celsius", "°C", "Celsius"), "fahrenheit": ("fahrenheit", "°F", "Fahrenheit")}
CONVERSIONS = {  # (from, to): factor
    ("km", "miles"): 0.621371, ("miles", "km"): 1.609344, ("kg", "pounds"): 2.204623,
    ("pounds", "kg"): 0.453592, ("meters", "feet"): 3.28084, ("feet", "meters"): 0.3048,
    ("liters", "gallons"): 0.264172, ("gallons", "liters"): 3.785412, ("cm", "inches"): 0.393701,
    ("inches", "cm"): 2.54, ("grams", "ounces"): 0.035274, ("ounces", "grams"): 28.349523,
}

# Random tools are `verb_noun` with parameters named after the noun; held-out words build unseen tools.
TOOL_VERBS = ["get", "find", "check", "list", "create", "cancel", "update", "book", "send", "track",
              "fetch", "search", "delete", "reserve", "schedule", "lookup", "open", "close"]
TOOL_NOUNS = ["order", "invoice", "flight", "hotel", "ticket", "package", "account", "meeting", "recipe",
              "movie", "song", "book", "train", "parcel", "payment", "reminder", "event", "table",
              "car", "room", "stock", "user", "contract", "shipment", "playlist", "course"]
HELDOUT_TOOL_VERBS = ["verify", "approve", "archive", "restore", "rename", "summarize", "translate", "locate"]
HELDOUT_TOOL_NOUNS = ["voucher", "patient", "warehouse", "satellite", "vaccine", "tractor", "museum",
                      "pipeline", "lighthouse", "glacier", "lottery", "passport"]
PARAM_SUFFIXES = ["id", "name", "code", "date", "city", "count", "owner", "status"]
INT_SUFFIXES = {"id", "count"}
STATUS_WORDS = ["confirmed", "pending", "shipped", "delayed", "cancelled", "approved", "available",
                "completed", "active", "expired", "on time", "booked"]
NAME_WORDS = ["alpha", "bravo", "delta", "echo", "nova", "orion", "lotus", "maple", "cedar", "atlas",
              "ember", "harbor", "zephyr", "quartz", "willow", "falcon", "coral", "summit", "aurora", "pixel"]

GREETINGS = ["Hello!", "Hi there!", "Hey!", "Good morning!", "Good evening!", "Hi, how are you?"]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What can I do for you?",
                    "Hey! How can I help?", "Hello! I am here to help. What do you need?"]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo",
            "Norway": "Oslo", "Sweden": "Stockholm", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
            "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Portugal": "Lisbon",
            "Ireland": "Dublin", "Finland": "Helsinki", "Chile": "Santiago", "Cuba": "Havana"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "old": "new",
             "happy": "sad", "open": "closed", "early": "late", "wet": "dry", "loud": "quiet"}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise assistant that uses tools when needed.",
                  "You are GLM, a helpful AI assistant.", "Answer briefly and call tools when they help."]


# The share of training cities and random tools made of made-up words.
MADE_UP_SHARE = 0.8
_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "y", "z",
           "br", "kr", "st", "tr", "sh", "ch", "th", "ph", "gr", "bl", "dr", "kh", "x"]
_VOWELS = ["a", "e", "i", "o", "u", "y", "ai", "ou", "ea", "ia", "aa", "ee"]
_CODAS = ["", "", "", "n", "r", "s", "l", "k", "m", "t", "d", "ng", "sh"]
_HELDOUT_WORDS = {w.lower() for w in HELDOUT_CITIES + HELDOUT_TOOL_VERBS + HELDOUT_TOOL_NOUNS}


def pseudo_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up word ("trivosa"): values a model cannot memorise, only copy."""
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.randint(*syllables)))
        if word not in _HELDOUT_WORDS:
            return word


# Of the made-up words, the share strung together from the tokenizer's own word pieces (when it is given).
# A held-out English word is also a string of those pieces ("lottery" = lot·t·ery), but many pieces never
# occur in a syllable word or in a copied value: they come from the template's words ("pro" from
# "properties"). A model that has rarely *written* a piece in a copied value copies it badly, so copied values
# are built from every piece the tokenizer has.
PIECE_SHARE = 0.6
_MAX_PIECE_LETTERS = 6


class WordPieces:
    """The letter-only pieces of a tokenizer's vocabulary: lowercase ones, and capitalised ones to start names."""

    def __init__(self, vocabulary: Iterable[str]):
        letters = [t for t in vocabulary if t.isascii() and t.isalpha() and len(t) <= _MAX_PIECE_LETTERS]
        self.lower = sorted(t for t in letters if t.islower())
        self.capital = sorted(t for t in letters if t[0].isupper() and (len(t) == 1 or t[1:].islower()))
        if not self.lower or not self.capital:
            raise ValueError("the vocabulary has no lowercase or no capitalised letter-only pieces")

    def word(self, rng: random.Random, pieces: tuple[int, int], capital: bool = False) -> str:
        """A made-up word of `pieces` random pieces, at least 3 letters, containing no held-out word."""
        while True:
            first = rng.choice(self.capital if capital else self.lower)
            word = first + "".join(rng.choice(self.lower) for _ in range(rng.randint(*pieces) - 1))
            lowered = word.lower()
            if len(word) >= 3 and not any(held in lowered for held in _HELDOUT_WORDS):
                return word


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


WEATHER_TOOL = _tool("get_weather", "Get the current weather for a city.", {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city", "unit"])
CALCULATOR_TOOL = _tool("calculator", "Evaluate an arithmetic expression.",
                        {"expression": {"type": "string"}}, ["expression"])
CONVERT_TOOL = _tool("convert_units", "Convert a value from one unit to another.", {
    "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
    ["value", "from_unit", "to_unit"])
FIXED_TOOLS = [WEATHER_TOOL, CALCULATOR_TOOL, CONVERT_TOOL]
# Users declare get_weather in their own words. Besides the schema above (unit required), this share of weather
# tasks uses a schema where the unit is optional or absent, described differently, often with parameter
# descriptions; half of those questions name no unit, and the call then carries the city only.
WEATHER_VARIANT_SHARE = 0.35
WEATHER_DESCRIPTIONS = ["Get the current weather in a city.", "Current weather in a city",
                        "Look up the weather for a city.", "Returns the current weather conditions for a city."]
CITY_DESCRIPTIONS = ["the city name", "The city, e.g. Paris", "city to look up", "name of the city"]
UNITLESS_WEATHER_QUESTIONS = ["What's the weather like in {city} right now?", "How is the weather in {city} today?",
                              "What's the weather in {city}?", "Weather in {city}?", "Tell me the weather in {city}.",
                              "Is it cold in {city} right now?"]


# The kinds of task (`ConversationGenerator.<kind>_task`) and their shares. The held-out splits keep one fixed mix,
# so that models are compared on the same conversations. Training weights random tools (found by reading the
# tool list, the hardest skill) more than the fixed calculator and unit-conversion tools.
HELDOUT_TASK_MIX = {"weather": 0.2, "calculator": 0.2, "convert": 0.2, "random_tool": 0.25, "chat": 0.15}
TRAIN_TASK_MIX = {"weather": 0.22, "calculator": 0.12, "convert": 0.12, "random_tool": 0.39, "chat": 0.15}


def _format_number(x: float) -> str:
    """Numbers as a person writes them: integers without a decimal point, others with at most 2 decimals."""
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")


class ConversationGenerator:
    """Draws conversations of every kind for one split; deterministic for a given seed."""

    def __init__(self, seed: int, split: str = "train", copy_drill: float = 0.0,
                 vocabulary: Iterable[str] | None = None, piece_share: float = PIECE_SHARE):
        """`copy_drill`: the share of extra "repeat after me" conversations with made-up words, cities and
        numbers — drills for the copying that tool arguments need (0 keeps the original mix).
        `vocabulary`: the tokens of the model's tokenizer; when given, `piece_share` of the training split's
        made-up words are strings of its word pieces (see `WordPieces`)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if not 0.0 <= copy_drill < 1.0:
            raise ValueError(f"copy_drill must be in [0, 1), got {copy_drill}")
        if not 0.0 <= piece_share <= 1.0:
            raise ValueError(f"piece_share must be in [0, 1], got {piece_share}")
        self.piece_share = piece_share
        self.copy_drill = copy_drill
        self.rng = random.Random(seed)
        self.split = split
        self.cities = CITIES if split == "train" else HELDOUT_CITIES
        # The held-out splits stay independent of the tokenizer, so that every model is evaluated on the same data.
        self.pieces = WordPieces(vocabulary) if vocabulary is not None and split == "train" else None

    def _made_up(self, syllables: tuple[int, int], capital: bool = False) -> str:
        rng = self.rng
        if self.pieces is not None and rng.random() < self.piece_share:
            return self.pieces.word(rng, syllables, capital)
        word = pseudo_word(rng, syllables)
        return word.capitalize() if capital else word

    # Training uses mostly made-up words, so that the model learns to copy cities, names and tool names from
    # the request and the tool list instead of memorising them; held-out splits use real words it never saw.
    def _city(self) -> str:
        rng = self.rng
        if self.split == "train" and rng.random() < MADE_UP_SHARE:
            words = 2 if rng.random() < 0.15 else 1
            return " ".join(self._made_up((1, 3) if words == 2 else (2, 4), capital=True) for _ in range(words))
        return rng.choice(self.cities)

    def _name_value(self) -> str:
        rng = self.rng
        word = self._made_up((2, 3)) if rng.random() < 0.5 else rng.choice(NAME_WORDS)
        return word + ("-" + str(rng.randint(1, 99)) if rng.random() < 0.5 else "")

    # ------------------------------------------------------------------ tools
    def random_tool(self, heldout_words: bool = False,
                    words: tuple[list[str], list[str]] | None = None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """A `verb_noun` tool with 1–3 parameters → (tool, [(param, json type)]). `words`: (verbs, nouns) to draw
        from instead of the split's (no made-up words then)."""
        rng = self.rng
        verbs, nouns = (HELDOUT_TOOL_VERBS, HELDOUT_TOOL_NOUNS) if heldout_words else (TOOL_VERBS, TOOL_NOUNS)
        verbs, nouns = words or (verbs, nouns)
        verb, noun = rng.choice(verbs), rng.choice(nouns)
        if not heldout_words and words is None and self.split == "train" and rng.random() < MADE_UP_SHARE:
            roll = rng.random()
            if roll < 0.7:
                verb, noun = self._made_up((1, 3)), self._made_up((1, 3))
            elif roll < 0.85:
                verb = self._made_up((1, 3))
            else:
                noun = self._made_up((1, 3))
        suffixes = rng.sample(PARAM_SUFFIXES, rng.randint(1, 3))
        params = [(f"{noun}_{s}", "integer" if s in INT_SUFFIXES else "string") for s in suffixes]
        tool = _tool(f"{verb}_{noun}", f"{verb.capitalize()} a {noun}.",
                     {p: {"type": t} for p, t in params}, [p for p, _ in params])
        return tool, params

    def _tool_list(self, target: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The target tool among 1–2 distractors (fixed tools and random known-word tools), shuffled."""
        rng = self.rng
        tools = [] if target is None else [target]
        names = {t["function"]["name"] for t in tools}
        for _ in range(rng.randint(1, 2)):
            candidate = rng.choice(FIXED_TOOLS) if rng.random() < 0.5 else self.random_tool()[0]
            if candidate["function"]["name"] not in names:
                names.add(candidate["function"]["name"])
                tools.append(candidate)
        rng.shuffle(tools)
        return tools

    # ------------------------------------------------------------------ tasks
    def weather_tool_variant(self) -> tuple[dict[str, Any], bool]:
        """A get_weather schema in other words, with the unit optional or absent → (tool, has a unit)."""
        rng = self.rng
        city: dict[str, Any] = {"type": "string"}
        if rng.random() < 0.5:
            city["description"] = rng.choice(CITY_DESCRIPTIONS)
        properties = {"city": city}
        has_unit = rng.random() < 0.6
        if has_unit:
            properties["unit"] = {"type": "string", "enum": list(UNITS)}
        return _tool("get_weather", rng.choice(WEATHER_DESCRIPTIONS), properties, ["city"]), has_unit

    def weather_task(self) -> dict[str, Any]:
        rng = self.rng
        city = self._city()
        tool, ask_unit = WEATHER_TOOL, True
        if rng.random() < WEATHER_VARIANT_SHARE:
            tool, has_unit = self.weather_tool_variant()
            ask_unit = has_unit and rng.random() < 0.5
        unit = rng.choice(list(UNITS)) if ask_unit else "celsius"  # the service's default
        unit_word = rng.choice([UNITS[unit][0], UNITS[unit][2]])
        user = rng.choice([
            f"What's the weather in {city} in {unit_word}?",
            f"How warm is it in {city}? Use {unit_word}.",
            f"Tell me the current weather in {city}, in {unit_word} please.",
            f"Weather for {city} in {unit_word}?",
            f"Is it cold in {city} right now? Answer in {unit_word}.",
        ]) if ask_unit else rng.choice(UNITLESS_WEATHER_QUESTIONS).format(city=city)
        temp = rng.randint(-20, 40) if unit == "celsius" else rng.randint(-5, 105)
        condition = rng.choice(CONDITIONS)
        result = json.dumps({"city": city, "temperature": temp, "unit": unit, "condition": condition})
        symbol = UNITS[unit][1]
        answer = rng.choice([
            f"It is {temp}{symbol} and {condition} in {city}.",
            f"The weather in {city} is {condition} with a temperature of {temp}{symbol}.",
            f"{city}: {temp}{symbol}, {condition}.",
        ])
        arguments = {"city": city, "unit": unit} if ask_unit else {"city": city}
        wanted = f"the weather in {city} in {unit}" if ask_unit else f"the weather in {city}"
        return {"tool": tool, "user": user, "arguments": arguments, "result": result,
                "answer": answer, "must_mention": [str(temp), condition],
                "plan": f"The user wants {wanted}. I will call get_weather.",
                "after": f"The tool says {temp}{symbol} and {condition}."}

    def calculator_task(self) -> dict[str, Any]:
        rng = self.rng
        count = rng.randint(2, 3)
        numbers = [rng.randint(2, 999) for _ in range(count)]
        ops = [rng.choice(["+", "-", "*"]) for _ in range(count - 1)]
        expression = str(numbers[0]) + "".join(f" {op} {n}" for op, n in zip(ops, numbers[1:], strict=True))
        value = eval(expression)  # noqa: S307 — our own digits and + - * only
        user = rng.choice([f"What is {expression}?", f"Calculate {expression}.", f"Compute {expression} for me.",
                           f"Can you work out {expression}?", f"{expression} = ?"])
        answer = rng.choice([f"{expression} = {value}.", f"The result is {value}.", f"It equals {value}."])
        return {"tool": CALCULATOR_TOOL, "user": user, "arguments": {"expression": expression},
                "result": str(value), "answer": answer, "must_mention": [str(value)],
                "plan": "This is arithmetic, so I will use the calculator.", "after": f"The result is {value}."}

    def convert_task(self) -> dict[str, Any]:
        rng = self.rng
        (src, dst), factor = rng.choice(list(CONVERSIONS.items()))
        value = rng.randint(1, 500) if rng.random() < 0.6 else round(rng.uniform(0.5, 500), rng.choice([1, 2]))
        text = _format_number(value)
        user = rng.choice([f"Convert {text} {src} to {dst}.", f"How many {dst} is {text} {src}?",
                           f"What is {text} {src} in {dst}?", f"Please convert {text} {src} into {dst}."])
        converted = _format_number(round(value * factor, 2))
        result = json.dumps({"value": float(converted) if "." in converted else int(converted), "unit": dst})
        answer = rng.choice([f"{text} {src} is {converted} {dst}.", f"That is {converted} {dst}.",
                             f"{text} {src} equals {converted} {dst}."])
        number = int(text) if "." not in text else float(text)
        return {"tool": CONVERT_TOOL, "user": user,
                "arguments": {"value": number, "from_unit": src, "to_unit": dst}, "result": result,
                "answer": answer, "must_mention": [converted],
                "plan": f"I need to convert {src} to {dst} with convert_units.", "after": f"It is {converted} {dst}."}

    def random_tool_task(self, heldout_words: bool = False,
                         words: tuple[list[str], list[str]] | None = None) -> dict[str, Any]:
        rng = self.rng
        tool, params = self.random_tool(heldout_words, words)
        name = tool["function"]["name"]
        verb, noun = name.split("_", 1)
        arguments: dict[str, Any] = {}
        phrases = []
        for param, kind in params:
            if kind == "integer":
                value: Any = rng.randint(1, 99999)
            elif param.endswith("_city"):
                value = self._city()
            elif param.endswith("_date"):
                value = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            else:
                value = self._name_value()
            arguments[param] = value
            phrases.append(f"{param.split('_', 1)[1]} {value}")
        details = " and ".join(phrases)
        user = rng.choice([f"Please {verb} the {noun} with {details}.", f"Can you {verb} a {noun}? Use {details}.",
                           f"I need to {verb} my {noun}: {details}.", f"{verb.capitalize()} {noun}, {details}."])
        status = rng.choice(STATUS_WORDS)
        result = json.dumps({"status": status})
        answer = rng.choice([f"Done. The {noun} is {status}.", f"The {noun} status is {status}.",
                             f"Your {noun} is now {status}."])
        return {"tool": tool, "user": user, "arguments": arguments, "result": result, "answer": answer,
                "must_mention": [status], "plan": f"The user wants to {verb} a {noun}. The tool {name} does that.",
                "after": f"The {noun} is {status}."}

    def chat_task(self) -> dict[str, Any]:
        """A question answered without tools."""
        rng = self.rng
        kind = rng.randrange(4)
        if kind == 0:
            return {"user": rng.choice(GREETINGS), "answer": rng.choice(GREETING_REPLIES),
                    "plan": "The user greets me. I should greet back and offer help."}
        if kind == 1:
            country, capital = rng.choice(list(CAPITALS.items()))
            return {"user": rng.choice([f"What is the capital of {country}?", f"Capital of {country}?"]),
                    "answer": f"The capital of {country} is {capital}.",
                    "plan": f"I know the capital of {country}. No tool is needed."}
        if kind == 2:
            word, opposite = rng.choice(list(OPPOSITES.items()))
            return {"user": f"What is the opposite of {word}?", "answer": f"The opposite of {word} is {opposite}.",
                    "plan": "A simple word question. No tool is needed."}
        words = " ".join(self._name_value() for _ in range(rng.randint(2, 4)))
        return {"user": f"Repeat after me: {words}", "answer": words, "plan": "I just repeat the words."}

    def copy_task(self) -> dict[str, Any]:
        """Repeat a mix of made-up words, cities, numbers and dates, quoted back in a sentence."""
        rng = self.rng
        pieces = []
        for _ in range(rng.randint(2, 5)):
            kind = rng.randrange(4)
            if kind == 0:
                pieces.append(self._city())
            elif kind == 1:
                pieces.append(str(rng.randint(0, 99999)) if rng.random() < 0.7 else f"{rng.uniform(0, 999):.2f}")
            elif kind == 2:
                pieces.append(f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
            else:
                pieces.append(self._name_value())
        text = " ".join(pieces)
        user = rng.choice([f"Repeat after me: {text}", f"Say exactly this: {text}", f"Echo: {text}"])
        answer = rng.choice([text, f"Here it is: {text}"])
        return {"user": user, "answer": answer, "plan": "I repeat the text exactly."}

    # ------------------------------------------------------------------ conversations
    def conversation(self, task: dict[str, Any] | None = None) -> dict[str, Any]:
        """One conversation of the split's task mix, or around `task` (a `*_task()` result) when given."""
        rng = self.rng
        if task is not None:
            pass
        elif self.split == "unseen_tools":
            task = self.random_tool_task(heldout_words=True)
        elif self.copy_drill and self.split == "train" and rng.random() < self.copy_drill:
            task = self.copy_task()
        else:
            mix = TRAIN_TASK_MIX if self.split == "train" else HELDOUT_TASK_MIX
            kind = rng.choices(list(mix), weights=list(mix.values()))[0]
            task = getattr(self, f"{kind}_task")()
        # Thinking mode: think then answer, or answer straight away with an empty thought; or /nothink.
        mode = rng.choices(["think", "direct", "nothink"], weights=[0.4, 0.3, 0.3])[0]
        think = mode == "think"
        tool = task.get("tool")
        tools = self._tool_list(tool) if tool is not None or rng.random() < 0.5 else None
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": task["user"]})
        meta: dict[str, Any] = {"kind": "chat" if tool is None else tool["function"]["name"], "mode": mode}
        if tool is None:
            messages.append(self._assistant(task["answer"], task["plan"] if think else None))
            meta["answer"] = task["answer"]
        else:
            call = {"type": "function", "function": {"name": tool["function"]["name"], "arguments": task["arguments"]}}
            first = self._assistant("", task["plan"] if think else None)
            first["tool_calls"] = [call]
            messages.append(first)
            messages.append({"role": "tool", "content": task["result"]})
            messages.append(self._assistant(task["answer"], task["after"] if think else None))
            meta.update(call=call["function"], must_mention=task["must_mention"])
            if self.split == "unseen_tools":
                meta["kind"] = "unseen_tool"
        return {"messages": messages, "tools": tools, "enable_thinking": mode != "nothink", "meta": meta}

    @staticmethod
    def _assistant(content: str, reasoning: str | None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = reasoning
        return message

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.conversation()


def generate(num: int, seed: int, split: str = "train", copy_drill: float = 0.0,
             vocabulary: Iterable[str] | None = None, piece_share: float = PIECE_SHARE) -> list[dict[str, Any]]:
    if num <= 0:
        raise ValueError(f"num must be a positive number of conversations, got {num}")
    generator = ConversationGenerator(seed, split, copy_drill, vocabulary, piece_share)
    return [generator.conversation() for _ in range(num)]


def write_jsonl(conversations: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic GLM-4.5 agent conversations as JSONL.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--copy-drill", type=float, default=0.0, help="share of extra copying drills")
    parser.add_argument("--tokenizer", help="a tokenizer folder whose word pieces build some of the made-up words")
    parser.add_argument("--piece-share", type=float, default=PIECE_SHARE,
                        help="with --tokenizer: the share of made-up words strung from its word pieces")
    args = parser.parse_args(argv)
    vocabulary = None
    if args.tokenizer:
        from glm45.tokenizer import Tokenizer
        vocabulary = Tokenizer.from_pretrained(args.tokenizer).vocab
    write_jsonl(generate(args.num, args.seed, args.split, args.copy_drill, vocabulary, args.piece_share), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
