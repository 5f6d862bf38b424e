"""The Rust tokenizer's ids for ASCII text, at a fraction of its cost: pre-token words are tokenized once, remembered.

For a byte-level BPE tokenizer (GPT-2, Qwen, Llama 3, DeepSeek and the like) the ids of a text are: the ids of the
added tokens found in it (leftmost-longest, as its AddedVocabulary finds them) and, between them, the model's ids of
each pre-token word in turn (the pre-tokenizer's regex splits, byte-level mapped), with no state carried from one word
to the next. Words repeat (Zipf), so a dict from word to ids replaces almost every call into the tokenizer; what is
left per text is one regex split in Python's `re` and byte joins, several times faster than the Rust tokenizer's
`encode_batch`, which builds offsets, token strings and an Encoding object for every text.

Exactness is kept by restricting the fast path to what can be done identically, and handing everything else to the
Rust tokenizer (`encode_batch`):
* text: ASCII only. The pre-tokenizer's `\\p{L}`, `\\p{N}`, `\\s` ... have the same ASCII members in every Unicode
  version and in both regex engines (Oniguruma there, `re` here); any other text goes to the Rust tokenizer.
* tokenizer: normalizer none or a Unicode normal form (the identity on ASCII); pre-tokenizer ByteLevel without
  prefix space, alone or after Split(regex, Isolated) steps; model without dropout; added tokens that strip no
  whitespace and need no word boundary (a text containing one that does goes to the Rust tokenizer).
* the regexes: each is rewritten for ASCII text (`\\p{L}` → its ASCII letters) and checked, when this object is
  built, against the tokenizer's own pre-tokenizer on a set of probe strings; any difference and there is no fast
  path. A text its regex does not cover end to end, or covers with an empty match, goes to the Rust tokenizer.
The ids of a word not seen before come from the model itself (`model.tokenize` on its byte-level form), the same call
the Rust pipeline makes for it.
"""

from __future__ import annotations

import json
import logging
import random
import re
import struct
import unicodedata
from array import array
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("finetune_trainer.data")

__all__ = ["WordCache", "pack_ids"]

# The ByteLevel pre-tokenizer's own regex (use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Pre-tokenizer regexes none of whose matches holds a non-space followed by a space (every alternative is whitespace
# only, or has a space at most as its first character, and looks no further than the character after its match):
# GPT-2's, Llama 3's, Qwen 2's and o200k's. In a text where no space follows whitespace, a word then begins at each
# space, so the text splits at its spaces into stretches whose words are the words of the whole, and a stretch
# (" " and a word or two, mostly) can be remembered with its ids.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (  # Qwen 2 and 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPACE_SPLIT_PATTERNS = frozenset({GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, O200K_PATTERN})
_space_after_whitespace = re.compile(r"\s ", re.ASCII).search
ASCII = tuple(chr(c) for c in range(128))
# Stands in for an empty set of ASCII characters inside a character class: no ASCII text contains it.
NO_ASCII = "\\uffff"
# Unicode general categories (a \p{...} name of another kind disables the fast path).
CATEGORIES = frozenset(("L", "M", "N", "P", "S", "Z", "C", "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl"))
CATEGORIES |= frozenset(("No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp"))
CATEGORIES |= frozenset(("Cc", "Cf", "Cs", "Co", "Cn"))
# Stretches of text between added tokens up to this long are remembered whole (the template's own text, mostly).
SHORT_SPAN = 48
MAX_SPANS = 1 << 16
NORMAL_FORMS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})
# Remembered words at most; past it the cache starts over (a few hundred MB at most for long words).
MAX_WORDS = 1 << 20
# Escapes that mean the same in Oniguruma (Ruby syntax) and Python's re with re.ASCII, for ASCII text.
SAME_ESCAPES = frozenset("sSdDwWbBrntfv\\.^$|?*+()[]{}-/'\"#&~ ,:;!=<>@%`_")


def pack_ids(ids: Sequence[int]) -> bytes:
    """Token ids as native int32 bytes (the layout every encoded piece has here)."""
    return array("i", ids).tobytes()


