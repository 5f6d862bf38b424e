"""Checkpoint stall on CPU: step time with checkpoints to S3 against the same run without them (not a test).

Builds a Qwen2-shaped model with random weights (default: Qwen2.5-0.5B's layer shape, hidden 896, 24 layers,
intermediate 4864, 14 heads / 2 KV heads, with the test tokenizer's small vocabulary), starts a real MinIO
(tests/support, `bash tests/testbin/build.sh minio`), and runs the real recipe (finetune_trainer.recipe, the code a
Pod runs) in this process for each method twice: once with a checkpoint every --save-every steps uploaded to MinIO
(the Trainer serializes it locally, CheckpointUploader uploads it in the background while training goes on), once
with saveSteps past the end. The input is the model and a small alpaca file on local disk in both runs.

Step time is the wall time between the end of the first --warmup steps and the end of the last step, divided by
the steps in between: it includes every save the Trainer made in that window and whatever the background upload
takes from the two CPUs, and leaves out the final save after the last step. Each of the --repeat rounds is a pair of
runs, one with checkpoints and one without (the order alternates from round to round), and gives that pair's
overhead; the figure is the median over the rounds (on the 2-CPU development VM the same run's step time moved by up
to 7% from one invocation to the next, so a pair run back to back says more than the best of each side). Before
each run the page cache is written back and, where this process may (root), dropped, as in bench_s3_pull.py: writes
into a page cache that must first evict other files cost several times the CPU on the development VM.

    ~/.cache/finetune-operator/venv/bin/python bench/bench_checkpoint.py [--methods lora,full] [--steps 12]
        [--save-every 4] [--layers 24] [--repeat 1] [--sync-writes] [--train-threads N]

The trainer copies a checkpoint's optimizer state (and a full fine-tune's weights) into host buffers and writes
the files in the background (finetune_trainer/staging.py), the optimizer state and the weights straight into the
store (no local files); --sync-writes turns that off, so that a run can be compared with the Trainer writing every
file before the next step.

Also the part the save blocks: the time between the end of a step and the start of the next (where the Trainer
serializes the checkpoint and the callbacks hand it to the uploader), against the same gaps without saves; the rest
of the overhead is what the background upload and the object store take from the same CPUs. After its first step
the Trainer reserves the staging buffers in the background (staging.StagedWrites.reserve); the gap after the first
step, before the window, is printed for each run. The run without checkpoints stages nothing (its one save comes
after the window): the reservation is a cost of checkpointing and falls in the window of the run with them.

Background work that is merely put off past the window would flatter the figure: each run also prints how many of
the checkpoints saved before the window's last step were uploaded by that step's end ("2 of 2" with the defaults).
While a checkpoint is in the background, training on the CPU gives one of its intra-op threads to it
(callbacks.YieldCoreToCheckpoints); --train-threads 1 trains on one thread throughout, in both runs, leaving the
other core to the background writes, the upload and MinIO, as a GPU node's host CPUs would be left.

Last line: `checkpoint overhead lora P% (blocking B%), full Q% (blocking C%)`.

--writes-only measures, without training, the background part of a full fine-tune's checkpoint that the trainer
serializes from its staged copy: the weights and AdamW state of the model's shape (random values, fp32; 1 + 2 x 4
bytes per parameter) written the two ways the trainer can, alternating over --repeat rounds, the page cache dropped
before each: to local files (safetensors' save_file, as save_pretrained writes them, and torch.save) that the
uploader then hashes and uploads (`upload_dir`) and removes, as when the store refuses the stream; and streamed
straight into the store (staging.save_weights_staged and save_staged with a target). Prints wall and CPU seconds
(this process, MinIO) for each, medians over the rounds; last line `full checkpoint in the background: file W s, C
CPU s (M MinIO); stream ...; stream/file CPU R`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from benchutil import drop_page_cache, process_cpu_seconds  # noqa: E402
from trainer.tiny import build_tokenizer  # noqa: E402
from trainer.tinymodels import write_dataset  # noqa: E402

from finetune_trainer.config import TrainerConfig  # noqa: E402
from finetune_trainer.distenv import Ranks  # noqa: E402
from finetune_trainer.progress import ProgressReporter  # noqa: E402
from finetune_trainer.recipe import FineTuneRecipe  # noqa: E402
from support.s3 import MinioServer  # noqa: E402

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"type": "lora", "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target": "all"}},
    "full": {"type": "full"},
}


def model_config(layers: int, hidden: int, intermediate: int) -> Any:
    """The bench's Qwen2 shape with the test tokenizer's vocabulary and special tokens."""
    from transformers import Qwen2Config

    tokenizer = build_tokenizer()
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )


def write_model(directory: Path, layers: int, hidden: int, intermediate: int) -> int:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(model_config(layers, hidden, intermediate))
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


class StepClock:
    """Wall time at the start and the end of each optimizer step (a transformers TrainerCallback). Between the end
    of one step and the start of the next the Trainer logs and saves: that gap is what a save blocks."""

    def __init__(self, store_pid: int, uploaded: list[int]) -> None:
        self.store_pid = store_pid
        self.uploaded = uploaded  # the uploader's steps whose checkpoints are uploaded and complete, in order
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.cpu: list[tuple[float, float]] = []  # at each step's end: CPU s of this process and of the store
        self.done: list[int] = []  # at each step's end: how many checkpoints were uploaded by then

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.begins.append(time.perf_counter())

    def __getattr__(self, name: str) -> Any:  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append((process_cpu_seconds(os.getpid()), process_cpu_seconds(self.store_pid)))
        self.done.append(len(self.uploaded))


class Window(NamedTuple):
    seconds: float  # wall seconds per step
    between: float  # of them, between the end of a step and the start of the next
    after_first: float  # seconds between the end of the first step and the start of the second (before the window)
    cpu: float  # CPU seconds per step of this process (training, saves, the upload's client side)
    store_cpu: float  # CPU seconds per step of MinIO
    saved: int  # checkpoints saved before the window's last step
    uploaded: int  # of them, uploaded by the end of that step (the rest of their upload fell after the window)


def run_once(
    work: Path,
    model: Path,
    data: Path,
    output_uri: str,
    storage: dict[str, Any],
    method: str,
    save_every: int,
    args: argparse.Namespace,
    store_pid: int,
) -> Window:
    """Seconds per step in the window, the part of them between steps (logging, saving), and CPU seconds per step
    of this process and of the object store in the same window."""
    config = TrainerConfig.model_validate(
        {
            "jobName": f"bench-{method}",
            "model": {"uri": model.as_uri()},
            "datasets": [{"uri": data.as_uri(), "format": "alpaca"}],
            "method": METHODS[method],
            "training": {
                "maxSteps": args.steps,
                "learningRate": 1e-4,
                "perDeviceBatchSize": 1,
                "gradientAccumulationSteps": 1,
                "cutoffLen": args.cutoff,
                "packing": True,
                "precision": "fp32",
                "gradientCheckpointing": False,
                "loggingSteps": 1,
                "saveSteps": save_every,
                "seed": 7,
            },
            "output": {"uri": output_uri, "checkpoints": {"keep": 2}, "plotLoss": False},
            "storage": storage,
            "cacheDir": str(work / "cache"),
        }
    )
    quiet = ProgressReporter(config.job_name, None, stream=open(os.devnull, "w"))  # noqa: SIM115
    recipe = FineTuneRecipe(config, ranks=Ranks(0, 0, 1, 1), reporter=quiet)
    try:
        recipe.setup()
        assert recipe.uploader is not None
        clock = StepClock(store_pid, recipe.uploader.completed)
        recipe.trainer.add_callback(clock)
        # --sync-writes: the Trainer writes every file before the next step, as before staging.py. In the run
        # without checkpoints nothing is staged either: its only save comes after the last step, and the staging
        # buffers it would reserve after its first step are a cost of checkpointing.
        if args.sync_writes or save_every > args.steps:
            recipe.trainer.staging = None
        recipe.train()  # returns once the background uploads have finished
    finally:
        recipe.cleanup()
        shutil.rmtree(work / "cache", ignore_errors=True)
    # The Trainer and its callbacks refer to each other: without a collection the model, its optimizer state and
    # the staging buffers of this run (8 GiB for a full fine-tune at the default shape) outlive it, and a later run
    # finds too little memory to stage its checkpoints (the trainer then writes them synchronously, and says so).
    del recipe
    gc.collect()
    first, last = args.warmup - 1, len(clock.ends) - 1
    steps = last - first
    between = sum(clock.begins[i + 1] - clock.ends[i] for i in range(first, last))
    (own0, store0), (own1, store1) = clock.cpu[first], clock.cpu[last]
    return Window(
        (clock.ends[last] - clock.ends[first]) / steps,
        between / steps,
        clock.begins[1] - clock.ends[0],
        (own1 - own0) / steps,
        (store1 - store0) / steps,
        (len(clock.ends) - 1) // save_every,  # the Trainer saves after a step's on_step_end
        clock.done[last],
    )


def state_like(layers: int, hidden: int, intermediate: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """A full checkpoint's state for a Qwen2-shaped model of write_model's shape (random values): the weights as
    save_pretrained writes them (the tied lm_head once), AdamW's state_dict, and the parameter count."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        shapes = {
            name: p.shape for name, p in Qwen2ForCausalLM(model_config(layers, hidden, intermediate)).named_parameters()
        }
    torch.manual_seed(0)
    weights = {name: torch.randn(shape) for name, shape in shapes.items()}
    state = {
        i: {"step": torch.tensor(4.0), "exp_avg": torch.randn(shape), "exp_avg_sq": torch.rand(shape)}
        for i, shape in enumerate(shapes.values())
    }
    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": list(state)}]
    return weights, {"state": state, "param_groups": groups}, sum(shape.numel() for shape in shapes.values())


