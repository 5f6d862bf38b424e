"""Loss masking: labels are exactly the model turns' tokens (end-of-turn token and what the template writes after
it included, as in LLaMA-Factory) for alpaca, sharegpt multi-turn and tool-calling data, under the tokenizer's own
template and LLaMA-Factory's named ones; train_on_prompt, mask_history and truncation at cutoff_len.

Expected ids and labels are built independently of the code under test: the test writes the rendered text out by
hand as (piece, trainable) pairs, tokenizes each piece on its own and concatenates, as LLaMA-Factory does.
(tests/trainer/data/test_lf_parity.py compares with LLaMA-Factory itself; these tests show the behaviour.)
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
from finetune_trainer.data.encode import Masking, encode, infer_seqlen
from finetune_trainer.data.templates import get_template

IGNORE = -100


def expected(tokenizer: Any, pieces: list[tuple[str | int, bool]]) -> tuple[list[int], list[int]]:
    """(text or token id, trainable) pieces → ids and labels; each text tokenized on its own."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in pieces:
        part = [text] if isinstance(text, int) else tokenizer.encode(text, add_special_tokens=False)
        ids += part
        labels += part if trainable else [IGNORE] * len(part)
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
            ("Hello there.<|im_end|>\n", True),
            ("<|im_start|>user\nAdd 2 and 3.\nPlease.<|im_end|>\n<|im_start|>assistant\n", False),
            ("The answer is 5.<|im_end|>\n", True),
        ],
    )
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_alpaca_under_the_named_alpaca_template_trains_eos_and_the_blank_line_after_it(
    tmp_path: Path, base_tokenizer: Any, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add 2 and 3.", "output": "5"}])
    row = only_row(make_config(data, template="alpaca"), base_tokenizer)
    system = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    ids, labels = expected(
        base_tokenizer,
        [
            (f"{system}\n\n", False),
            ("### Instruction:\nAdd 2 and 3.\n\n### Response:\n", False),
            ("5", True),
            (0, True),  # EOS, id 0
            ("\n\n", True),
        ],
    )
    assert base_tokenizer.eos_token_id == 0
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_default_template_takes_an_eos_with_id_0(tmp_path: Path, base_tokenizer: Any, make_config: MakeConfig) -> None:
    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi", "output": "Hello."}])
    row = only_row(make_config(data, template="default"), base_tokenizer)
    eos = base_tokenizer.eos_token_id
    assert eos == 0
    pieces: list[tuple[str | int, bool]] = [
        ("Human: Hi", False),
        (eos, False),
        ("\nAssistant:", False),
        ("Hello.", True),
        (eos, True),
        ("\n", True),
    ]
    ids, labels = expected(base_tokenizer, pieces)
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_llama3_takes_bos_from_the_tokenizer_and_writes_none_without_one(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi", "output": "Hello."}])
    tokenizer = build_tokenizer(llama3=True, chat_template=None)
    assert tokenizer.bos_token is None
    row = only_row(make_config(data, template="llama3"), tokenizer)
    header = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    pieces: list[tuple[str | int, bool]] = [(header, False), ("Hello.<|eot_id|>", True)]
    assert row["input_ids"] == expected(tokenizer, pieces)[0]
    tokenizer.bos_token = "<|begin_of_text|>"
    row = only_row(make_config(data, template="llama3", cache=tmp_path / "other"), tokenizer)
    assert row["input_ids"] == [tokenizer.convert_tokens_to_ids("<|begin_of_text|>"), *expected(tokenizer, pieces)[0]]


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


def chatml_multi_turn(assistant: tuple[bool, bool, bool]) -> list[tuple[str | int, bool]]:
    return [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hello.<|im_end|>\n", assistant[0]),
        ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>\n", assistant[1]),
        ("<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Berlin.<|im_end|>\n", assistant[2]),
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
    assert row["labels"] == ids


TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
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
            (f"<tool_call>{call}</tool_call><|im_end|>\n", True),
            ("<|im_start|>tool\nsunny, 21 degrees<|im_end|>\n<|im_start|>assistant\n", False),
            ("It is sunny.<|im_end|>\n", True),
        ],
    )
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_tool_calls_under_the_named_default_template(
    tmp_path: Path, base_tokenizer: Any, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "tools.jsonl", [TOOL_CHAT])
    row = only_row(make_config(data, template="default", training={"cutoff_len": 1024}), base_tokenizer)
    tools = (
        "You have access to the following tools:\n"
        "> Tool Name: get_weather\nTool Description: Weather of a city\nTool Args:\n"
        "  - city (string, required): \n\n"
        "Use the following format if using a tool:\n```\n"
        "Action: tool name (one of [get_weather])\n"
        "Action Input: the input to the tool, in a JSON format representing the kwargs "
        '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
    )
    ids, labels = expected(
        base_tokenizer,
        [
            (f"System: {tools}", False),
            (0, False),
            ("\n", False),
            ("Human: Weather in Berlin?", False),
            (0, False),
            ("\nAssistant:", False),
            ('Action: get_weather\nAction Input: {"city": "Berlin"}', True),
            (0, True),
            ("\n", True),
            ("Human: sunny, 21 degrees", False),
            (0, False),
            ("\nAssistant:", False),
            ("It is sunny.", True),
            (0, True),
            ("\n", True),
        ],
    )
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_qwen_writes_tools_and_calls_in_qwens_own_format(
    tmp_path: Path, base_tokenizer: Any, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "tools.jsonl", [TOOL_CHAT])
    row = only_row(make_config(data, template="qwen", training={"cutoff_len": 1024}), base_tokenizer)
    text = base_tokenizer.decode(row["input_ids"])
    wrapped = json.dumps({"type": "function", "function": TOOLS[0]})
    assert f"<tools>\n{wrapped}\n</tools>" in text
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Berlin"}})
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE]
    assert base_tokenizer.decode(trained) == f"<tool_call>\n{call}\n</tool_call><|im_end|>\nIt is sunny.<|im_end|>\n"
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 degrees\n</tool_response><|im_end|>" in text


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
    # The generation prompt's space is prompt: pieces are tokenized on their own, as LLaMA-Factory does. What the
    # template writes after the reply (its newline) goes with the reply, as the newline after <|im_end|> does.
    ids, labels = expected(
        tokenizer, [("user: Hello world\nassistant: ", False), ("I am fine.<|endoftext|>", True), ("\n", True)]
    )
    assert row["input_ids"] == ids
    assert row["labels"] == labels