def _byte_level_table() -> dict[int, str]:
    """GPT-2's bytes_to_unicode for the ASCII bytes, as a str.translate table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return {b: mapping[b] for b in range(128)}


BYTE_LEVEL = _byte_level_table()


def _category_members(name: str) -> str | None:
    """The ASCII characters of Unicode general category `name` (L, Lu, N, P, Zs ...), or None for other names."""
    if name not in CATEGORIES:
        return None  # scripts, binary properties, long names: not worth the doubt
    return "".join(c for c in ASCII if unicodedata.category(c).startswith(name))


def _class_text(members: str) -> str:
    return "".join(f"\\x{ord(c):02x}" for c in members) or NO_ASCII


def ascii_pattern(pattern: str) -> str | None:
    """`pattern` (Oniguruma syntax, as tokenizers writes it) for Python's re on ASCII text, or None if unsure."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            escape = pattern[i + 1 : i + 2]
            if escape in ("p", "P"):
                if pattern[i + 2 : i + 3] == "{":
                    end = pattern.find("}", i + 3)
                    if end < 0:
                        return None
                    name, i = pattern[i + 3 : end], end + 1
                else:
                    name, i = pattern[i + 2 : i + 3], i + 3
                negated = escape == "P"
                if name.startswith("^"):
                    negated, name = not negated, name[1:]
                members = _category_members(name)
                if members is None:
                    return None
                if negated:
                    members = "".join(c for c in ASCII if c not in members)
                body = _class_text(members)
                out.append(body if in_class else f"[{body}]")
                continue
            if escape == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", pattern[i + 2 : i + 4]):
                out.append(pattern[i : i + 4])
                i += 4
                continue
            if escape == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", pattern[i + 2 : i + 6]):
                out.append(pattern[i : i + 6])
                i += 6
                continue
            if not escape or escape not in SAME_ESCAPES:
                return None  # \A, \z, \h, \R, \K, \G, back-references ...: not worth the doubt
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if char == "[" or pattern[i : i + 2] in ("&&", "--", "~~", "||"):
                return None  # nested classes and set operations (Oniguruma) have no equivalent in re
            if char == "]":
                in_class = False
        elif char == "[":
            in_class = True
            start = i + 2 if pattern[i + 1 : i + 2] == "^" else i + 1
            if pattern[start : start + 1] == "]":
                return None  # a leading "]" is literal in one engine and not in the other
            out.append(pattern[i:start])
            i = start
            continue
        elif char in "^$":
            return None  # line anchors in Oniguruma's Ruby syntax, string anchors in re
        out.append(char)
        i += 1
    return None if in_class else "".join(out)


def _compile(pattern: str) -> re.Pattern[str] | None:
    """`pattern` compiled for ASCII text, if it has no groups and never matches empty; else None."""
    translated = ascii_pattern(pattern)
    if translated is None:
        return None
    try:
        compiled = re.compile(translated, re.ASCII)
    except re.error:
        return None
    if compiled.groups:
        return None  # findall would return groups, not matches
    if _min_width(translated) == 0:
        return None  # it can match the empty string somewhere: the two engines step past that differently
    return compiled


def _min_width(pattern: str) -> int:
    """The fewest characters a match of `pattern` spans (0 when unknown)."""
    try:
        from re import _parser  # type: ignore[attr-defined]

        return int(_parser.parse(pattern, re.ASCII).getwidth()[0])
    except Exception:
        return 0


def _isolated(pattern: re.Pattern[str], text: str) -> list[str]:
    """The matches of `pattern` and the gaps between them, in order (Split with behavior Isolated)."""
    out: list[str] = []
    done = 0
    for match in pattern.finditer(text):
        start, end = match.span()
        if start > done:
            out.append(text[done:start])
        out.append(match.group())
        done = end
    if done < len(text):
        out.append(text[done:])
    return out


