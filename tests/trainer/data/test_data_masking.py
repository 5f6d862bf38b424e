"""Loss masking: labels are exactly the model turns' tokens (end-of-turn token included) for alpaca, sharegpt
multi-turn and tool-calling data, under the tokenizer's own template and the named ones; train_on_prompt,
mask_history and truncation at cutoff_len.

Expected ids and labels are built independently of the code under test: the test writes the rendered text out by
hand as (piece, trainable) pairs, tokenizes each piece on its own and concatenates. The pieces meet at special
tokens, newlines or punctuation, where the byte-level BPE never merges across, so that equals tokenizing the whole
text. The first token never carries a label (nothing precedes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trainer.datafiles import MakeConfig, write_jsonl
from trainer.tiny import CHATML_TEMPLATE, build_tokenizer

from finetune_trainer.data import build_datasets
from finetune_trainer.data.conversation import Conversation, Turn
from finetune_trainer.data.encode import Masking, encode
from finetune_trainer.data.templates import get_template

IGNORE = -100


def expected(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in pieces:
        part = tokenizer.encode(text, add_special_tokens=False)
        ids += part
        labels += part if trainable else [IGNORE] * len(part)
    labels[0] = IGNORE
    return ids, labels


def only_row(config: Any, tokenizer: Any) -> dict[str, list[int]]:
    bundle = build_datasets(config, tokenizer)
    assert len(bundle.train) == 1
    row: dict[str, list[int]] = bundle.train[0]
    return row


ALPACA = {
    "instruction": "Add 2 and 3.",
    "input": "Please.",
    "output": "The answer is 5.",
    "system": "Be brief.",
    "history": [["Hi", "Hello there."]],
}


def test_alpaca_labels_are_each_response_and_its_end_token_under_the_tokenizers_template(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA])
    row = only_row(make_config(data, template="auto"), tokenizer)
    ids, labels = expected(
        tokenizer,
        [
            ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
            ("Hello there.<|im_end|>", True),
            ("\n<|im_start|>user\nAdd 2 and 3.\nPlease.<|im_end|>\n<|im_start|>assistant\n", False),
            ("The answer is 5.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_alpaca_under_the_named_alpaca_template_ends_the_response_with_eos(
    tmp_path: Path, base_tokenizer: Any, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add 2 and 3.", "output": "5"}])
    row = only_row(make_config(data, template="alpaca"), base_tokenizer)
    system = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    ids, labels = expected(
        base_tokenizer,
        [
            (f"{system}\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n", False),
            ("5<|endoftext|>", True),
            ("\n\n", False),
        ],
    )
    assert row["input_ids"] == ids
    assert row["labels"] == labels
    assert row["labels"][-3] == base_tokenizer.eos_token_id


SHAREGPT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Germany?"},
        {"role": "assistant", "content": "Berlin."},
    ]
}
SHAREGPT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def sharegpt_config(tmp_path: Path, make_config: MakeConfig, template: str, **training: Any) -> Any:
    data = write_jsonl(tmp_path / "chat.jsonl", [SHAREGPT])
    spec = {
        "uri": data.as_uri(),
        "format": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": SHAREGPT_TAGS,
    }
    return make_config(spec, template=template, training=training)


def chatml_multi_turn(assistant: tuple[bool, bool, bool]) -> list[tuple[str, bool]]:
    return [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hello.<|im_end|>", assistant[0]),
        ("\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>", assistant[1]),
        ("\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Berlin.<|im_end|>", assistant[2]),
        ("\n", False),
    ]


@pytest.mark.parametrize("template", ["auto", "chatml"])
def test_sharegpt_multi_turn_with_custom_tags_labels_every_assistant_turn(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig, template: str
) -> None:
    row = only_row(sharegpt_config(tmp_path, make_config, template), tokenizer)
    ids, labels = expected(tokenizer, chatml_multi_turn((True, True, True)))
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_mask_history_labels_only_the_last_assistant_turn(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    row = only_row(sharegpt_config(tmp_path, make_config, "auto", mask_history=True), tokenizer)
    ids, labels = expected(tokenizer, chatml_multi_turn((False, False, True)))
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_train_on_prompt_labels_every_token(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    row = only_row(sharegpt_config(tmp_path, make_config, "auto", train_on_prompt=True), tokenizer)
    ids, _ = expected(tokenizer, chatml_multi_turn((True, True, True)))
    assert row["input_ids"] == ids
    assert row["labels"] == [IGNORE, *ids[1:]]


TOOLS = [{"name": "get_weather", "description": "Weather of a city", "parameters": {"city": {"type": "string"}}}]
TOOL_CHAT = {
    "conversations": [
        {"from": "human", "value": "Weather in Berlin?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Berlin"}})},
        {"from": "observation", "value": "sunny, 21 degrees"},
        {"from": "gpt", "value": "It is sunny."},
    ],
    "tools": json.dumps(TOOLS),
}


def test_tool_call_turns_are_labeled_and_tool_results_are_not(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "tools.jsonl", [TOOL_CHAT])
    row = only_row(make_config(data, template="auto"), tokenizer)
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Berlin"}})
    ids, labels = expected(
        tokenizer,
        [
            (f"<|im_start|>system\nTools: {json.dumps(TOOLS)}<|im_end|>\n", False),
            ("<|im_start|>user\nWeather in Berlin?<|im_end|>\n<|im_start|>assistant\n", False),
            (f"<tool_call>{call}</tool_call><|im_end|>", True),
            ("\n<|im_start|>tool\nsunny, 21 degrees<|im_end|>\n<|im_start|>assistant\n", False),
            ("It is sunny.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_tool_calls_under_the_named_default_template(
    tmp_path: Path, base_tokenizer: Any, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "tools.jsonl", [TOOL_CHAT])
    row = only_row(make_config(data, template="default"), base_tokenizer)
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Berlin"}})
    tools = (
        f"You can call these tools:\n{json.dumps(TOOLS)}\n"
        'To call one, answer with a JSON object {"name": <tool name>, "arguments": <arguments object>}.'
    )
    ids, labels = expected(
        base_tokenizer,
        [
            (f"System: {tools}\nHuman: Weather in Berlin?\nAssistant:", False),
            (f" {call}<|endoftext|>", True),
            ("\nObservation: sunny, 21 degrees\nAssistant:", False),
            (" It is sunny.<|endoftext|>", True),
            ("\n", False),
        ],
    )
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_a_chat_template_without_end_of_turn_tokens_gets_eos_after_each_reply(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    plain = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer = build_tokenizer(chat_template=plain)
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hello world", "output": "I am fine."}])
    row = only_row(make_config(data, template="auto"), tokenizer)
    # The reply's first token " I" carries the space of the generation prompt: it is what the model must produce.
    ids, labels = expected(
        tokenizer, [("user: Hello world\nassistant:", False), (" I am fine.<|endoftext|>", True), ("\n", False)]
    )
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_tokenizing_pieces_without_offsets_gives_the_same_labels(tokenizer: Any) -> None:
    conversation = Conversation(
        (Turn("user", "Hello world"), Turn("assistant", "Hello."), Turn("user", "Add 2 and 3"), Turn("assistant", "5")),
        system="Be brief.",
    )
    rendered = [get_template(name, tokenizer).render(conversation) for name in ("auto", "chatml", "alpaca")]
    with_offsets = encode(rendered, tokenizer, Masking(512), offsets=True)
    by_pieces = encode(rendered, tokenizer, Masking(512), offsets=False)
    for a, b in zip(with_offsets, by_pieces, strict=True):
        assert not isinstance(a, str)
        assert not isinstance(b, str)
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert a.labels.tolist() == b.labels.tolist()


def test_truncation_cuts_at_cutoff_len_and_drops_samples_left_without_labels(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    rows = [
        {"instruction": " ".join(words[: 1 + i % 9] * (1 + i // 3)), "output": " ".join(words[: 1 + (i * 5) % 9] * 2)}
        for i in range(24)
    ]
    data = write_jsonl(tmp_path / "a.jsonl", rows)
    cutoff = 24
    truncated = dropped = 0
    for row in rows:
        prompt = f"<|im_start|>user\n{row['instruction']}<|im_end|>\n<|im_start|>assistant\n"
        full = f"{prompt}{row['output']}<|im_end|>\n"
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        full_len = len(tokenizer.encode(full, add_special_tokens=False))
        if prompt_len >= cutoff:
            dropped += 1
        elif full_len > cutoff:
            truncated += 1
    assert truncated, "the rows must include samples that are cut but keep labels"
    assert dropped, "the rows must include samples whose prompt alone fills cutoff_len"

    bundle = build_datasets(make_config(data, template="auto", training={"cutoff_len": cutoff}), tokenizer)

    assert bundle.stats.truncated == truncated
    assert bundle.stats.dropped == dropped
    assert bundle.stats.samples == len(rows) - dropped
    assert max(len(r) for r in bundle.train["input_ids"]) == cutoff
    assert all(any(label != IGNORE for label in r) for r in bundle.train["labels"])


def test_a_template_that_ends_the_conversation_differently_from_a_prefix_still_labels_every_turn(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    # An end-of-conversation footer: the rendering of a prefix is then not a prefix of the whole rendering.
    footer = CHATML_TEMPLATE + "{%- if messages[-1].role == 'assistant' %}{{- '<|endoftext|>' }}{%- endif %}"
    tokenizer = build_tokenizer(chat_template=footer)
    row = only_row(sharegpt_config(tmp_path, make_config, "auto"), tokenizer)
    pieces = chatml_multi_turn((True, True, True))
    pieces[-2:] = [("Berlin.<|im_end|>\n<|endoftext|>", True)]
    ids, labels = expected(tokenizer, pieces)
    assert row["input_ids"] == ids
    assert row["labels"] == labels
