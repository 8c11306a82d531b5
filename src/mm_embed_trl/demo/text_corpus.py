"""A small generated text corpus for text-only distillation demos and tests (UniME stage 1 on a CPU).

UniME's first stage distils a text embedding teacher into the MLLM's language model on ~273k NLI sentences.
Nothing can be downloaded here, so the built-in demo distils on sentences this module writes: short scene
descriptions from eight domains (shapes and colours, counted shapes, animals, people, vehicles, rooms, food,
weather), each domain with several sentence frames and synonyms, so that the teacher's similarity structure is
rich (topic, objects, attributes and phrasing all matter) while the vocabulary stays small enough for a tiny
backbone to learn in minutes.

Everything is a pure function of the arguments: the same ``seed`` gives the same sentences in the same order.
Sentences are unique, and the held-out split shares no sentence with the training split (only vocabulary).

Usage::

    from mm_embed_trl.demo.text_corpus import make_text_corpus
    corpus = make_text_corpus(num_train=3000, num_eval=300)   # DatasetDict: "train", "eval"; column "text"
    corpus["train"][0]  # {'text': 'a small red circle in the top left corner', 'domain': 'shapes'}
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["DOMAINS", "TEXT_COLUMN", "generate_sentences", "make_text_corpus"]

TEXT_COLUMN = "text"

_COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "hexagon", "diamond", "oval", "heart", "cross")
_SIZES = ("small", "large", "tiny", "big", "bright", "dark", "pale")
_POSITIONS = (
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the center",
    "in the top left corner",
    "in the bottom right corner",
    "near the edge",
)
_RELATIONS = ("above", "below", "next to", "to the left of", "to the right of", "inside", "behind", "beside")
_COUNTS = ("two", "three", "four", "five", "six", "several", "many")
_ARRANGEMENTS = (
    "in a row",
    "in a circle",
    "stacked on top of each other",
    "scattered across the page",
    "in a neat grid",
    "lined up along the bottom",
)
_OPENERS = ("", "there is ", "I can see ", "the picture shows ", "this image contains ", "a drawing of ")

_ANIMALS = ("dog", "cat", "horse", "bird", "cow", "sheep", "rabbit", "duck", "fox", "bear", "goat", "mouse")
_ANIMAL_ACTIONS = (
    "is running",
    "is sleeping",
    "is eating grass",
    "is jumping",
    "is swimming",
    "is sitting quietly",
    "is playing",
    "is looking around",
    "is chasing a ball",
)
_OUTDOOR_PLACES = (
    "in the park",
    "in the garden",
    "in the forest",
    "in a green field",
    "by the river",
    "on the beach",
    "in the snow",
    "on a farm",
    "near the lake",
    "on a hill",
)
_ANIMAL_FRAMES = (
    "{a} {adj}{animal} {action} {place}",
    "the {animal} {action} {place}",
    "a photo of {a} {adj}{animal} that {action} {place}",
    "{place}, {a} {adj}{animal} {action}",
)
_ANIMAL_ADJ = ("", "", "young ", "old ", "brown ", "white ", "black ", "small ", "big ", "happy ")

_PEOPLE = ("a man", "a woman", "a child", "two boys", "an old man", "a young girl", "a chef", "a teacher", "a student")
_ACTIVITIES = (
    "is cooking dinner",
    "is reading a book",
    "is riding a bicycle",
    "is playing the guitar",
    "is painting a picture",
    "is playing football",
    "is drinking coffee",
    "is writing a letter",
    "is walking a dog",
    "is taking a photo",
    "is singing a song",
)
_PEOPLE_PLACES = (
    "in the kitchen",
    "at the park",
    "in the library",
    "on the street",
    "at the beach",
    "in a small room",
    "at home",
    "in the office",
    "at school",
)
_PEOPLE_FRAMES = (
    "{person} {activity} {place}",
    "{place}, {person} {activity}",
    "a picture of {person} who {activity} {place}",
    "{person} {activity}",
)

_VEHICLES = ("car", "bus", "truck", "bicycle", "train", "boat", "motorcycle", "plane", "taxi", "tractor")
_MOTIONS = ("is parked", "is driving", "is moving fast", "is waiting", "is turning", "is stopped")
_ROADS = (
    "on the street",
    "near the station",
    "across the bridge",
    "on the highway",
    "in the city",
    "on a country road",
    "by the harbour",
)
_VEHICLE_FRAMES = (
    "{a} {color} {vehicle} {motion} {road}",
    "the {color} {vehicle} {motion} {road}",
    "{road}, {a} {color} {vehicle} {motion}",
    "an old {color} {vehicle} {motion}",
)

_FURNITURE = ("chair", "table", "lamp", "sofa", "bed", "clock", "vase", "window", "door", "shelf", "mirror")
_ROOMS = ("kitchen", "bedroom", "living room", "office", "bathroom", "hallway", "classroom")
_ROOM_SPOTS = ("in the corner", "next to the wall", "near the window", "in the middle", "by the door")
_ROOM_FRAMES = (
    "{a} {color} {item} {spot} of the {room}",
    "the {room} has {a} {color} {item} {spot}",
    "there is {a} {color} {item} in the {room}",
    "an empty {room} with {a} {color} {item}",
)

_FOODS = (
    "pizza",
    "a bowl of soup",
    "fresh bread",
    "an apple",
    "a banana",
    "rice and fish",
    "a chocolate cake",
    "pasta",
    "a salad",
    "ice cream",
    "a sandwich",
)
_EATERS = ("a man", "a woman", "a child", "a family", "two friends", "a hungry boy", "an old woman")
_FOOD_FRAMES = (
    "{eater} is eating {food}",
    "a plate of {food} on {a} {color} table",
    "{food} served on {a} {color} plate",
    "{eater} is sharing {food} {place}",
)

_SKIES = ("blue", "gray", "dark", "clear", "cloudy", "orange", "pink")
_WEATHER = ("sunny", "raining", "snowing", "windy", "foggy", "cold", "hot", "stormy")
_TIMES = ("in the morning", "at noon", "in the evening", "at night", "today", "in winter", "in summer")
_WEATHER_FRAMES = (
    "it is {weather} {place} {time}",
    "the sky is {sky} {time}",
    "{a} {weather} day {place}",
    "{time} the weather is {weather} and the sky is {sky}",
)


# Draws allowed for one new sentence of a domain before the domain counts as exhausted.
_MAX_REDRAWS = 200


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _shapes(rng: random.Random) -> str:
    size, color, shape = _pick(rng, _SIZES), _pick(rng, _COLORS), _pick(rng, _SHAPES)
    form = rng.randrange(3)
    if form == 0:
        return f"{_pick(rng, _OPENERS)}{_article(size)} {size} {color} {shape} {_pick(rng, _POSITIONS)}"
    if form == 1:
        return f"{_pick(rng, _OPENERS)}{_article(color)} {color} {shape} {_pick(rng, _POSITIONS)}"
    color2, shape2 = _pick(rng, _COLORS), _pick(rng, _SHAPES)
    return f"{_article(color)} {color} {shape} {_pick(rng, _RELATIONS)} {_article(color2)} {color2} {shape2}"


def _counts(rng: random.Random) -> str:
    count, color, shape = _pick(rng, _COUNTS), _pick(rng, _COLORS), _pick(rng, _SHAPES)
    if rng.random() < 0.5:
        return f"{count} {color} {shape}s {_pick(rng, _ARRANGEMENTS)}"
    return f"{_pick(rng, _OPENERS)}{count} {shape}s, all of them {color}"


def _animals(rng: random.Random) -> str:
    adj, animal = _pick(rng, _ANIMAL_ADJ), _pick(rng, _ANIMALS)
    return _pick(rng, _ANIMAL_FRAMES).format(
        a=_article(adj or animal),
        adj=adj,
        animal=animal,
        action=_pick(rng, _ANIMAL_ACTIONS),
        place=_pick(rng, _OUTDOOR_PLACES),
    )


def _people(rng: random.Random) -> str:
    return _pick(rng, _PEOPLE_FRAMES).format(
        person=_pick(rng, _PEOPLE), activity=_pick(rng, _ACTIVITIES), place=_pick(rng, _PEOPLE_PLACES)
    )


def _vehicles(rng: random.Random) -> str:
    color = _pick(rng, _COLORS)
    return _pick(rng, _VEHICLE_FRAMES).format(
        a=_article(color),
        color=color, vehicle=_pick(rng, _VEHICLES), motion=_pick(rng, _MOTIONS), road=_pick(rng, _ROADS)
    )


def _rooms(rng: random.Random) -> str:
    color = _pick(rng, _COLORS)
    return _pick(rng, _ROOM_FRAMES).format(
        a=_article(color),
        color=color, item=_pick(rng, _FURNITURE), spot=_pick(rng, _ROOM_SPOTS), room=_pick(rng, _ROOMS)
    )


def _food(rng: random.Random) -> str:
    color = _pick(rng, _COLORS)
    return _pick(rng, _FOOD_FRAMES).format(
        a=_article(color),
        eater=_pick(rng, _EATERS),
        food=_pick(rng, _FOODS),
        color=color,
        place=_pick(rng, _PEOPLE_PLACES),
    )


def _weather(rng: random.Random) -> str:
    weather = _pick(rng, _WEATHER)
    return _pick(rng, _WEATHER_FRAMES).format(
        a=_article(weather),
        weather=weather, sky=_pick(rng, _SKIES), time=_pick(rng, _TIMES), place=_pick(rng, _OUTDOOR_PLACES)
    )


# domain name -> sentence sampler. Shapes get two entries (single/pair and counted): they are the vocabulary the
# tiny backbones' tokenizer knows best and the link to the generated image data.
DOMAINS: dict[str, Callable[[random.Random], str]] = {
    "shapes": _shapes,
    "counts": _counts,
    "animals": _animals,
    "people": _people,
    "vehicles": _vehicles,
    "rooms": _rooms,
    "food": _food,
    "weather": _weather,
}


def generate_sentences(num_sentences: int, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """``num_sentences`` unique sentences and their domain names, a deterministic function of ``seed``.

    Domains are visited round-robin (balanced topics) until one runs out of new sentences, then the others carry
    on; duplicates (case-insensitive) are re-drawn. Topics stay balanced up to about 8k sentences (the smallest
    domains hold about 1k each); the grammar yields about 190k in all, and asking for more raises a ``ValueError``.
    """
    if num_sentences < 0:
        raise ValueError(f"num_sentences must be >= 0, got {num_sentences}.")
    rng = random.Random(seed)
    active = list(DOMAINS)
    seen: set[str] = set()
    texts: list[str] = []
    domains: list[str] = []
    turn = 0
    while len(texts) < num_sentences:
        if not active:
            raise ValueError(
                f"The generated corpus holds only {len(texts)} unique sentences; {num_sentences} were requested."
            )
        name = active[turn % len(active)]
        for _ in range(_MAX_REDRAWS):
            sentence = " ".join(DOMAINS[name](rng).split())  # collapse the double spaces empty slots leave
            if rng.random() < 0.3:
                sentence = sentence[0].upper() + sentence[1:]
            if sentence.lower() not in seen:
                seen.add(sentence.lower())
                texts.append(sentence)
                domains.append(name)
                turn += 1
                break
        else:  # this domain is (nearly) exhausted: drop it from the rotation
            active.remove(name)
    return texts, domains


def make_text_corpus(num_train: int = 3000, num_eval: int = 300, *, seed: int = 0, text_column: str = TEXT_COLUMN):
    """The generated corpus as a ``datasets.DatasetDict`` with splits ``"train"`` and ``"eval"``.

    Columns: ``text_column`` (the sentence) and ``"domain"`` (its topic, for analysis). The two splits share no
    sentence; the held-out split measures generalisation of the distilled similarity structure.
    """
    import datasets

    if num_train < 1 or num_eval < 0:
        raise ValueError(f"num_train must be >= 1 and num_eval >= 0, got {num_train} and {num_eval}.")
    texts, domains = generate_sentences(num_train + num_eval, seed=seed)
    # Held-out rows are taken from the end: the round-robin order keeps both splits topic-balanced.
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({text_column: texts[:num_train], "domain": domains[:num_train]}),
            "eval": datasets.Dataset.from_dict({text_column: texts[num_train:], "domain": domains[num_train:]}),
        }
    )
