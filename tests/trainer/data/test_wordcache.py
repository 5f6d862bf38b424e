# ruff: noqa: RUF001
"""The word cache gives the Rust tokenizer's own ids, text for text, for every pipeline it takes on, and declines the
others (then the Rust tokenizer does everything, as before).

Each case builds a small byte-level BPE tokenizer with the pre-tokenizer of a model family (GPT-2, Llama 3, Qwen 2
with its NFC normalizer, o200k, a digit split before GPT-2's), with special, normal and whitespace-stripping added
tokens, and compares `WordCache.encode` with `encode_batch` on text made to trip a regex: contractions in any case,
runs of spaces, tabs and newlines, digits, code, punctuation, added tokens inside words, non-ASCII text.
"""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from finetune_trainer.data.conversation import Conversation, Turn
from finetune_trainer.data.encode import Encoder, Masking
from finetune_trainer.data.templates import get_template
from finetune_trainer.data.wordcache import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    O200K_PATTERN,
    QWEN2_PATTERN,
    WordCache,
    ascii_pattern,
    pack_ids,
    probe_texts,
)

CORPUS = [
    "Hello world, how are you today? I'm fine, thank you. It's 2024 and we've got 12345 reasons.",
    "def f(x):\n    return x ** 2  # square\n\tif (a && b) || !c { y[0] = {'k': \"v\"}; }\r\n",
    "The QUICK brown fox JUMPS over the lazy dog; DON'T you THINK so? They'LL see. 3.14159 -42 +7",
    "今天天气很好。你好！🙂 🐍 café naïve résumé",
    "  indented\n\n\n  lines   with    spaces\t\ttabs  ",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _split(pattern: str) -> Any:
    """A model family's pre-tokenizer: its regex, then byte-level without the GPT-2 regex."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


PIPELINES: dict[str, Any] = {  # pre-tokenizer and normalizer
    "gpt2": (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False), None),
    "llama3": (lambda: _split(LLAMA3_PATTERN), None),
    "qwen2": (lambda: _split(QWEN2_PATTERN), normalizers.NFC),
    "o200k": (lambda: _split(O200K_PATTERN), None),
    "digits+gpt2": (
        lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
        None,
    ),
}


def tokenizer(pipeline: str) -> Any:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    pre_tokenizer, normalizer = PIPELINES[pipeline]
    backend.pre_tokenizer = pre_tokenizer()
    if normalizer is not None:
        backend.normalizer = normalizer()
    backend.add_tokens([AddedToken("[tool]", normalized=True), AddedToken("<think>", normalized=False)])
    backend.add_special_tokens([AddedToken("<|stripped|>", lstrip=True, rstrip=True, special=True)])
    return backend


def texts() -> list[str]:
    rng = random.Random(7)
    words = [
        *("the", "The", "THE", "it's", "IT'S", "I'M", "you'll", "We'VE", "'s", "'d", "''", "'", "7", "42", "2024"),
        *("1234567", "x1", "3.5", "--", "...", "?!", "(", ")", "{", "}", "#", "$"),
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "[tool]", "<think>", "<|stripped|>", "<|im_end",
        "é", "中文", "🙂",
    ]  # fmt: skip
    gaps = ["", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\t", " \t ", "\r\n", "'"]
    made = ["".join(rng.choice(words) + rng.choice(gaps) for _ in range(rng.randint(1, 30))) for _ in range(400)]
    chat = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat's 2+2?<|im_end|>\n",
        "<|im_start|>assistant\nIt's 4.<|im_end|>\n",
        "a<|im_end|>b<|im_start|>c<|endoftext|><|endoftext|>",
        "<think>\n\n</think>\n\nHello [tool] call",
        "trailing space ",
        " ",
        "",
    ]
    return [*CORPUS, *chat, *probe_texts(), *made]


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_the_word_cache_gives_the_rust_tokenizers_ids(pipeline: str) -> None:
    backend = tokenizer(pipeline)
    cache = WordCache.build(backend)
    assert cache is not None
    assert cache.space_split == (pipeline != "digits+gpt2")
    sample = texts()
    fast = sum(cache._fast(text) is not None for text in sample)
    assert fast > 0.6 * len(sample)  # the others (non-ASCII, a stripping token) go to the Rust tokenizer
    expected = [pack_ids(e.ids) for e in backend.encode_batch(sample, add_special_tokens=False)]
    for _ in range(2):  # cold, then with every word remembered
        got = cache.encode(sample)
        assert [text for text, a, b in zip(sample, got, expected, strict=True) if a != b] == []
    assert cache.check(sample)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)), "prefix space"),
        (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace()), "not byte-level"),
        (lambda t: setattr(t, "pre_tokenizer", None), "no pre-tokenizer"),
        (lambda t: setattr(t, "normalizer", normalizers.Lowercase()), "a normalizer that changes ASCII"),
        (lambda t: setattr(t, "model", models.BPE(dropout=0.5)), "BPE dropout"),
        (
            lambda t: setattr(t, "pre_tokenizer", _split(r"^\w+")),
            "a line anchor",
        ),
        (
            lambda t: setattr(t, "pre_tokenizer", _split(r"\w*")),
            "a regex that matches the empty string",
        ),
        (
            lambda t: setattr(t, "pre_tokenizer", _split(r"\p{Han}+")),
            "a script property",
        ),
    ],
)
def test_pipelines_it_cannot_reproduce_are_left_to_the_rust_tokenizer(change: Any, why: str) -> None:
    backend = tokenizer("gpt2")
    change(backend)
    assert WordCache.build(backend) is None, why


def test_regexes_are_rewritten_for_ascii_text_or_not_at_all() -> None:
    letters = ascii_pattern(r"\p{L}+")
    assert letters is not None
    ascii = "".join(map(chr, range(128)))
    assert re.findall(letters, ascii, re.ASCII) == ["ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"]
    assert ascii_pattern(r"[^\p{Lo}]") == r"[^\uffff]"  # no ASCII letter is Lo: the negation is every character
    assert ascii_pattern(GPT2_PATTERN) is not None
    for doubtful in (r"^a", r"a$", r"\Aa", r"a\z", r"\h", r"[a-z&&[^aeiou]]", r"[]a]", r"\p{Greek}", r"(a)\1"):
        assert ascii_pattern(doubtful) is None, doubtful


def test_the_encoder_keeps_to_the_rust_tokenizer_when_the_word_cache_fails_its_spot_check(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = Conversation((Turn("user", "Add 2 and 3."), Turn("assistant", "It's 5.")), system="Be brief.")
    template = get_template("qwen", tokenizer)
    rendered = [template.render(conversation)]
    right = Encoder(tokenizer, Masking(512), template)(rendered)
    assert Encoder(tokenizer, Masking(512), template).words is not None
    monkeypatch.setattr(WordCache, "_fast", lambda self, text: b"")  # wrong ids for every text
    encoder = Encoder(tokenizer, Masking(512), template)
    got = encoder(rendered)
    assert encoder.words is None
    assert got.input_ids.tolist() == right.input_ids.tolist()
    assert got.labels.tolist() == right.labels.tolist()
