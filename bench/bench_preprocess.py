"""Preprocessing throughput on CPU: samples/s of build_datasets on a generated alpaca set (not a test).

It writes N alpaca records (instruction, optional input, output; lengths drawn like a typical instruction set),
trains a byte-level BPE tokenizer on them (8k vocabulary, chatml specials and chat template; not timed), and times
a cold build_datasets (read, convert, shuffle, template, tokenize, mask, pack, write the Arrow cache) for each
template/packing combination (best of --repeat runs, each into a fresh cache), then a warm call that loads the cache.
A small untimed build first imports what the cache needs (pyarrow, datasets), so that no run pays for it.
For scale it also times the Rust tokenizer alone (`encode_batch`, its own threads) on the same rendered texts.

With --lf it also runs LLaMA-Factory's own SFT preprocessing (its alpaca converter and SupervisedDatasetProcessor,
one process, on the same records, tokenizer, template and cutoff) from the reference venv (tests/parity/lf_venv.sh),
alternating with ours in the same run, and prints both rates and the ratios. LLaMA-Factory is timed on in-memory
rows without writing its Arrow cache; ours end to end (file read to written cache), so the ratio is conservative.
Each of our runs also reports the CPU seconds it used (this process and its worker processes): on a machine that
other work keeps busy, wall-clock rates of several processes say more about the load than about the code.

    ~/.cache/finetune-operator/venv/bin/python bench/bench_preprocess.py [--samples 20000] [--cutoff 1024] [--repeat 2]
    ~/.cache/finetune-operator/venv/bin/python bench/bench_preprocess.py --lf --templates qwen --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from trainer.tiny import build_tokenizer  # noqa: E402

from finetune_trainer.config import TrainerConfig  # noqa: E402
from finetune_trainer.data import Conversation, Turn, build_datasets, get_template  # noqa: E402

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their can has more when would if will what so no out up about into than "
    "model data train answer question explain write list compute value function result number city weather time "
    "Paris Berlin Tokyo 0 1 2 3 4 5 6 7 8 9 , . ; : ? ! ( ) { } [ ] - + = * /"
)
VOCABULARY = WORDS.split()


def generate(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(low, high)))

    return [
        {
            "instruction": text(5, 60),
            "input": text(0, 80) if rng.random() < 0.4 else "",
            "output": text(10, 250),
        }
        for _ in range(count)
    ]


def conversations(rows: list[dict[str, str]]) -> list[Conversation]:
    return [
        Conversation(
            (Turn("user", "\n".join(p for p in (r["instruction"], r["input"]) if p)), Turn("assistant", r["output"]))
        )
        for r in rows
    ]


def _time(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _warm_up(work: Path, data: Path, tokenizer: object) -> None:
    """One small untimed build, so that the timed ones do not pay for importing pyarrow and datasets."""
    small = work / "warm-up.json"
    small.write_text(json.dumps(json.loads(data.read_text())[:200]))
    config = TrainerConfig.model_validate(
        {
            "model": {"uri": "file:///models/bench"},
            "datasets": [{"uri": small.as_uri()}],
            "output": {"uri": "file:///out"},
            "cache_dir": str(work / "cache-warm-up"),
        }
    )
    build_datasets(config, tokenizer)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the data and a token cache per run: hundreds of MB


def run(work: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--templates", default="auto,qwen", help="comma-separated templates to time")
    parser.add_argument("--repeat", type=int, default=2, help="cold runs per combination; the fastest counts")
    parser.add_argument("--workers", default="1,auto", help="comma-separated worker counts (auto = the default)")
    parser.add_argument("--lf", action="store_true", help="also time LLaMA-Factory's preprocessing (reference venv)")
    args = parser.parse_args()

    rows = generate(args.samples, seed=0)
    data = work / "alpaca.json"
    data.write_text(json.dumps(rows))
    corpus = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows[:2000]]
    tokenizer = build_tokenizer(corpus, vocab_size=8000)
    print(f"{args.samples} alpaca records, {data.stat().st_size / 1e6:.1f} MB JSON; tokenizer vocab {len(tokenizer)}")
    print(f"CPU: {os.cpu_count()} cores visible; cutoff_len {args.cutoff}")

    qwen = get_template("qwen", tokenizer)
    texts = ["".join(p for m in qwen.render(c).messages for p in m if isinstance(p, str)) for c in conversations(rows)]
    floor = min(
        _time(lambda: tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)) for _ in range(2)
    )
    print(f"tokenizer alone (Rust encode_batch, qwen-rendered texts): {len(texts) / floor:.0f} samples/s")
    _warm_up(work, data, tokenizer)
    print(
        f"{'template':8} {'packing':7} {'workers':7} {'cold s':>7} {'samples/s':>10} {'tokens/s':>10} {'rows':>6} "
        f"{'warm s':>7}"
    )
    combinations = [
        (template, packing, workers)
        for template in args.templates.split(",")
        for packing in (True, False)
        for workers in args.workers.split(",")
    ]
    if args.lf:
        compare_with_lf(args, work, data, tokenizer)
        return
    for template, packing, workers in combinations:
        cold = float("inf")
        for attempt in range(args.repeat):
            config = TrainerConfig.model_validate(
                {
                    "model": {"uri": "file:///models/bench"},
                    "datasets": [{"uri": data.as_uri()}],
                    "output": {"uri": "file:///out"},
                    "template": template,
                    "cache_dir": str(work / f"cache-{template}-{packing}-{workers}-{attempt}"),
                    "training": {"cutoff_len": args.cutoff, "packing": packing},
                }
            )
            started = time.perf_counter()
            bundle = build_datasets(config, tokenizer, workers=None if workers == "auto" else int(workers))
            cold = min(cold, time.perf_counter() - started)
        started = time.perf_counter()
        build_datasets(config, tokenizer)
        warm = time.perf_counter() - started
        stats = bundle.stats
        print(
            f"{template:8} {packing!s:7} {workers:7} {cold:7.2f} {stats.samples / cold:10.0f} "
            f"{stats.tokens / cold:10.0f} {stats.rows:6d} {warm:7.2f}"
        )


def compare_with_lf(args: argparse.Namespace, work: Path, data: Path, tokenizer: object) -> None:
    lf_python = subprocess.run(
        [str(REPO / "tests" / "parity" / "lf_venv.sh")], check=True, capture_output=True, text=True
    ).stdout.strip()
    tokenizer_dir = work / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)  # type: ignore[attr-defined]
    for template in args.templates.split(","):
        # workers → (best samples/s, CPU seconds of that run), in the order asked for
        ours: dict[str, tuple[float, float]] = dict.fromkeys(args.workers.split(","), (0.0, 0.0))
        theirs = float("inf")
        for attempt in range(args.repeat):
            # Each worker count in turn first: whatever runs right after LLaMA-Factory's process meets a colder CPU.
            counts = args.workers.split(",")
            for workers in counts if attempt % 2 == 0 else counts[::-1]:
                config = TrainerConfig.model_validate(
                    {
                        "model": {"uri": "file:///models/bench"},
                        "datasets": [{"uri": data.as_uri()}],
                        "output": {"uri": "file:///out"},
                        "template": template,
                        "cache_dir": str(work / f"cache-lf-{template}-{workers}-{attempt}"),
                        "training": {"cutoff_len": args.cutoff, "packing": False},
                    }
                )
                cpu = _cpu()
                started = time.perf_counter()
                bundle = build_datasets(config, tokenizer, workers=None if workers == "auto" else int(workers))
                rate = bundle.stats.samples / (time.perf_counter() - started)
                if rate > ours[workers][0]:
                    ours[workers] = (rate, _cpu() - cpu)
            env = {**os.environ, "LLAMAFACTORY_VERBOSITY": "ERROR", "TOKENIZERS_PARALLELISM": "true"}
            worker = REPO / "tests" / "parity" / "lf_bench_worker.py"
            command = [lf_python, str(worker), str(tokenizer_dir), str(data), template, str(args.cutoff)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)
            theirs = min(theirs, result["seconds"])
            lf_rate = result["samples"] / theirs
        first = next(iter(ours.values()))[0]
        for workers, (rate, cpu) in ours.items():
            print(
                f"{template}: ours {workers} worker(s) {rate:.0f} samples/s ({cpu:.2f} CPU s); LLaMA-Factory 1 process "
                f"{lf_rate:.0f} samples/s; ratio {rate / lf_rate:.2f}x; vs ours with {args.workers.split(',')[0]} "
                f"worker(s) {rate / first:.2f}x"
            )


if __name__ == "__main__":
    main()
