"""Tiny real tokenizers and models for the trainer tests, built in-process: no hub, no network, a few ms each.

* `build_tokenizer()`: a byte-level BPE tokenizer trained on a small corpus, wrapped in transformers' fast
  tokenizer, with chatml special tokens and a chatml Jinja `chat_template` that renders system, tools, tool calls
  and tool results (so `template: auto` has something real to use). `llama3=True` adds the Llama 3 header tokens,
  `chatml=False` leaves the chatml ones out; `chat_template=None` gives a "base model" tokenizer without one.
* `tiny_llama(vocab_size)`: a randomly initialised 2-layer LlamaForCausalLM.
* `save_tiny_model(directory)`: both saved as a Hugging Face model directory, for code that loads from a path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# chatml with tool support, written for these tests: tools go into the system turn as JSON, tool calls into
# <tool_call> tags, tool results into a `tool` turn.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n' }}{%- endif %}"
    "{{- 'Tools: ' + (tools | tojson) + '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- for c in m.tool_calls %}{{- '<tool_call>' + (c.function | tojson) + '</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = (
    "Hello world, how are you today? I am fine, thank you.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to German: good morning. Guten Morgen.",
    "Add 2 and 3. The answer is 5. Multiply 4 by 7 to get 28.",
    'Call get_weather with {"city": "Berlin"} and read the result: sunny, 21 degrees.',
    "Write a short poem about the sea, the wind and the light over the water.",
    "system user assistant tool instruction input output response history conversation",
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "Human: Assistant: System: Observation: ### Instruction: ### Response:",
    "The quick brown fox jumps over the lazy dog 0123456789 {} [] () <> : ; , . ! ? ' \" _ - + = * / \\",
)


def build_tokenizer(
    corpus: Iterable[str] = CORPUS,
    *,
    vocab_size: int = 600,
    chatml: bool = True,
    llama3: bool = False,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Any:
    """A trained byte-level BPE tokenizer (fast) with eos/pad <|endoftext|> and chatml and/or Llama 3 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ("<|endoftext|>",) + (CHATML_SPECIALS[1:] if chatml else ()) + (LLAMA3_SPECIALS if llama3 else ())
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(specials[1:]),
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(vocab_size: int, *, seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any) -> Any:
    """A randomly initialised 2-layer Llama (hidden 32, 4 heads, 2 KV heads), fp32, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": None,
        "eos_token_id": 0,
        **overrides,
    }
    torch.manual_seed(seed)
    config = LlamaConfig(**settings)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    return model.eval()


def save_tiny_model(directory: Path, *, seed: int = 0, tokenizer: Any = None) -> Path:
    """A tiny Llama and its tokenizer saved as a Hugging Face model directory; returns the directory."""
    tokenizer = tokenizer or build_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
