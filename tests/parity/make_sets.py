# ruff: noqa: RUF001
"""Writes the parity sets (sets/*.json and sets/dataset_info.json); run once, the output is committed.

The rows cover what the issue lists: alpaca with system, input and history; sharegpt multi-turn with system; tool
descriptions with function_call and observation turns (parallel calls, a thought before a call); Chinese and emoji;
empty inputs and trailing spaces; rows long enough to be cut at several cutoffs; rows both sides must drop.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent / "sets"

LONG_ANSWER = " ".join(
    f"Step {n}: add {n} to the running total, which is now {n * (n + 1) // 2}." for n in range(1, 19)
)
LONG_QUESTION = "Explain, step by step and without skipping any step, how to sum the numbers from 1 to 18. " * 3

ALPACA = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Translate to German.", "input": "good morning", "output": "Guten Morgen."},
    {
        "instruction": "Add the numbers.",
        "input": "2 and 3",
        "output": "The answer is 5.",
        "system": "You are a careful calculator.",
    },
    {
        "instruction": "And multiply them?",
        "input": "",
        "output": "2 times 3 is 6.",
        "history": [["Add 2 and 3.", "5"], ["Subtract 3 from 2.", "-1"]],
    },
    {"instruction": "把这句话翻译成英文：今天天气很好。", "input": "", "output": "The weather is nice today. ☀️"},
    {"instruction": "Reply with emoji only 🙂", "input": "🐍 + 🦀", "output": "🐍❤️🦀  "},
    {"instruction": "Keep the trailing spaces.   ", "input": "   ", "output": "Kept.   "},
    {"instruction": "", "input": "Only an input, no instruction.", "output": "Answered anyway."},
    {"instruction": "Braces {content} and {{content}} stay text.", "input": "", "output": "Yes: {content} {{x}}."},
    {"instruction": "An empty answer.", "input": "", "output": ""},
    {"instruction": "No output column value.", "input": "", "output": None},
]

LONG = [
    {"instruction": LONG_QUESTION, "input": "", "output": LONG_ANSWER},
    {"instruction": "Short question, long answer?", "input": "", "output": LONG_ANSWER + " " + LONG_ANSWER},
    {"instruction": LONG_QUESTION + LONG_QUESTION, "input": "", "output": "Short answer."},
    {
        "instruction": "Last turn after a long history.",
        "input": "",
        "output": "Done: " + LONG_ANSWER[:200],
        "history": [[LONG_QUESTION, LONG_ANSWER], ["中文的问题？" * 5, "中文的回答。" * 8]],
        "system": "You answer at length. 😊",
    },
]

SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "Hi!"},
            {"from": "gpt", "value": "Hello, how can I help?"},
            {"from": "human", "value": "Tell me a joke."},
            {"from": "gpt", "value": "Why did the chicken cross the road? To get to the other side."},
        ],
        "system": "You are funny.",
    },
    {
        "conversations": [
            {"from": "system", "value": "System prompt from the first message."},
            {"from": "human", "value": "你好"},
            {"from": "gpt", "value": "你好！有什么可以帮你？ 🎉"},
        ],
    },
    {
        "conversations": [
            {"from": "human", "value": "One turn, no system."},
            {"from": "gpt", "value": "One answer."},
        ],
        "system": "",
    },
    {
        "conversations": [
            {"from": "human", "value": "Wrong order"},
            {"from": "human", "value": "twice a user"},
            {"from": "gpt", "value": "dropped by both"},
        ],
    },
    {"conversations": [{"from": "human", "value": "Ends on a user turn"}]},
]

TOOLS_DESC = [
    {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name."},
                "unit": {"type": "string", "description": "Degrees unit.", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
    {
        "name": "add",
        "description": "Add numbers.",
        "parameters": {
            "type": "object",
            "properties": {"numbers": {"type": "array", "items": {"type": "number"}, "description": "Summands."}},
            "required": ["numbers"],
        },
    },
]

TOOLS = [
    {
        "conversations": [
            {"from": "human", "value": "What is the weather in Berlin?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Berlin"}})},
            {"from": "observation", "value": json.dumps({"temperature": 21, "sky": "sunny"})},
            {"from": "gpt", "value": "It is sunny in Berlin, 21 degrees."},
        ],
        "tools": json.dumps(TOOLS_DESC),
    },
    {
        "conversations": [
            {"from": "human", "value": "Add 1, 2 and 3; and the weather in 東京?"},
            {
                "from": "function_call",
                "value": json.dumps(
                    [
                        {"name": "add", "arguments": {"numbers": [1, 2, 3]}},
                        {"name": "get_weather", "arguments": {"city": "東京", "unit": "celsius"}},
                    ],
                    ensure_ascii=False,
                ),
            },
            {"from": "observation", "value": "6\n雨 ☔"},
            {"from": "gpt", "value": "The sum is 6 and it rains in Tokyo."},
        ],
        "tools": json.dumps(TOOLS_DESC, ensure_ascii=False),
        "system": "Use tools when they help.",
    },
    {
        "conversations": [
            {"from": "human", "value": "Weather in Paris, think first."},
            {
                "from": "function_call",
                "value": "<think>\nI need the weather tool.\n</think>\n\n"
                + json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
            },
            {"from": "observation", "value": "cloudy"},
            {"from": "gpt", "value": "<think>\nThe tool said cloudy.\n</think>\n\nIt is cloudy in Paris."},
        ],
        "tools": json.dumps(TOOLS_DESC[:1]),
    },
    {
        "conversations": [
            {"from": "human", "value": "No tools here, but a tools column."},
            {"from": "gpt", "value": "Plain answer."},
        ],
        "tools": "",
    },
]

DATASET_INFO = {
    "alpaca": {
        "file_name": "alpaca.json",
        "columns": {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "system": "system",
            "history": "history",
        },
    },
    "long": {
        "file_name": "long.json",
        "columns": {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "system": "system",
            "history": "history",
        },
    },
    "sharegpt": {
        "file_name": "sharegpt.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system"},
    },
    "tools": {
        "file_name": "tools.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
    },
}


def _fill(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    # Every row carries every column (null where absent), as a dataset table would.
    return [{key: row.get(key) for key in keys} for row in rows]


def main() -> None:
    HERE.mkdir(exist_ok=True)
    alpaca_keys = ("instruction", "input", "output", "system", "history")
    files = {
        "alpaca.json": _fill(ALPACA, alpaca_keys),
        "long.json": _fill(LONG, alpaca_keys),
        "sharegpt.json": _fill(SHAREGPT, ("conversations", "system")),
        "tools.json": _fill(TOOLS, ("conversations", "tools", "system")),
        "dataset_info.json": DATASET_INFO,
    }
    for name, content in files.items():
        (HERE / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
