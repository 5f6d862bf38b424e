"""Chat templates: a Conversation → text plus the character spans of the model's turns (the trainable part).

`auto` renders with the tokenizer's own Jinja chat_template and finds each model turn by rendering the conversation
prefix by prefix (see AutoTemplate). The named templates (default, alpaca, chatml, qwen, llama3) are for base models
without a chat_template; each is refused when the tokenizer does not carry the special tokens it is built from.

Every span ends with an end-of-turn token (the template's own, or EOS), so the model learns to stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from finetune_trainer.data.conversation import MODEL_ROLES, Conversation, Turn
from finetune_trainer.errors import ConfigError

NAMED_TEMPLATES = ("default", "alpaca", "chatml", "qwen", "llama3")


@dataclass(frozen=True)
class Rendered:
    """The text of one conversation and the [start, end) character spans of its model turns, in order."""

    text: str
    spans: tuple[tuple[int, int], ...]


class RenderError(Exception):
    """This conversation cannot be rendered by the template; it is dropped with this reason."""


class ChatTemplate(Protocol):
    name: str

    def render(self, conversation: Conversation) -> Rendered: ...

    def fingerprint(self) -> str:
        """Everything that decides the rendered text, for the tokenized-data cache key."""
        ...


def special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special tokens, longest first (so `endswith` finds <|im_end|> before a shorter token)."""
    names = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            names.add(str(token))
    return tuple(sorted((n for n in names if n), key=len, reverse=True))


def _single_token_problem(tokenizer: Any, token: str) -> str | None:
    """Why `token` is not one special token of the tokenizer, or None when it is."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    added = getattr(tokenizer, "added_tokens_encoder", {})
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id and (token in added or token in special_tokens(tokenizer)):
        return None
    if len(ids) == 1 and ids[0] == tokenizer.unk_token_id:
        return f"{token!r} is not in its vocabulary"
    if len(ids) == 1:
        return f"{token!r} is an ordinary vocabulary entry, not a special token"
    return f"{token!r} is not one special token (it is split into {len(ids)} tokens)"


def _adds_bos(tokenizer: Any) -> bool:
    # Templates put BOS in the text only for tokenizers that would add it themselves when encoding plain text.
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


# --- named templates --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A named template as text pieces; `{content}` marks where a turn's text goes.

    `user` and `observation` end with the header that opens the model's reply, so the whole header is prompt.
    A model turn is `assistant`/`function` followed by `end` (the end-of-turn token, labeled), then `after`
    (the separator to the next turn, not labeled).
    """

    name: str
    system: str
    user: str
    observation: str
    assistant: str
    function: str
    end: str
    after: str
    default_system: str | None
    tools: Callable[[str], str]
    required: tuple[str, ...]


def _fill(piece: str, content: str) -> str:
    # str.replace, not str.format: training text is full of braces.
    return piece.replace("{content}", content)


def _tools_plain(tools_json: str) -> str:
    return (
        "You can call these tools:\n"
        f"{tools_json}\n"
        'To call one, answer with a JSON object {"name": <tool name>, "arguments": <arguments object>}.'
    )


def _tools_tagged(tools_json: str) -> str:
    return (
        "# Tools\n\nThese functions are available; their signatures are inside <tools></tools>:\n"
        f"<tools>\n{tools_json}\n</tools>\n\n"
        'To call a function, reply with <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>"
    )


def _tools_llama3(tools_json: str) -> str:
    return (
        "You can call the functions below. To call one, reply with a JSON object of the form "
        '{"name": <function name>, "arguments": <arguments object>} and nothing else.\n\n'
        f"{tools_json}"
    )


_EOS = "{eos}"  # filled with the tokenizer's EOS text when the template is built

_CHATML = Layout(
    name="chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}",
    function="<tool_call>\n{content}\n</tool_call>",
    end="<|im_end|>",
    after="\n",
    default_system=None,
    tools=_tools_tagged,
    required=("<|im_start|>", "<|im_end|>"),
)

