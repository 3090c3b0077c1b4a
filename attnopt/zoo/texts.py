"""Real English sentences, and corpora of varied lengths built from them deterministically, for the
demo, the client tests and the benchmarks that feed MiniLM (and sentence-transformers) real text.

Entry points: :data:`TEXTS` (short sentences on everyday topics), :data:`LONGER_TEXTS` (longer
sentences), :func:`varied_texts` (``count`` texts whose lengths, in tokens of a given tokenizer,
are spread evenly over a range), :func:`python_docs_texts` (480 texts of one domain with natural
lengths, for the budgeted search's calibration and validation).
"""

from __future__ import annotations

import random
from typing import Any

TEXTS = [
    "A compiler that finds attention in any model and rewrites it.",
    "The cat sat quietly on the warm windowsill all afternoon.",
    "Stock markets rallied after the central bank held interest rates steady.",
    "She trained for months before running her first marathon in Berlin.",
    "Transformers process every token of a sentence in parallel.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain is expected across the northern coast this weekend.",
    "He forgot his umbrella again, so he arrived at work soaked.",
    "Quantum computers exploit superposition to explore many states at once.",
    "The museum reopened its ancient Egypt gallery after a long renovation.",
    "Please restart the router if the connection keeps dropping.",
    "A good night's sleep improves memory and concentration.",
    "The orchestra tuned their instruments before the overture began.",
    "Electric cars are becoming cheaper to buy and to run.",
    "Our flight was delayed by three hours because of fog.",
    "The library offers free language classes on Tuesday evenings.",
    "Bees communicate the location of flowers with a waggle dance.",
    "Volcanic ash grounded flights across much of Europe in 2010.",
    "The new smartphone has a larger battery and a faster processor.",
    "Children learn languages more easily than most adults do.",
    "The committee will publish its final report next spring.",
    "Fresh basil makes a simple tomato sauce taste wonderful.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "The bridge was closed for repairs after the earthquake.",
    "Reading before bed helps many people relax and fall asleep.",
    "The football match ended in a dramatic penalty shootout.",
    "Solar panels on the roof now cover most of the house's electricity.",
    "The detective noticed a tiny scratch on the window frame.",
    "Regular exercise lowers the risk of heart disease.",
    "The startup raised new funding to expand into Asia.",
    "Snow covered the mountain village for most of the winter.",
    "Attention mechanisms let a model weigh the relevance of each word.",
]

LONGER_TEXTS = [
    "After years of negotiation, the two neighbouring towns finally agreed to share a single "
    "water treatment plant, which is expected to cut costs for residents of both.",
    "The old lighthouse keeper kept a diary of every storm he witnessed, and historians now use "
    "it to study how the coastline changed over half a century.",
    "Researchers found that students who explained a problem aloud to a classmate remembered "
    "the solution better a week later than those who only read it.",
    "When the power went out across the city, neighbours gathered in the square with candles, "
    "guitars and whatever food would not keep until morning.",
    "The hospital introduced a new scheduling system that lets patients book, move or cancel "
    "appointments online without waiting on the phone.",
    "Farmers in the valley are switching to drought-resistant varieties of wheat as the summers "
    "grow longer and the rivers run lower each year.",
    "Her first novel, written at night after shifts at the bakery, was rejected by eleven "
    "publishers before it became an unexpected bestseller.",
    "The train line through the mountains reopened after engineers reinforced three tunnels and "
    "replaced a bridge that had been damaged by a landslide.",
    "Most of the energy a data centre consumes ends up as heat, and some cities now pipe that "
    "heat into homes and swimming pools nearby.",
    "The museum's restorers spent two years removing layers of varnish and grime to reveal the "
    "bright colours the painter had originally used.",
    "Commuters who cycle to work report lower stress levels, although many say that safer "
    "junctions would persuade more of their colleagues to join them.",
    "A small change to the search ranking, tested on a fraction of users for a month, turned out "
    "to improve the results for almost every kind of query.",
    "The volunteers counted more than four hundred species of birds during the weekend survey, "
    "including a pair of owls that had not been seen there for decades.",
    "Because the recipe had been passed down orally, each branch of the family remembered the "
    "spices differently and argued about it at every holiday dinner.",
    "The software update fixed the battery drain that many owners had complained about, but it "
    "also removed a setting that some of them relied on.",
    "Long before satellites, sailors crossed oceans by measuring the angle of the sun at noon "
    "and keeping careful track of their speed and heading.",
]


def varied_texts(
    tokenizer: Any,
    count: int,
    min_tokens: int = 5,
    max_tokens: int = 256,
    seed: int = 0,
) -> list[str]:
    """``count`` texts of real sentences whose lengths are spread evenly over a token range.

    Each text is a run of sentences from :data:`TEXTS` and :data:`LONGER_TEXTS` in a seeded random
    order, cut at a token boundary so that the tokenizer (with its special tokens) gives it about
    its target length; the targets are evenly spaced over ``[min_tokens, max_tokens]`` and
    shuffled. Deterministic for a given tokenizer and seed.

    Args:
        tokenizer: a fast Hugging Face tokenizer (offsets are used to cut the text), e.g.
            :func:`attnopt.zoo.minilm_tokenizer`.
        count: number of texts.
        min_tokens: shortest target length, special tokens included.
        max_tokens: longest target length, special tokens included.
        seed: the seed of the order of sentences and of targets.

    Returns:
        The texts, in the shuffled order of their targets.
    """
    if count < 1 or not 3 <= min_tokens <= max_tokens:
        raise ValueError("need count >= 1 and 3 <= min_tokens <= max_tokens")
    rng = random.Random(seed)
    specials = len(tokenizer("")["input_ids"])
    span = max_tokens - min_tokens
    targets = [min_tokens + (span * i) // max(count - 1, 1) for i in range(count)]
    rng.shuffle(targets)
    pool = TEXTS + LONGER_TEXTS
    texts = []
    for target in targets:
        content = max(target - specials, 1)
        sentences: list[str] = []
        while True:
            sentences.append(rng.choice(pool))
            text = " ".join(sentences)
            # Tokenize once the text is likely long enough (English averages over 4 characters
            # a WordPiece token); a text that turns out longer is cut below anyway.
            if len(text) < 4 * content:
                continue
            encoded = tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
            if len(encoded["input_ids"]) >= content:
                break
        texts.append(text[: encoded["offset_mapping"][content - 1][1]])
    return texts


def python_docs_texts() -> list[str]:
    """480 real English texts of one domain: docstrings of Python standard-library modules,
    classes and functions (PSF license), whitespace collapsed, at least 12 words each, in a
    fixed shuffled order (a snapshot in ``attnopt/zoo/data/python_docs.json``, so every Python
    version reads the same texts). Their lengths vary naturally: about 80 MiniLM tokens on
    average, a tenth over 190, a few over 256.

    Returns:
        The texts, in the snapshot's order (the budgeted-search benchmark takes the first 64
        for calibration and the next 256 for validation).
    """
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent / "data" / "python_docs.json"
    return list(json.loads(path.read_text())["texts"])
