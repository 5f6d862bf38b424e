"""Chat templates: a Conversation → the pieces of each message, to be tokenized piece by piece as LLaMA-Factory does.

Named templates are LLaMA-Factory's, by its names, built from its registry transcribed as data (lf_templates.py):
each message is a list of slots (text with `{{content}}`, a named token, the tokenizer's BOS or EOS), and every text
piece is tokenized on its own, so the ids are the ones LLaMA-Factory's `Template._encode` gives. A template the
tokenizer contradicts (a named or `<|...|>` token, or the EOS it needs, that it lacks) is refused. `auto` renders
with the tokenizer's own Jinja chat_template instead (see AutoTemplate).

A rendering is `Rendered.messages`: prompt and response pieces alternating, one pair per model turn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, replace
from typing import Any, Protocol

from finetune_trainer.data import tools as toolfmt
from finetune_trainer.data.conversation import MODEL_ROLES, Conversation, Turn
from finetune_trainer.data.lf_templates import TEMPLATES as LF_TEMPLATES
from finetune_trainer.errors import ConfigError

# LLaMA-Factory's templates that run on text; the others need the model's image processor even for text.
NAMED_TEMPLATES: tuple[str, ...] = tuple(sorted(name for name, spec in LF_TEMPLATES.items() if spec["text_only"]))
MARKUP = re.compile(r"<\|[^<>|\s]{1,40}\|>")
# LLaMA-Factory's default (data_args.enable_thinking); reasoning templates then train an empty thought block
# on answers that carry none.
ENABLE_THINKING = True

Piece = str | int  # text tokenized on its own, or one token id


@dataclass(frozen=True)
class Rendered:
    """A conversation as prompt/response messages, alternating (prompt first); each a tuple of pieces."""

    messages: tuple[tuple[Piece, ...], ...]


class RenderError(Exception):
    """This conversation cannot be rendered by the template; it is dropped with this reason."""


class ChatTemplate(Protocol):
    name: str
    eos_token_id: int | None
    efficient_eos: bool
    special_tokens: tuple[str, ...]  # tokens the encoder must treat as special (LLaMA-Factory adds them)

    def render(self, conversation: Conversation) -> Rendered: ...

    def fingerprint(self) -> str:
        """Everything that decides the rendered pieces, for the tokenized-data cache key."""
        ...


def special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special tokens, longest first (so `endswith` finds <|im_end|> before a shorter token)."""
    names = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            names.add(str(token))
    return tuple(sorted((n for n in names if n), key=len, reverse=True))


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` in the vocabulary, or None. Id 0 is an id like any other."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(found)


# --- named templates (LLaMA-Factory's) --------------------------------------------------------------------------


SLOT_KEYS = ("prefix", "system", "user", "assistant", "observation", "function", "tools")


def _compile(slots: list[Any] | None, ids: dict[str, int | None]) -> tuple[Piece, ...]:
    """A template's slots with named tokens resolved to ids (a BOS/EOS slot the tokenizer lacks left out)."""
    out: list[Piece] = []
    for slot in slots or []:
        if isinstance(slot, str):
            if slot:
                out.append(slot)
        elif "token" in slot:
            found = ids[slot["token"]]
            assert found is not None  # checked when the template was built
            out.append(found)
        elif (special := ids.get(slot["special"])) is not None:
            out.append(special)
    return tuple(out)


def _fill(slots: tuple[Piece, ...], content: str, idx: str | None = None) -> list[Piece]:
    """Slots with `{{content}}` (then `{{idx}}`) replaced, the first occurrence of each, as LLaMA-Factory's
    StringFormatter does: so `{{idx}}` written in the content is replaced where the slot has none before it.
    """
    out: list[Piece] = []
    for slot in slots:
        if slot.__class__ is str:
            slot = slot.replace("{{content}}", content, 1)  # type: ignore[union-attr]
            if idx is not None:
                slot = slot.replace("{{idx}}", idx, 1)  # type: ignore[union-attr]
            if not slot:
                continue
        out.append(slot)
    return out


class NamedTemplate:
    """One of LLaMA-Factory's templates, checked against the tokenizer when built."""

    def __init__(self, name: str, tokenizer: Any, *, mask_history: bool = False) -> None:
        spec = LF_TEMPLATES[name]
        self.name = name
        self.spec = spec
        self.kind: str = spec["kind"]
        self.efficient_eos: bool = spec["efficient_eos"]
        # LLaMA-Factory drops the thoughts of earlier turns when it trains on the last one only.
        self.discard_history_thoughts = mask_history and self.kind in ("reasoning", "glm47")
        problems: list[str] = []
        stop_words = list(spec["stop_words"])
        # LLaMA-Factory's fix_special_tokens: the first stop word replaces EOS (replace_eos); a tokenizer without
        # EOS gets <|endoftext|>. Neither may be a new token here: that would need resizing the embeddings.
        eos = tokenizer.eos_token
        if spec["replace_eos"]:
            eos = stop_words.pop(0)
        elif tokenizer.eos_token_id is None:
            eos = "<|endoftext|>"
        eos_id = token_id(tokenizer, eos)
        if eos_id is None:
            problems.append(
                f"its EOS would be {eos!r}, which is not in its vocabulary"
                if eos != tokenizer.eos_token
                else f"eos_token {eos!r} is not in its vocabulary"
            )
        # Markup in the slots and named tokens must be tokens of the vocabulary, or the tokenizer is another family's.
        # A stop word that is not (Llama 3.0 has no <|eom_id|>) is skipped: LLaMA-Factory adds it as a new token,
        # which only matters for text that contains it.
        required: set[str] = set()
        tokens = set()
        for key in ("prefix", "system", "user", "assistant", "observation", "function", "tools"):
            for slot in spec.get(key) or []:
                if isinstance(slot, dict) and "token" in slot:
                    tokens.add(slot["token"])
                elif isinstance(slot, str):
                    required.update(MARKUP.findall(slot))
        ids: dict[str, int | None] = {token: token_id(tokenizer, token) for token in tokens | required}
        missing = sorted(token for token, found in ids.items() if found is None)
        if missing:
            problems.append(f"it has no token {', '.join(repr(t) for t in missing)}")
        if problems:
            raise ConfigError(
                f"template {name!r} does not fit the tokenizer: {'; '.join(problems)}. Use the template of the "
                "model's family, or template: auto if the tokenizer has a chat template"
            )
        ids["bos_token"] = tokenizer.bos_token_id
        ids["eos_token"] = eos_id
        self.ids = ids
        self.slots = {key: _compile(spec.get(key), ids) for key in SLOT_KEYS}
        self.eos_token = eos
        self.eos_token_id = eos_id
        self.special_tokens = tuple(sorted({eos, *(w for w in stop_words if token_id(tokenizer, w) is not None)}))

    def fingerprint(self) -> str:
        date = toolfmt.today() if "llama3" in (self.spec["tools_format"], self.spec["function_format"]) else None
        payload = {"name": self.name, "spec": self.spec, "ids": self.ids, "date": date, "v": 2}
        return json.dumps(payload, sort_keys=True, default=str)

    # LLaMA-Factory's Template._encode / Llama2Template._encode, per message.
    def _messages(self, conversation: Conversation) -> list[list[Piece]]:
        slots = self.slots
        system = conversation.system or self.spec["default_system"]
        tools = conversation.tools
        llama2 = self.kind == "llama2"
        out: list[list[Piece]] = []
        for index, turn in enumerate(conversation.turns):
            pieces: list[Piece] = []
            system_text = ""
            if index == 0:
                pieces += slots["prefix"]  # as given: LLaMA-Factory fills no value into the prefix
                if system or tools:
                    tool_text = self._tools_text(conversation) if tools else ""
                    if llama2:
                        first = _fill(slots["system"], system + tool_text)[:1]
                        system_text = first[0] if first and isinstance(first[0], str) else ""
                    else:
                        pieces += _fill(slots["system"], system + tool_text)
            role = turn.role
            if role == "user":
                if llama2:
                    pieces += _fill(slots["user"], system_text + turn.content)
                else:
                    pieces += _fill(slots["user"], turn.content, str(index // 2))
            elif role == "assistant":
                pieces += _fill(slots["assistant"], turn.content)
            elif role == "observation":
                pieces += _fill(slots["observation"], turn.content)
            else:
                pieces += _fill(slots["function"], self._function_text(turn.content))
            out.append(pieces)
        return out

    def _tools_text(self, conversation: Conversation) -> str:
        spec = self.spec
        try:
            if spec["tools_format"] is None:  # plain string slots around the tool list as given
                raw = conversation.tools_text or json.dumps(conversation.tools, ensure_ascii=False)
                first = _fill(self.slots["tools"], raw)[:1]
                return first[0] if first and isinstance(first[0], str) else ""
            return toolfmt.format_tools(spec["tools_format"], conversation.tools)
        except toolfmt.ToolFormatError as exc:
            raise RenderError(str(exc)) from None

    def _function_text(self, content: str) -> str:
        """LLaMA-Factory's FunctionFormatter: the calls in the family's format, a leading thought kept."""
        fmt = self.spec["function_format"]
        # Llama2Template passes neither thought words nor tool-call words to the function formatter.
        words = self.kind != "llama2"
        thought, call = self.spec["thought_words"], self.spec["tool_call_words"]
        try:
            match = None
            if words and call and len(call) == 2:
                match = re.search(rf"{re.escape(call[0])}(.*?){re.escape(call[1])}", content, re.DOTALL)
            if match is None:
                thought_match = None
                if words and thought and len(thought) == 2:
                    pattern = rf"{re.escape(thought[0])}(.*?){re.escape(thought[1])}"
                    thought_match = re.search(pattern, content, re.DOTALL)
                json_part = content.replace(thought_match.group(0), "") if thought_match else content
                text = toolfmt.format_calls(fmt, toolfmt.parse_calls(json_part))
                return thought_match.group(0) + text if thought_match else text
            leading = content.replace(match.group(0), "")
            return leading + toolfmt.format_calls(fmt, toolfmt.parse_calls(match.group(1)))
        except toolfmt.ToolFormatError as exc:
            raise RenderError(str(exc)) from None

    def _remove_thought(self, content: str) -> str:
        first, last = self.spec["thought_words"]
        pattern = re.compile(f"{re.escape(first)}(.*?){re.escape(last)}", re.DOTALL)
        return re.sub(pattern, "", content).lstrip("\n")

    def render(self, conversation: Conversation) -> Rendered:
        turns = conversation.turns
        reasoning = self.kind in ("reasoning", "glm47")
        if reasoning and self.discard_history_thoughts:
            turns = tuple(
                Turn(t.role, self._remove_thought(t.content)) if 0 < i < len(turns) - 2 and i % 2 else t
                for i, t in enumerate(turns)
            )
            conversation = replace(conversation, turns=turns)
        messages = self._messages(conversation)
        if reasoning:  # ReasoningTemplate.encode_multiturn: an empty thought where an answer has none
            first, last = self.spec["thought_words"]
            empty = last if self.kind == "glm47" else first + last
            indices = [len(turns) - 2] if self.discard_history_thoughts else range(0, len(turns), 2)
            for i in indices:
                content = turns[i + 1].content
                if first.strip() not in content and last.strip() not in content:
                    if ENABLE_THINKING:
                        messages[i + 1] = [empty, *messages[i + 1]]
                    else:
                        messages[i] = [*messages[i], empty]
        return Rendered(tuple(tuple(m) for m in messages))


# --- auto: the tokenizer's own chat template --------------------------------------------------------------------


def _common_prefix(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # binary search: a[:low] == b[:low] holds, a[:high] == b[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


class AutoTemplate:
    """The tokenizer's chat_template, with model-turn spans found by rendering prefixes.

    For the model turn at message k, `prompt` = render(messages[:k], add_generation_prompt=True) and
    `full` = render(messages[:k+1]); the turn's span starts where the two texts part (so the generation header is
    prompt) and ends where `full` ends, so whitespace after the turn's end-of-turn token (chatml's "\\n" after
    <|im_end|>) is trained, as in LLaMA-Factory's templates; a turn that ends without any special token gets EOS
    appended.
    Templates that render a conversation's end differently from a prefix's end (a footer after the last message)
    are handled by finding the turn's text, up to its end-of-turn token, in the full rendering after the previous
    span; a turn rendered differently in context (reasoning stripped from history, say) drops the sample.
    The text between spans is the prompt of the next pair; each piece is tokenized on its own.
    """

    name = "auto"
    efficient_eos = False
    special_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer: Any) -> None:
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates; the default one is the chat template
            template = template.get("default")
        if not template:
            raise ConfigError(
                "template 'auto' uses the tokenizer's chat_template, but this tokenizer has none; "
                "set template to the LLaMA-Factory name of the model's family (qwen, llama3, mistral, default, ...)"
            )
        self.tokenizer = tokenizer
        self.template: str = template
        self.special = special_tokens(tokenizer)
        self.eos: str | None = tokenizer.eos_token
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.tool_calls = self._renders_tool_calls()
        self.tool_role = self._accepts_tool_role()

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.template.encode()).hexdigest()
        return json.dumps({"name": "auto", "template": digest, "eos": self.eos, "v": 2})

    def _apply(self, messages: list[dict[str, Any]], tools: Any, generation: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation, chat_template=self.template
        )
        return text if isinstance(text, str) else str(text)

    def _renders_tool_calls(self) -> bool:
        # Templates without tool support would silently render a tool call as an empty assistant turn.
        probe = [{"role": "user", "content": "q"}, _tool_call_message('{"name": "ftj_probe_fn", "arguments": {}}')]
        try:
            return "ftj_probe_fn" in self._apply(probe, None, False)
        except Exception:
            return False

    def _accepts_tool_role(self) -> bool:
        probe = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "tool", "content": "ftj_probe_result"},
        ]
        try:
            return "ftj_probe_result" in self._apply(probe, None, True)
        except Exception:
            return False

    def _message(self, turn: Turn) -> dict[str, Any]:
        if turn.role == "function" and self.tool_calls:
            return _tool_call_message(turn.content)
        if turn.role == "observation":
            return {"role": "tool" if self.tool_role else "user", "content": turn.content}
        return {"role": "assistant" if turn.role in MODEL_ROLES else "user", "content": turn.content}

    def render(self, conversation: Conversation) -> Rendered:
        messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
        first = len(messages)
        messages += [self._message(turn) for turn in conversation.turns]
        tools = conversation.tools
        try:
            final = self._apply(messages, tools, False)
            found: list[tuple[int, int]] = []
            cursor = 0
            for index, turn in enumerate(conversation.turns):
                if turn.role not in MODEL_ROLES:
                    continue
                position = first + index
                full = final if position == len(messages) - 1 else self._apply(messages[: position + 1], tools, False)
                prompt = self._apply(messages[:position], tools, True)
                start = _common_prefix(prompt, full)
                if final.startswith(full) and start >= cursor:
                    span = (start, len(full))
                else:
                    # Only the turn itself up to its end-of-turn token: what follows it in the prefix rendering
                    # (an end-of-conversation footer, say) need not follow it in the whole conversation.
                    piece = self._through_first_special(full[start:])
                    at = final.find(piece, cursor)
                    if not piece or at < 0:
                        raise RenderError(f"the chat template renders model turn {index + 1} differently in context")
                    end = at + len(piece)
                    end += len(final[end:]) - len(final[end:].lstrip())  # whitespace after it, as on the main path
                    span = (at, end)
                found.append(span)
                cursor = span[1]
        except RenderError:
            raise
        except Exception as exc:  # jinja's TemplateError and whatever the template's raise_exception raises
            raise RenderError(f"the chat template cannot render it: {exc}") from None
        return self._pairs(*self._close_turns(final, found))

    def _through_first_special(self, text: str) -> str:
        ends = [at + len(token) for token in self.special if (at := text.find(token)) >= 0]
        return text[: min(ends)] if ends else text

    def _close_turns(self, text: str, found: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        """Append EOS (and end the span there) where a turn does not end with a special token."""
        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        done = 0
        shift = 0
        for start, end in found:
            body = text[start:end]
            stripped = body.rstrip()
            if any(stripped.endswith(token) for token in self.special):
                spans.append((start + shift, end + shift))
                continue
            if not self.eos:
                raise ConfigError(
                    "template 'auto': the chat template ends assistant turns without a special token and the "
                    "tokenizer has no eos_token to add; pick a named template"
                )
            cut = start + len(stripped)
            pieces += [text[done:cut], self.eos]
            done = cut
            spans.append((start + shift, cut + shift + len(self.eos)))
            shift += len(self.eos)
        pieces.append(text[done:])
        return "".join(pieces), spans

    @staticmethod
    def _pairs(text: str, spans: list[tuple[int, int]]) -> Rendered:
        messages: list[tuple[Piece, ...]] = []
        done = 0
        for start, end in spans:
            messages += [(text[done:start],) if start > done else (), (text[start:end],)]
            done = end
        if done < len(text) and messages:  # a footer after the last model turn goes with it
            messages[-1] = (*messages[-1], text[done:])
        return Rendered(tuple(messages))


def _tool_call_message(content: str) -> dict[str, Any]:
    """An assistant message with `tool_calls` from LLaMA-Factory's function_call text ({"name", "arguments"})."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError:
        return {"role": "assistant", "content": content}
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        if not isinstance(call, dict) or "name" not in call:
            return {"role": "assistant", "content": content}
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        out.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    return {"role": "assistant", "content": "", "tool_calls": out}


def get_template(
    name: str, tokenizer: Any, *, mask_history: bool = False, train_on_prompt: bool = False
) -> ChatTemplate:
    """The template `name` for `tokenizer`; ConfigError when the tokenizer or the masking contradicts it."""
    if name == "auto":
        return AutoTemplate(tokenizer)
    if name in LF_TEMPLATES and name not in NAMED_TEMPLATES:
        raise ConfigError(
            f"template {name!r} is multimodal: LLaMA-Factory runs it only with the model's image processor, and "
            "image data is not supported here"
        )
    if name not in LF_TEMPLATES:
        raise ConfigError(
            f"unknown template {name!r}; use auto or one of LLaMA-Factory's: {', '.join(NAMED_TEMPLATES)}"
        )
    template = NamedTemplate(name, tokenizer, mask_history=mask_history)
    if train_on_prompt and template.efficient_eos:
        # LLaMA-Factory refuses this too: such templates label the EOS on the next prompt's first position.
        raise ConfigError(f"template {name!r} does not support trainOnPrompt")
    return template