def test_the_slow_path_without_a_rust_tokenizer_gives_the_same_ids(tokenizer: Any) -> None:
    conversation = Conversation(
        (Turn("user", "Hello world"), Turn("assistant", "Hello."), Turn("user", "Add 2 and 3"), Turn("assistant", "5")),
        system="Be brief.",
    )

    class Slow:  # the transformers call interface only, as a tokenizer without a Rust backend offers
        def __call__(self, texts: list[str], add_special_tokens: bool) -> Any:
            return tokenizer(texts, add_special_tokens=add_special_tokens)

    for name in ("auto", "chatml", "alpaca"):
        template = get_template(name, tokenizer)
        rendered = [template.render(conversation)]
        fast = encode(rendered, tokenizer, Masking(512), template)[0]
        slow = encode(rendered, Slow(), Masking(512), template)[0]
        assert not isinstance(fast, str)
        assert not isinstance(slow, str)
        assert fast.input_ids.tolist() == slow.input_ids.tolist()
        assert fast.labels.tolist() == slow.labels.tolist()


@pytest.mark.parametrize(
    ("source", "target", "cutoff", "kept"),
    [
        (10, 3, 8, (5, 3)),  # a short response is kept whole, the prompt cut
        (3, 10, 8, (3, 5)),  # a short prompt is kept whole, the response cut
        (12, 4, 8, (6, 2)),  # both long: cut in proportion
        (300, 8, 16, (16, 0)),  # the response's share rounds down to nothing
        (5, 5, 100, (5, 5)),
    ],
)
def test_infer_seqlen_shares_the_cutoff_as_llamafactory(
    source: int, target: int, cutoff: int, kept: tuple[int, int]
) -> None:
    assert infer_seqlen(source, target, cutoff) == kept


def test_truncation_shares_cutoff_len_and_keeps_samples(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    rows = [
        {"instruction": " ".join(words[: 1 + i % 9] * (1 + i // 3)), "output": " ".join(words[: 1 + (i * 5) % 9] * 2)}
        for i in range(24)
    ]
    data = write_jsonl(tmp_path / "a.jsonl", rows)
    cutoff = 24
    truncated = 0
    for row in rows:
        prompt = f"<|im_start|>user\n{row['instruction']}<|im_end|>\n<|im_start|>assistant\n"
        response = f"{row['output']}<|im_end|>\n"
        source = len(tokenizer.encode(prompt, add_special_tokens=False))
        target = len(tokenizer.encode(response, add_special_tokens=False))
        truncated += source + target > cutoff
        assert infer_seqlen(source, target, cutoff)[1] > 0
    assert truncated > 5, "the rows must include samples that are cut"

    bundle = build_datasets(make_config(data, template="auto", training={"cutoff_len": cutoff}), tokenizer)

    assert bundle.stats.truncated == truncated
    assert bundle.stats.dropped == 0
    assert bundle.stats.samples == len(rows)
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
    pieces[-1:] = [("Berlin.<|im_end|>\n<|endoftext|>", True)]
    ids, labels = expected(tokenizer, pieces)
    assert row["input_ids"] == ids
    assert row["labels"] == labels