def _spec(component: Any) -> Any:
    """A tokenizer component (normalizer, pre-tokenizer) as its JSON, or None."""
    if component is None:
        return None
    try:
        return json.loads(component.__getstate__())
    except (AttributeError, TypeError, ValueError):
        raise UnsupportedError(f"cannot read {type(component).__name__}") from None


class UnsupportedError(Exception):
    """The tokenizer's pipeline is not one WordCache reproduces; the Rust tokenizer does everything."""


class WordCache:
    """Ids of texts for one Rust tokenizer (a `tokenizers.Tokenizer`), the same as its `encode_batch` gives
    (add_special_tokens=False); see the module docstring. Build with `WordCache.build`, which returns None for a
    tokenizer whose pipeline this cannot reproduce.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        if getattr(backend, "encode_special_tokens", False):
            raise UnsupportedError("encode_special_tokens is set")
        # Each part on its own (the whole tokenizer as JSON is megabytes for a real vocabulary).
        self._check_normalizer(_spec(backend.normalizer))
        patterns = self._patterns(_spec(backend.pre_tokenizer))
        if getattr(backend.model, "dropout", None) not in (None, 0, 0.0):
            raise UnsupportedError("BPE dropout")
        splits: list[re.Pattern[str]] = []
        for pattern in patterns:
            compiled = _compile(pattern)
            if compiled is None:
                raise UnsupportedError(f"pre-tokenizer regex {pattern!r}")
            splits.append(compiled)
        self.splits = splits
        self.space_split = len(patterns) == 1 and patterns[0] in SPACE_SPLIT_PATTERNS
        self.model = backend.model
        raw: dict[str, int] = {}
        normalized: dict[str, int] = {}
        self.stripping: tuple[str, ...] = ()
        for token_id, token in backend.get_added_tokens_decoder().items():
            content = token.content
            if token.single_word or token.lstrip or token.rstrip:
                self.stripping += (content,)
            elif content.isascii():  # others cannot occur in ASCII text
                (normalized if token.normalized else raw)[content] = token_id
        self.added = {content: struct.pack("i", i) for content, i in {**normalized, **raw}.items()}
        # Two passes, as the AddedVocabulary does: tokens matched on the raw text, then on the normalized rest.
        self.split_raw = self._splitter(raw)
        self.split_normalized = self._splitter(normalized)
        self.words: dict[str, bytes] = {}
        self.spans: dict[str, bytes] = {}
        self.heads: dict[str, bytes] = {}  # a text's stretch before its first space
        self.spaced: dict[str, bytes] = {}  # a stretch after a space (the key without the space)
        self._check_probes()

    @classmethod
    def build(cls, backend: Any) -> WordCache | None:
        try:
            return cls(backend)
        except UnsupportedError as exc:
            log.debug("tokenizing with the Rust tokenizer only: %s", exc)
            return None

    @staticmethod
    def _check_normalizer(normalizer: Any) -> None:
        if normalizer is None:
            return
        if normalizer.get("type") == "Sequence":
            for step in normalizer.get("normalizers") or []:
                WordCache._check_normalizer(step)
            return
        if normalizer.get("type") not in NORMAL_FORMS:
            raise UnsupportedError(f"normalizer {normalizer.get('type')}")

    @staticmethod
    def _patterns(pre: Any) -> list[str]:
        """The regexes the pre-tokenizer splits with (each step Isolated), in order; it must end byte-level."""
        steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre]
        patterns: list[str] = []
        for index, step in enumerate(steps):
            kind = step.get("type") if step else None
            if kind == "ByteLevel" and index == len(steps) - 1:
                if step.get("add_prefix_space"):
                    raise UnsupportedError("ByteLevel with add_prefix_space")
                if step.get("use_regex", True):
                    patterns.append(GPT2_PATTERN)
                return patterns
            if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
                pattern = step.get("pattern") or {}
                if "Regex" in pattern:
                    patterns.append(pattern["Regex"])
                elif pattern.get("String"):
                    patterns.append(re.escape(pattern["String"]))
                else:
                    raise UnsupportedError("Split pattern")
                continue
            raise UnsupportedError(f"pre-tokenizer {kind}")
        raise UnsupportedError("no byte-level pre-tokenizer")

    @staticmethod
    def _splitter(tokens: dict[str, int]) -> Callable[[str], list[str]] | None:
        if not tokens:
            return None
        # Longest first: at the leftmost match the longest token wins, as aho-corasick's leftmost-longest.
        alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
        return re.compile(f"({alternatives})").split

    def _words(self, text: str) -> list[str]:
        """The pre-token words of `text` (no added tokens in it)."""
        words = [text]
        for pattern in self.splits:
            found: list[str] = []
            for word in words:
                parts = pattern.findall(word)
                if sum(map(len, parts)) != len(word):
                    parts = _isolated(pattern, word)  # with the gaps between matches, each a word of its own
                found += parts
            words = found
        return words

    def _learn(self, words: list[str]) -> None:
        known = self.words
        if len(known) > MAX_WORDS:
            known.clear()
        tokenize = self.model.tokenize
        for word in words:
            if word not in known:
                known[word] = pack_ids([token.id for token in tokenize(word.translate(BYTE_LEVEL))])

    def _regex_ids(self, text: str) -> bytes:
        """The ids of a stretch of text without added tokens, split into words by the regexes."""
        if len(self.splits) == 1:
            pattern = self.splits[0]
            words = pattern.findall(text)
            if sum(map(len, words)) != len(text):
                words = _isolated(pattern, text)
        else:
            words = self._words(text)
        try:
            return b"".join(map(self.words.__getitem__, words))
        except KeyError:
            self._learn(words)
            return b"".join(map(self.words.__getitem__, words))

    def _stretch_ids(self, text: str) -> bytes:
        """The ids of a text without added tokens and without a space after whitespace, stretch by stretch."""
        stretches = text.split(" ")
        head = stretches[0]
        rest = stretches[1:]
        spaced = self.spaced
        try:
            ids = b"".join(map(spaced.__getitem__, rest))
        except KeyError:
            if len(spaced) > MAX_WORDS:
                spaced.clear()
            for stretch in rest:
                if stretch not in spaced:
                    spaced[stretch] = self._regex_ids(" " + stretch)
            ids = b"".join(map(spaced.__getitem__, rest))
        if not head:
            return ids
        first = self.heads.get(head)
        if first is None:
            if len(self.heads) > MAX_WORDS:
                self.heads.clear()
            first = self.heads[head] = self._regex_ids(head)
        return first + ids

    def _span(self, text: str) -> bytes:
        """The ids of a non-empty stretch of text without added tokens."""
        ids = self.spans.get(text)
        if ids is not None:
            return ids
        if self.space_split and _space_after_whitespace(text) is None:
            ids = self._stretch_ids(text)
        else:
            ids = self._regex_ids(text)
        if len(text) <= SHORT_SPAN and len(self.spans) < MAX_SPANS:
            self.spans[text] = ids  # the template's own text between its tokens, mostly
        return ids

    def _fast(self, text: str) -> bytes | None:
        """The ids of `text` as int32 bytes, or None when the Rust tokenizer must do it."""
        if not text.isascii():
            return None
        if self.stripping and any(token in text for token in self.stripping):
            return None
        split_raw, split_normalized = self.split_raw, self.split_normalized
        if split_raw is None and split_normalized is None:
            return self._span(text) if text else b""
        span, added = self._span, self.added
        out: list[bytes] = []
        for index, part in enumerate(split_raw(text) if split_raw is not None else (text,)):
            if index & 1:
                out.append(added[part])
            elif not part:
                continue
            elif split_normalized is None:
                out.append(span(part))
            else:
                for position, piece in enumerate(split_normalized(part)):
                    if position & 1:
                        out.append(added[piece])
                    elif piece:
                        out.append(span(piece))
        return b"".join(out)

    def encode(self, texts: Sequence[str]) -> list[bytes]:
        """The ids of each text as int32 bytes: the fast path where it applies, else one `encode_batch`."""
        out: list[bytes | None] = [self._fast(text) for text in texts]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            encoded = self.backend.encode_batch([texts[i] for i in rest], add_special_tokens=False)
            for i, encoding in zip(rest, encoded, strict=True):
                out[i] = pack_ids(encoding.ids)
        return out  # type: ignore[return-value]  # every None was replaced

    # --- the check against the tokenizer itself ------------------------------------------------------------

    def _check_probes(self) -> None:
        """Compare the word split with the pre-tokenizer itself on probe texts; UnsupportedError on a difference."""
        pre = self.backend.pre_tokenizer
        if pre is None:
            raise UnsupportedError("no pre-tokenizer")
        for text in probe_texts():
            words = self._words(text)
            theirs = [word for word, _ in pre.pre_tokenize_str(text)]
            ours = [word.translate(BYTE_LEVEL) for word in words]
            if ours != theirs:
                raise UnsupportedError(f"pre-tokenizer differs on {text!r}: {theirs} here {ours}")
            if self.space_split and _space_after_whitespace(text) is None:
                head, *rest = text.split(" ")
                stretched = self._words(head) if head else []
                for stretch in rest:
                    stretched += self._words(" " + stretch)
                if stretched != words:
                    log.debug("not splitting at spaces: the words of %r differ", text)
                    self.space_split = False

    def check(self, texts: Sequence[str]) -> bool:
        """Whether the fast path gives the Rust tokenizer's ids for these texts (a spot check on real data)."""
        fast = [(text, ids) for text in texts if (ids := self._fast(text)) is not None]
        if not fast:
            return True
        encoded = self.backend.encode_batch([text for text, _ in fast], add_special_tokens=False)
        for (text, ids), encoding in zip(fast, encoded, strict=True):
            if ids != pack_ids(encoding.ids):
                log.warning("tokenizing with the Rust tokenizer only: the word cache differs on %r", text[:200])
                return False
        return True


