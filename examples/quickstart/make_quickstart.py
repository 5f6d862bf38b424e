"""Make everything the quickstart needs, offline: a tiny model, its tokenizer, an alpaca dataset and a FineTuneJob.

    python examples/quickstart/make_quickstart.py out/quickstart
    ftj run out/quickstart/finetunejob.yaml

The model is a 2-layer Llama with random weights (about 0.5M parameters) and the tokenizer a byte-level BPE trained
on the dataset itself, so the whole LoRA fine-tune runs on a laptop CPU in a few minutes and nothing is downloaded.
The dataset teaches a fixed answer style ("The answer is N."), so the loss visibly falls within one run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_dataset(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op, word, value = rng.choice([("+", "Add", a + b), ("*", "Multiply", a * b), ("-", "Subtract", a - b)])
        rows.append(
            {
                "instruction": f"{word} {a} and {b}.",
                "input": "" if rng.random() < 0.7 else f"Compute {a} {op} {b}.",
                "output": f"The answer is {value}.",
            }
        )
    return rows


def make_tokenizer(texts: list[str], directory: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:]
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return len(fast)


def make_model(vocab_size: int, directory: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        # Wide enough that a frozen random head can still express confident predictions for LoRA to learn.
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def finetunejob(root: Path) -> dict[str, object]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "quickstart"},
        "spec": {
            "model": {"uri": f"file://{root / 'model'}"},
            "datasets": [{"uri": f"file://{root / 'data' / 'arithmetic.json'}", "format": "alpaca"}],
            "valSize": 0.1,
            "template": "auto",
            "method": {"type": "lora", "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target": ["all"]}},
            "training": {
                "epochs": 3,
                "learningRate": 0.01,
                "lrScheduler": "cosine",
                "warmupRatio": 0.05,
                "perDeviceBatchSize": 8,
                "gradientAccumulationSteps": 1,
                "cutoffLen": 128,
                "packing": True,
                "precision": "fp32",
                "gradientCheckpointing": False,
                "loggingSteps": 5,
                "saveSteps": 25,
                "evalSteps": 25,
            },
            "output": {
                "uri": f"file://{root / 'runs' / 'quickstart'}",
                "checkpoints": {"keep": 2},
                # After training: answers to these prompts and to three held-out samples, in samples.jsonl.
                "samples": {"prompts": ["Add 7 and 5.", "Multiply 3 and 4."], "fromEval": 3, "maxNewTokens": 16},
            },
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="out/quickstart")
    parser.add_argument("--samples", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import yaml

    root = Path(args.directory).resolve()
    (root / "data").mkdir(parents=True, exist_ok=True)
    rows = make_dataset(args.samples, args.seed)
    (root / "data" / "arithmetic.json").write_text(json.dumps(rows, indent=1))
    texts = [" ".join(r.values()) for r in rows] + ["system user assistant"]
    vocab = make_tokenizer(texts, root / "model")
    make_model(vocab, root / "model", args.seed)
    path = root / "finetunejob.yaml"
    path.write_text(yaml.safe_dump(finetunejob(root), sort_keys=False))
    print(f"quickstart: model, tokenizer and {len(rows)} samples in {root}; next: ftj run {path}")


if __name__ == "__main__":
    main()
