"""Hooks into the Hugging Face Trainer loop: checkpoint upload, preemption, progress reporting, and no training
past the last step on resume.

The Trainer already saves complete local checkpoints (model or adapter, optimizer, scheduler, every rank's RNG
state, trainer_state.json with the step the data loader skips to on resume, DeepSpeed shards); these callbacks add
what it lacks: uploading them in the background, agreeing across ranks on a save when one of them got SIGTERM, and
reporting progress to the FineTuneJob.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings

from finetune_trainer.checkpoints import LOCAL_PREFIX
from finetune_trainer.distenv import Ranks
from finetune_trainer.merge.shards import parse_size, tensor_entries
from finetune_trainer.progress import ProgressReporter
from finetune_trainer.staging import PendingWrites, StagedWrites, save_staged, save_weights_staged
from finetune_trainer.storage import Storage

log = logging.getLogger(__name__)


def _last_loss(state: TrainerState) -> float | None:
    for entry in reversed(state.log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return None


class _TokensMark(TrainerCallback):  # type: ignore[misc]
    """Starts ResumableTrainer's tokens/s clock when training (or a resumed run) begins."""

    def __init__(self, trainer: ResumableTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.trainer._tokens_mark = (time.monotonic(), int(getattr(state, "num_input_tokens_seen", 0) or 0))


class _ReserveStaging(TrainerCallback):  # type: ignore[misc]
    """After the first step of this process, when the optimizer state exists, reserves the staging buffers of the
    checkpoints to come (StagedWrites.reserve), so that the first save does not allocate them while the step waits."""

    def __init__(self, trainer: ResumableTrainer) -> None:
        self.trainer = trainer
        self.done = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.done:
            return
        self.done = True
        trainer = self.trainer
        staging = trainer.staging_for_saves()
        if staging is None or trainer.optimizer is None:
            return
        states = {"optimizer": trainer.optimizer.state_dict()}
        model = trainer.staged_model()
        if model is not None:
            states["model"] = model.state_dict()
        staging.reserve(states)


class YieldCoreToCheckpoints(TrainerCallback):  # type: ignore[misc]
    """On the CPU, a step that begins while a checkpoint's work runs in the background (buffers being reserved,
    files being written, hashed or uploaded) runs on one intra-op thread fewer when that work has outlasted a step
    (it had begun before the previous step began) or the work before it did; a step that begins with nothing in the
    background gets the thread back, and so does whatever follows training. `sources` say when the background work
    in progress began (time.monotonic()), or None.

    The background work needs a core. Left to compete with as many threads as cores, it preempts one of them and the
    others wait for it at every barrier of the step (bench/bench_checkpoint.py, docs/benchmarks.md: a full
    fine-tune's checkpoint every 4 steps on 2 CPUs). The choice holds for a whole step, so work that does not outlast
    one (a LoRA checkpoint's upload, a fraction of a step) keeps every thread: given at once, that thread cost the
    step more than the upload took. Nothing changes on a GPU, where the step does not run on the host's threads, or
    where training runs on one thread (several processes per node: torchrun sets one each)."""

    def __init__(self, *sources: Callable[[], float | None]) -> None:
        self.sources = sources
        self.threads = 0  # torch's intra-op threads for training; 0 where nothing is to be given
        self.previous: float | None = None  # when the previous step began
        self.long = False  # the background work seen last outlasted a step
        self.seen: bool | None = None  # background work at the previous step's beginning: whether it outlasted one

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        threads = torch.get_num_threads()
        self.threads = threads if args.device.type == "cpu" and threads > 1 else 0
        self.previous, self.long, self.seen = None, False, None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = time.monotonic()
        if self.threads:
            self._use(self.threads - 1 if self._give(now) else self.threads)
        self.previous = now

    def _give(self, now: float) -> bool:
        began = min((t for t in (source() for source in self.sources) if t is not None), default=None)
        if began is None:  # nothing in the background: what was there decides for the next checkpoint
            if self.seen is not None:
                self.long, self.seen = self.seen, None
            return False
        outlasted = self.previous is not None and began < self.previous
        if outlasted:
            self.long = True
        self.seen = bool(self.seen) or outlasted
        return outlasted or self.long

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.threads:
            self._use(self.threads)

    @staticmethod
    def _use(threads: int) -> None:
        if torch.get_num_threads() != threads:
            log.debug("training on %d intra-op thread(s)", threads)
            torch.set_num_threads(threads)


class ResumableTrainer(Trainer):  # type: ignore[misc]
    """The Hugging Face Trainer, except that a run resumed from the checkpoint of its last step trains no step.

    On resume the Trainer skips the epochs and batches the checkpoint had done and starts an epoch over what is left
    of it; it asks whether max_steps is reached only after a step (DefaultFlowCallback.on_step_end). A checkpoint at
    the last step (CheckpointCallback forces one, and SIGTERM during the last step saves one) that ends inside an
    epoch (maxSteps, or epochs that are not whole) therefore trained step max_steps + 1, saved it as a checkpoint and
    exported it. Here an epoch does not start once max_steps is reached: the Trainer ends as after its last step
    (train summary, on_train_end), with the model, optimizer and state of the checkpoint loaded, ready to export.
    """

    _tokens_mark: tuple[float, int] | None = None  # (time, tokens seen) at the previous training log
    # Set by the recipe in the process that writes and uploads this node's checkpoints: the model's weights and the
    # optimizer state of a checkpoint are staged in host memory and written in the background (staging.py);
    # `pending_writes` is the last save's, for the uploader to wait on.
    staging: StagedWrites | None = None
    pending_writes: PendingWrites | None = None
    # Where a staged file goes in storage (CheckpointUploader.stored_file): the background write puts it there.
    stored_file: Callable[[int, str], tuple[Storage, str]] | None = None
    # How long a save waits for the previous checkpoint's background writes, counted from their start, before it
    # writes its own checkpoint to the local disk unstaged (the store not answering must not stop training).
    staged_patience = 300.0
    _staging_save = False  # inside a checkpoint save that stages

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(_TokensMark(self))
        self.add_callback(_ReserveStaging(self))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Every training log also carries tokens_per_second (non-padding input tokens of all ranks per second
        since the previous one), so that progress, TensorBoard and the tracking services all get it."""
        if "loss" in logs:
            now = time.monotonic()
            tokens = int(getattr(self.state, "num_input_tokens_seen", 0) or 0)
            mark = self._tokens_mark
            if mark is not None and now > mark[0] and tokens > mark[1]:
                logs["tokens_per_second"] = round((tokens - mark[1]) / (now - mark[0]), 1)
            self._tokens_mark = (now, tokens)
        super().log(logs, *args, **kwargs)

    def staging_for_saves(self) -> StagedWrites | None:
        """`staging` where this process's checkpoints go through it. DeepSpeed and FSDP write their own sharded
        files, collectively: those saves stay as they are."""
        if not self.args.should_save or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        return self.staging

    def staged_model(self) -> PreTrainedModel | None:
        """The model whose whole state a staged save copies (full and freeze fine-tunes); None for an adapter (a
        PeftModel), which is small and saved as the Trainer saves it."""
        model = self.model
        return model if isinstance(model, PreTrainedModel) and self.processing_class is not None else None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """A checkpoint whose largest files are written in the background (see `staging`)."""
        staging = self.staging_for_saves()
        if staging is None:
            super()._save_checkpoint(model, trial)
            return
        # The previous checkpoint's files are written: its buffers can take this one.
        if not staging.ready(self.staged_patience):
            log.warning(
                "checkpoint step %d is written to the local disk before training goes on: the previous "
                "checkpoint's background writes (its optimizer state streaming into storage) have run for over "
                "%.0fs and still hold the staging buffers; the store may not be answering",
                self.state.global_step,
                self.staged_patience,
            )
            super()._save_checkpoint(model, trial)
            return
        self._staging_save = True
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            staging.discard()
            raise
        finally:
            self._staging_save = False
        self.pending_writes = staging.flush()

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """In a staged checkpoint save, the weights of a whole model (full and freeze fine-tunes) are copied to the
        staging buffers and, in the background, written straight into storage (`_store_weights`); the
        configuration, tokenizer and training arguments are written here. An adapter (a PeftModel) is small and
        saved as the Trainer saves it."""
        staging = self.staging
        if not self._staging_save or staging is None or state_dict is not None or output_dir is None:
            super()._save(output_dir, state_dict)
            return
        model = self.staged_model()
        tokenizer: Any = self.processing_class
        staged = staging.stage("model", model.state_dict()) if model is not None else None
        if model is None or staged is None:
            super()._save(output_dir, state_dict)
            return
        os.makedirs(output_dir, exist_ok=True)
        # The configuration files as save_pretrained writes them (it writes no weights file for no weights); the
        # weights from the staged copy in the background, straight into storage where there is a target.
        model.save_pretrained(output_dir, state_dict={}, is_main_process=True)
        stored_file, step = self.stored_file, self.state.global_step
        target = None if stored_file is None else functools.partial(stored_file, step)
        staging.defer(output_dir, functools.partial(_store_weights, model, staged, output_dir, target))
        tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """In a staged checkpoint save, the optimizer state is copied to the staging buffers and written in the
        background; the scheduler's (a few numbers) is written here."""
        staging = self.staging
        optimizer: Any = self.optimizer
        scheduler: Any = self.lr_scheduler
        staged = staging.stage("optimizer", optimizer.state_dict()) if self._staging_save and staging else None
        if staging is None or staged is None:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, OPTIMIZER_NAME)
        # The Trainer saves checkpoint `global_step` into checkpoint-<global_step>/.
        target = self.stored_file(self.state.global_step, OPTIMIZER_NAME) if self.stored_file is not None else None
        staging.defer(path, functools.partial(save_staged, staged, path, target))
        with warnings.catch_warnings(record=True) as caught:
            torch.save(scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        reissue_pt_warnings(caught)  # type: ignore[no-untyped-call]

    def create_accelerator_and_postprocess(self) -> None:
        """FSDP on the CPU too. accelerate (1.15) turns an FSDP plugin into FSDP only for accelerator process groups
        (its AcceleratorState ignores the plugin for MULTI_CPU, gloo): the Trainer would train plain DDP while the
        spec asked for sharding, and its FSDP save path would fail at the end. torch's FSDP2 runs on the CPU with
        gloo, and accelerate's FSDP2 preparation works there once the state says FSDP; so this sets it."""
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        if 0 < self.state.max_steps <= self.state.global_step:
            log.info("the checkpoint is at the last step (%d): nothing left to train", self.state.global_step)
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)  # type: ignore[no-untyped-call]