PROBES = (
    "Hello world, how are you? I'm fine; you're 'right' -- isn't it?",
    "'s 'S 't 'T 're 'RE 've 'Ve 'm 'M 'll 'LL 'd 'D ''s x's X'S",
    "a  b   c\td \t e\n\nf \n g\r\nh\r\n\r\n i \x0b\x0cj",
    "  leading and trailing  ",
    "\n\n\n",
    "   ",
    "numbers 1 12 123 1234 12345 123456 1234567 3.14159 -42 +7 1e10 0x1F",
    "code: def f(x):\n    return x**2  # comment\n\tif (a && b) || !c { y[0] = {'k': \"v\"}; }",
    "punctuation!!! ??? ... --- *** ((( ))) [[[ ]]] {{{ }}} <<< >>> ~~~ ``` @@@ ### $$$ %%% ^^^ &&& ___",
    "MiXeD CaSe WORDS and camelCase and snake_case and kebab-case and URLs http://example.com/a?b=c&d=e",
    "tabs\tand\ttabs\t\t\tand spaces   \t  mixed \t\n\t\n",
    "end with space ",
    "end with newline\n",
    " start with space",
    "\nstart with newline",
    "a\rb\r\rc",
)


def probe_texts() -> list[str]:
    """Fixed probe texts and random ASCII strings weighted towards the characters regexes treat specially."""
    rng = random.Random(0)
    alphabet = (
        list(" \n\r\t") * 6 + list("aAzZeE") * 3 + list("0123456789") + list("'") * 4 + list(".,;:!?-_()[]{}<>'\"")
    ) + list(ASCII)
    texts = list(PROBES)
    for _ in range(300):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))))
    words = ["the", "The", "THE", "s", "ll", "don", "I", "x1", "42", "2024", "  ", "\n", " ", "'", "''", "...", "\t"]
    for _ in range(100):
        texts.append("".join(rng.choice(words) + rng.choice(["", " ", "'", "\n", "  "]) for _ in range(8)))
    return texts
