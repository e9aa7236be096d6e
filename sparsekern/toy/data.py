"""The toy model's vocabulary, tokenizer and synthetic tasks (IOI, palindromes, induction), all in code.

Words are space-separated tokens. ``ioi_prompts("train" | "test")`` split the name pairs so that the
test pairs never appear in training; ``held_out_template=True`` draws from ``HELD_OUT_TEMPLATES``,
combinations of template parts never seen in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BOS, PAD, UNK, EOS = "<bos>", "<pad>", "<unk>", "<eos>"
SPECIAL = [BOS, PAD, UNK, EOS]
NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah", "David", "Emma", "Paul", "Lisa",
         "Mark", "Kate", "Peter", "Laura", "Daniel", "Julia", "Simon", "Clara"]
PLACES = ["store", "park", "school", "garden", "station", "office", "beach", "market"]
OBJECTS = ["drink", "book", "ring", "kiss", "bone", "snack", "bag", "gift"]
DIGITS = [str(i) for i in range(10)]
SYMBOLS = [",", ".", "|", "="]
# IOI templates: A = indirect object (the answer), B = subject (repeated), P = place, O = object. Built
# from slots; every seventh (opener, middle, action) combination is held out of training.
_OPENERS = ["When", "After", "While", "Then ,", "Later ,", "Once"]
_MIDDLES = ["went to the {P}", "were at the {P}", "had a lot of fun at the {P}", "were working at the {P}",
            "got a {O} at the {P}", "met at the {P}"]
_ACTIONS = ["gave a {O} to", "handed a {O} to", "brought a {O} to", "decided to give it to",
            "threw a {O} to"]
_ALL_TEMPLATES = [f"{o} {{A}} and {{B}} {m} {sep} {{B}} {a}" for o in _OPENERS for m in _MIDDLES
                  for a in _ACTIONS for sep in [","]]
TEMPLATES = [t for i, t in enumerate(_ALL_TEMPLATES) if i % 7 != 3]
HELD_OUT_TEMPLATES = [t for i, t in enumerate(_ALL_TEMPLATES) if i % 7 == 3]
HELD_OUT_TEMPLATE = HELD_OUT_TEMPLATES[0]
_TEMPLATE_WORDS = sorted({w for t in _ALL_TEMPLATES for w in t.split() if "{" not in w})
# filler words for induction sequences (plus names, places, objects)
FILLER = ["red", "blue", "green", "cat", "dog", "tree", "car", "house", "sun", "moon", "fish", "bird"]


def vocabulary() -> list[str]:
    """The token list (index = token id); special tokens first."""
    seen, out = set(), []
    for w in SPECIAL + NAMES + PLACES + OBJECTS + DIGITS + SYMBOLS + _TEMPLATE_WORDS + FILLER:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_tokenizer(vocab: list[str]):
    """A word-level HF tokenizer (``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=10_000, clean_up_tokenization_spaces=False, add_bos_token=True,
        name_or_path="sparsekern-toy",
    )


@dataclass
class IOIPrompt:
    text: str  # without BOS
    io: str  # the answer (indirect object)
    s: str  # the subject (repeated name)
    order: str  # "ABBA" (IO first) or "BABA" (S first)
    template: int  # index into TEMPLATES, -1 for one of HELD_OUT_TEMPLATES


def _pairs(split: str) -> list[tuple[str, str]]:
    pairs = [(a, b) for a in NAMES for b in NAMES if a != b]
    rng = random.Random(1234)
    rng.shuffle(pairs)
    n_test = len(pairs) // 5  # 76 of 380 ordered pairs never appear in training
    test = pairs[:n_test]
    test_set = set(test) | {(b, a) for a, b in test}
    if split == "test":
        return test
    return [p for p in pairs if p not in test_set]


def ioi_prompts(split: str, n: int | None = None, seed: int = 0, held_out_template: bool = False):
    """IOI prompts with both name orders. ``split``: "train" or "test" (disjoint name pairs)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    pairs = _pairs(split)
    out = []
    i = 0
    while n is None and i < len(pairs) * 2 or n is not None and len(out) < n:
        io, s = pairs[(i // 2) % len(pairs)]
        order = "ABBA" if i % 2 == 0 else "BABA"
        if held_out_template:
            t, ti = rng.choice(HELD_OUT_TEMPLATES), -1
        else:
            ti = rng.randrange(len(TEMPLATES))
            t = TEMPLATES[ti]
        first, second = (io, s) if order == "ABBA" else (s, io)
        text = t.replace("{A}", first).replace("{B}", second, 1)
        text = text.replace("{B}", s).replace("{P}", rng.choice(PLACES)).replace("{O}", rng.choice(OBJECTS))
        out.append(IOIPrompt(text, io, s, order, ti))
        i += 1
    return out


def palindrome(rng: random.Random, min_len: int = 3, max_len: int = 8) -> str:
    """``d1 d2 ... dn | dn ... d1`` (digits, separator, reverse)."""
    d = [rng.choice(DIGITS) for _ in range(rng.randint(min_len, max_len))]
    return " ".join(d + ["|"] + d[::-1])


def induction(rng: random.Random, min_len: int = 5, max_len: int = 10) -> str:
    """Random words then the same words again."""
    pool = FILLER + NAMES + PLACES + OBJECTS
    w = [rng.choice(pool) for _ in range(rng.randint(min_len, max_len))]
    return " ".join(w + w)