def writes_only(args: argparse.Namespace) -> None:
    """--writes-only (see the module docstring)."""
    import torch
    from safetensors.torch import save_file

    from finetune_trainer.config import StorageSpec
    from finetune_trainer.staging import save_staged, save_weights_staged
    from finetune_trainer.storage import S3Storage

    torch.serialization.set_crc32_options(False)  # as the trainer saves checkpoints
    work = Path(tempfile.mkdtemp(prefix="ftj-bench-ckpt-"))
    server = MinioServer.start(work / "minio")
    try:
        bucket = server.new_bucket()
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = bucket.access_key, bucket.secret_key
        storage = S3Storage(StorageSpec(endpoint=bucket.endpoint_url, region=bucket.region, addressing_style="path"))
        weights, state, params = state_like(args.layers, args.hidden, args.intermediate)
        sizes = (
            sum(t.nbytes for t in weights.values()) / 2**30,
            sum(t.nbytes for s in state["state"].values() for t in s.values()) / 2**30,
        )
        print(f"a {params / 1e6:.0f}M-parameter Qwen2 shape: weights {sizes[0]:.2f} GiB, optimizer {sizes[1]:.2f} GiB")
        local = work / "checkpoint-1"
        local.mkdir()

        def to_file(uri: str) -> None:
            # As before the weights streamed: save_pretrained's safetensors file and torch.save's, then upload_dir.
            save_file(weights, str(local / "model.safetensors"), metadata={"format": "pt"})
            save_staged(state, str(local / "optimizer.pt"), None)
            storage.upload_dir(local, uri)
            for path in local.iterdir():
                path.unlink()

        def streamed(uri: str) -> None:
            save_weights_staged(weights, str(local), lambda name: (storage, uri + name), 50 * 10**9)
            save_staged(state, str(local / "optimizer.pt"), (storage, uri + "optimizer.pt"))

        ways = {"file": to_file, "stream": streamed}
        figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
        for attempt in range(args.repeat):
            for name in list(ways) if attempt % 2 == 0 else list(ways)[::-1]:
                drop_page_cache()
                own, store, started = process_cpu_seconds(os.getpid()), process_cpu_seconds(server.pid), time.time()
                ways[name](bucket.uri(f"{name}-{attempt}/"))
                wall = time.time() - started
                figure = (wall, process_cpu_seconds(os.getpid()) - own, process_cpu_seconds(server.pid) - store)
                figures[name].append(figure)
                print(
                    f"  round {attempt + 1} {name:6}: {wall:.1f} s, CPU s: this process {figure[1]:.2f}, "
                    f"MinIO {figure[2]:.2f}",
                    flush=True,
                )
        med = {name: [statistics.median(f[i] for f in runs) for i in range(3)] for name, runs in figures.items()}
        print(
            "full checkpoint in the background: "
            + "; ".join(f"{n} {w:.1f} s, {c:.2f} CPU s ({m:.2f} MinIO)" for n, (w, c, m) in med.items())
            + f"; stream/file CPU {(med['stream'][1] + med['stream'][2]) / (med['file'][1] + med['file'][2]):.2f}"
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--train-threads",
        type=int,
        default=0,
        help="torch's intra-op threads for training (default: torch's own, one per core); 1 on the 2-CPU VM leaves "
        "a core to the background writes, the upload and MinIO, as a GPU node's host CPUs would",
    )
    parser.add_argument(
        "--sync-writes",
        action="store_true",
        help="write each checkpoint's files before the next step (no staging in host memory), to compare",
    )
    parser.add_argument(
        "--writes-only",
        action="store_true",
        help="no training: a full checkpoint's background writes, to local files then uploaded, against streamed",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.writes_only:
        writes_only(args)
        return
    import torch

    if args.train_threads:
        torch.set_num_threads(args.train_threads)

    work = Path(tempfile.mkdtemp(prefix="ftj-bench-ckpt-"))
    server = MinioServer.start(work / "minio")
    store_pid = server.pid
    try:
        bucket = server.new_bucket()
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = bucket.access_key, bucket.secret_key
        storage = {"endpoint": bucket.endpoint_url, "region": bucket.region, "addressingStyle": "path"}
        params = write_model(work / "model", args.layers, args.hidden, args.intermediate)
        data = write_dataset(work / "data" / "train.jsonl", n=64)
        print(f"model: Qwen2 shape, {args.layers} layers, hidden {args.hidden}: {params / 1e6:.0f}M parameters (fp32)")
        print(
            f"{args.steps} steps of {args.cutoff} tokens, checkpoint every {args.save_every} to MinIO; "
            f"step time from step {args.warmup} to {args.steps}; training on {torch.get_num_threads()} thread(s) of "
            f"{os.cpu_count()} CPUs"
        )
        figures: dict[str, tuple[float, float]] = {}
        for method in args.methods.split(","):
            rounds: list[tuple[float, float]] = []  # per round: (overhead %, blocking %)
            for attempt in range(args.repeat):
                runs = [("with", args.save_every), ("without", 10 * args.steps)]
                measured: dict[str, Window] = {}
                for label, every in runs if attempt % 2 == 0 else runs[::-1]:
                    uri = bucket.uri(f"{method}-{label}-{attempt}/")
                    drop_page_cache()
                    run = run_once(work, work / "model", data, uri, storage, method, every, args, store_pid)
                    measured[label] = run
                    print(
                        f"  {method} {label:7} checkpoints: {run.seconds:.3f} s/step, {run.between:.3f} of it between "
                        f"steps ({run.after_first:.3f} s after the first step); CPU s/step: this process "
                        f"{run.cpu:.2f}, MinIO {run.store_cpu:.2f}; uploaded by the last step's end: "
                        f"{run.uploaded} of {run.saved}",
                        flush=True,
                    )
                with_, without = measured["with"], measured["without"]
                # What the save blocks (serialization in the Trainer, the callbacks), apart from what the background
                # writes, the upload and the object store take from the same CPUs while the next steps run.
                rounds.append(
                    (
                        100 * (with_.seconds / without.seconds - 1),
                        100 * (with_.between - without.between) / without.seconds,
                    )
                )
                print(
                    json.dumps(
                        {
                            "method": method,
                            "round": attempt + 1,
                            "with_s_per_step": round(with_.seconds, 3),
                            "without_s_per_step": round(without.seconds, 3),
                            "overhead_pct": round(rounds[-1][0], 1),
                            "blocking_pct": round(rounds[-1][1], 1),
                            # CPU seconds the checkpoints added per step: in this process (background writes, the
                            # upload's client side) and in MinIO, both on the two cores that train
                            "extra_cpu_s_per_step": round(with_.cpu - without.cpu, 2),
                            "store_cpu_s_per_step": round(with_.store_cpu - without.store_cpu, 2),
                        }
                    ),
                    flush=True,
                )
            figures[method] = (
                statistics.median(overhead for overhead, _ in rounds),
                statistics.median(blocking for _, blocking in rounds),
            )
        print("checkpoint overhead " + ", ".join(f"{m} {o:.1f}% (blocking {b:.1f}%)" for m, (o, b) in figures.items()))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