LAYOUTS: dict[str, Layout] = {
    "default": Layout(
        name="default",
        system="System: {content}\n",
        user="Human: {content}\nAssistant:",
        observation="Observation: {content}\nAssistant:",
        assistant=" {content}",
        function=" {content}",
        end=_EOS,
        after="\n",
        default_system=None,
        tools=_tools_plain,
        required=(),
    ),
    "alpaca": Layout(
        name="alpaca",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n### Response:\n",
        observation="### Observation:\n{content}\n\n### Response:\n",
        assistant="{content}",
        function="{content}",
        end=_EOS,
        after="\n\n",
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        ),
        tools=_tools_plain,
        required=(),
    ),
    "chatml": _CHATML,
    # Qwen2/2.5 chat models are chatml with this default system prompt.
    "qwen": replace(
        _CHATML, name="qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    ),
    "llama3": Layout(
        name="llama3",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        observation=(
            "<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        assistant="{content}",
        function="{content}",
        end="<|eot_id|>",
        after="",
        default_system=None,
        tools=_tools_llama3,
        required=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
}


class NamedTemplate:
    """One of LAYOUTS, checked against the tokenizer's special tokens when built."""

    def __init__(self, layout: Layout, tokenizer: Any) -> None:
        problems = [p for token in layout.required if (p := _single_token_problem(tokenizer, token))]
        end = layout.end
        if end == _EOS:
            eos = tokenizer.eos_token
            if not eos:
                problems.append("it has no eos_token to end assistant turns with")
            elif problem := _single_token_problem(tokenizer, eos):
                problems.append(f"its eos_token: {problem}")
            end = eos or ""
        if problems:
            raise ConfigError(
                f"template {layout.name!r} does not fit the tokenizer: {'; '.join(problems)}. "
                "Use template: auto if the model has a chat template, or a template built on this tokenizer's "
                "special tokens"
            )
        self.name = layout.name
        self.layout = layout
        self.end = end
        if layout.name == "llama3":
            self.prefix = "<|begin_of_text|>"
        else:
            self.prefix = tokenizer.bos_token if _adds_bos(tokenizer) else ""

    def fingerprint(self) -> str:
        return json.dumps({"name": self.name, "end": self.end, "prefix": self.prefix, "v": 1})

    def render(self, conversation: Conversation) -> Rendered:
        layout = self.layout
        parts = [self.prefix]
        system = conversation.system or layout.default_system
        if conversation.tools:
            tools_text = layout.tools(json.dumps(conversation.tools, ensure_ascii=False))
            system = f"{system}\n\n{tools_text}" if system else tools_text
        if system:
            parts.append(_fill(layout.system, system))
        length = sum(map(len, parts))
        spans = []
        for turn in conversation.turns:
            if turn.role in MODEL_ROLES:
                piece = layout.assistant if turn.role == "assistant" else layout.function
                body = _fill(piece, turn.content) + self.end
                spans.append((length, length + len(body)))
                parts += [body, layout.after]
                length += len(body) + len(layout.after)
            else:
                piece = _fill(layout.user if turn.role == "user" else layout.observation, turn.content)
                parts.append(piece)
                length += len(piece)
        return Rendered("".join(parts), tuple(spans))


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
    prompt) and ends where `full` ends. Trailing whitespace after the turn's last special token (chatml's "\\n"
    after <|im_end|>) is left to the prompt side; a turn that ends without any special token gets EOS appended.
    Templates that render a conversation's end differently from a prefix's end (a footer after the last message)
    are handled by finding the turn's text, up to its end-of-turn token, in the full rendering after the previous
    span; a turn rendered differently in context (reasoning stripped from history, say) drops the sample.
    """

    name = "auto"

    def __init__(self, tokenizer: Any) -> None:
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates; the default one is the chat template
            template = template.get("default")
        if not template:
            raise ConfigError(
                "template 'auto' uses the tokenizer's chat_template, but this tokenizer has none; "
                f"set template to one of {', '.join(NAMED_TEMPLATES)}"
            )
        self.tokenizer = tokenizer
        self.template: str = template
        self.special = special_tokens(tokenizer)
        self.eos: str | None = tokenizer.eos_token
        self.tool_calls = self._renders_tool_calls()
        self.tool_role = self._accepts_tool_role()

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.template.encode()).hexdigest()
        return json.dumps({"name": "auto", "template": digest, "eos": self.eos, "v": 1})

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
                    span = (at, at + len(piece))
                found.append(span)
                cursor = span[1]
        except RenderError:
            raise
        except Exception as exc:  # jinja's TemplateError and whatever the template's raise_exception raises
            raise RenderError(f"the chat template cannot render it: {exc}") from None
        return self._close_turns(final, found)

    def _through_first_special(self, text: str) -> str:
        ends = [at + len(token) for token in self.special if (at := text.find(token)) >= 0]
        return text[: min(ends)] if ends else text

    def _close_turns(self, text: str, found: list[tuple[int, int]]) -> Rendered:
        """Trim each span to its end-of-turn token; append EOS where a turn has none."""
        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        done = 0
        shift = 0
        for start, end in found:
            body = text[start:end]
            stripped = body.rstrip()
            if any(stripped.endswith(token) for token in self.special):
                spans.append((start + shift, start + shift + len(stripped)))
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
        return Rendered("".join(pieces), tuple(spans))


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


def get_template(name: str, tokenizer: Any) -> ChatTemplate:
    """The template `name` for `tokenizer`; ConfigError when the tokenizer contradicts it."""
    if name == "auto":
        return AutoTemplate(tokenizer)
    if name not in LAYOUTS:
        raise ConfigError(f"unknown template {name!r}; use auto or one of {', '.join(NAMED_TEMPLATES)}")
    return NamedTemplate(LAYOUTS[name], tokenizer)
