# ruff: noqa: RUF001
"""The parity tokenizers, built the same way by the reference generator (LLaMA-Factory's venv) and by the test.

Three byte-level BPE tokenizers trained on one corpus, as tokenizer.json + tokenizer_config.json directories that
both sides load with AutoTokenizer. They differ where templates care: `nobos` has no BOS (Qwen-like), `bos` has
<s>/</s> (Llama-like), `eos0` has <|endoftext|> as BOS and EOS with id 0 (GPT-NeoX/Pythia-like). Each also carries
every special token the LLaMA-Factory templates name (stop words, token slots, <|...|> markup), so that every
template fits every tokenizer. Only `tokenizers` and the standard library are used, so both venvs run it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

KINDS: dict[str, dict[str, Any]] = {
    "nobos": {"specials": ["<|pad|>", "<|endoftext|>"], "bos": None, "eos": "<|endoftext|>", "pad": "<|pad|>"},
    "bos": {"specials": ["<unk>", "<s>", "</s>"], "bos": "<s>", "eos": "</s>", "pad": None},
    "eos0": {"specials": ["<|endoftext|>"], "bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None},
}

CORPUS = [
    "Hello world, how are you today? I am fine, thank you. What is the capital of France? Paris.",
    "Translate to German: good morning. Guten Morgen. Add 2 and 3. The answer is 5. Multiply 4 by 7.",
    "Explain, step by step and without skipping any step, how to sum the numbers from 1 to 18.",
    "Step 1: add 1 to the running total, which is now 1. Step 2: add 2 to the running total.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: Human: Assistant: System: Observation: USER: ASSISTANT: user assistant system",
    "You have access to the following tools: Tool Name: Tool Description: Tool Args: Action: Action Input:",
    'get_weather {"city": "Berlin", "unit": "celsius"} {"name": "add", "arguments": {"numbers": [1, 2, 3]}}',
    "function parameters properties description required type object string array number enum items",
    "今天天气很好。把这句话翻译成英文。你好！有什么可以帮你？中文的问题中文的回答。東京 雨",
    "🙂 🐍 🦀 ❤️ ☀️ 🎉 😊 ☔ The quick brown fox jumps over the lazy dog 0123456789 {} [] () <> : ; , . ! ? ' \"",
]
VOCAB_SIZE = 900
MARKUP = re.compile(r"<\|[^<>|\s]{1,40}\|>")


def template_tokens(templates: dict[str, Any]) -> list[str]:
    """Every token a template (lf_templates.TEMPLATES) names: stop words, token slots and <|...|> markup."""
    found: set[str] = set()
    for spec in templates.values():
        found.update(spec["stop_words"])
        for key in ("prefix", "system", "user", "assistant", "observation", "function", "tools"):
            for slot in spec.get(key) or []:
                if isinstance(slot, dict) and "token" in slot:
                    found.add(slot["token"])
                elif isinstance(slot, str):
                    found.update(MARKUP.findall(slot))
    return sorted(found)


def build(kind: str, directory: Path, templates: dict[str, Any]) -> Path:
    """Write tokenizer `kind` to `directory`; returns the directory."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = KINDS[kind]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    extra = [t for t in template_tokens(templates) if t not in spec["specials"]]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "pad_token": spec["pad"],
        "unk_token": None,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