# save_pretrained's default: larger models go into shards of at most this size, and an index.
_MAX_SHARD_BYTES = parse_size("50GB")


def saved_weights(model: PreTrainedModel, state_dict: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The tensors `model.save_pretrained(state_dict=state_dict)` writes into its safetensors files, by the names it
    writes them under: the keys it ignores and the tied weights it drops (safetensors holds no aliases) removed,
    its weight conversions reverted. None where save_pretrained would do more than that (a quantized or offloaded
    model, a transformers without these steps, a dtype safetensors cannot hold): the caller then lets it save."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return None
    device_map = getattr(model, "hf_device_map", None) or {}
    if getattr(model, "hf_quantizer", None) is not None or {"cpu", "disk"} & set(device_map.values()):
        return None
    ignored = set(model._keys_to_ignore_on_save or ())
    tensors = {name: value for name, value in state_dict.items() if name not in ignored}
    tensors = revert_weight_conversion(model, remove_tied_weights_from_state_dict(tensors, model))
    if not all(isinstance(value, torch.Tensor) for value in tensors.values()) or tensor_entries(tensors) is None:
        return None
    return dict(tensors)


def _store_weights(
    model: PreTrainedModel,
    staged: dict[str, Any],
    directory: str,
    target: Callable[[str], tuple[Storage, str]] | None,
) -> list[dict[str, Any]] | None:
    """The background write of a staged checkpoint's weights, laid out as save_pretrained lays them: straight into
    storage at `target(file name)` (or into `directory` without a target) where `saved_weights` can name them, else
    through save_pretrained itself into `directory`."""
    tensors = saved_weights(model, staged)
    if tensors is None:
        model.save_pretrained(directory, state_dict=staged, is_main_process=True)
        return None
    return save_weights_staged(tensors, directory, target, _MAX_SHARD_BYTES)


class CheckpointCallback(TrainerCallback):  # type: ignore[misc]
    """After every save, once all ranks' files are written, hand the directory to `queue_upload` (the recipe's
    queue_checkpoint_upload).

    Also forces a save at the last step, so that a failure while exporting the final outputs resumes there instead
    of repeating training, and stops training when a background upload failed.
    """

    def __init__(
        self,
        queue_upload: Callable[[int, Path, float | None], None],
        ranks: Ranks,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.queue_upload = queue_upload
        self.ranks = ranks
        self.check = check
        self.saved_steps: list[int] = []

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_save = True
        if self.check is not None:
            self.check()  # a failed background upload stops training here, with its message

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.ranks.distributed and dist.is_available() and dist.is_initialized():
            # Every rank wrote its own files (RNG state, DeepSpeed shards); the node's uploader lists the directory
            # only once all of them are done. All ranks call on_save at the same step, so this cannot deadlock.
            dist.barrier()
        self.saved_steps.append(state.global_step)
        local = Path(str(args.output_dir)) / f"{LOCAL_PREFIX}{state.global_step}"
        self.queue_upload(state.global_step, local, _last_loss(state))


class PreemptionCallback(TrainerCallback):  # type: ignore[misc]
    """SIGTERM (a Pod being evicted or preempted) saves a checkpoint at the end of the current step, then stops.

    The Trainer's own JIT checkpointing decides per process when the signal arrives; with several ranks they could
    save at different steps and DeepSpeed's collective save would hang. Here the flag is combined across ranks with
    one all-reduce per optimizer step, so every rank stops and saves at the same step.
    """

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.requested = threading.Event()
        self.preempted = False
        self.preempted_at: int | None = None
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def uninstall(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested.is_set():
            log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        self.requested.set()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        flag = self.requested.is_set()
        if self.ranks.distributed and dist.is_available() and dist.is_initialized():
            device = torch.device("cpu") if dist.get_backend() == "gloo" else args.device
            tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        if flag and not self.preempted:
            self.preempted = True
            self.preempted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


class ProgressCallback(TrainerCallback):  # type: ignore[misc]
    """Global rank 0: turn the Trainer's logs into Progress reports (ETA from the steps done in this process)."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter
        self._t0 = 0.0
        self._step0 = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        self.reporter.report(step=state.global_step, total_steps=state.max_steps, epoch=state.epoch or 0.0)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return  # the end-of-training summary; the last step was already reported
        fields: dict[str, Any] = {"step": state.global_step, "total_steps": state.max_steps, "epoch": state.epoch}
        if "loss" in logs:
            fields["loss"] = float(logs["loss"])
            if logs.get("learning_rate") is not None:
                fields["learning_rate"] = float(logs["learning_rate"])
            if logs.get("tokens_per_second") is not None:
                fields["tokens_per_second"] = float(logs["tokens_per_second"])
        if "eval_loss" in logs:
            fields["eval_loss"] = float(logs["eval_loss"])
        done = state.global_step - self._step0
        if done > 0 and state.max_steps > 0:
            fields["eta_seconds"] = round(
                (time.monotonic() - self._t0) / done * (state.max_steps - state.global_step), 1
            )
        self.reporter.report(**fields)


class TrackingLinkCallback(TrainerCallback):  # type: ignore[misc]
    """Global rank 0: once the tracking integrations have started their runs, report the links they give."""

    def __init__(self, services: list[str], reporter: ProgressReporter, mlflow_uri: str | None) -> None:
        self.services = services
        self.reporter = reporter
        self.mlflow_uri = mlflow_uri

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        from finetune_trainer.tracking import run_links

        links = run_links(self.services, self.mlflow_uri)
        if links:
            self.reporter.tracking(links)
