"""The training recipe: setup -> train -> queue_checkpoint_upload (from the loop) -> finish -> cleanup.

Every rank of a torchrun job runs this. Side effects sit behind small interfaces (Storage, NodeCache,
ProgressReporter), so the same code trains from file:// paths in tests and `ftj run` and from S3 in a cluster.
The optimisation loop, DDP/DeepSpeed wiring, mixed precision, gradient checkpointing, schedulers, evaluation and
the local checkpoint format are the Hugging Face Trainer's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer import tracking
from finetune_trainer.cache import NodeCache
from finetune_trainer.checkpoints import (
    LOCAL_PREFIX,
    MANIFEST,
    CheckpointRef,
    CheckpointUploader,
    apply_retention,
    latest_complete,
    list_checkpoints,
    remove_unfinished_writes,
    step_uri,
)
from finetune_trainer.config import TrainerConfig
from finetune_trainer.deepspeed import deepspeed_config, fsdp_config
from finetune_trainer.device import collective_backend, device_type
from finetune_trainer.distenv import Ranks
from finetune_trainer.errors import OutputInUseError
from finetune_trainer.identity import RunIdentity, check_checkpoints, check_record
from finetune_trainer.progress import ProgressReporter, StatusClient
from finetune_trainer.samples import SAMPLES_FILE
from finetune_trainer.storage import Storage, join_uri, open_storage
from finetune_trainer.timefmt import now_rfc3339

log = logging.getLogger(__name__)

LOSS_PLOT = "loss.png"
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the Pod was asked to stop; the next one resumes from the saved checkpoint


@dataclass
class RunResult:
    """How the run ended: finished (outputs uploaded), preempted (checkpoint saved), or already done earlier."""

    status: str  # "finished" | "preempted" | "already-complete"
    step: int
    resumed_from: int | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_PREEMPTED if self.status == "preempted" else 0


def _skip_zip_crc32() -> None:
    """torch.save computes a CRC32 of every record of its zip file (~0.6 CPU s/GiB on the development VM, all of it
    while the step waits for the save) that torch.load never checks: a flipped byte loads silently either way.
    Checkpoints are checked end to end instead (each file's sha256 in its node record, which the store checks the
    upload against, and the store's checksums on download), so this process's saves skip it."""
    import torch

    torch.serialization.set_crc32_options(False)


class FineTuneRecipe:
    """One training run of `config` on this rank."""

    def __init__(
        self,
        config: TrainerConfig,
        *,
        ranks: Ranks | None = None,
        output_storage: Storage | None = None,
        reporter: ProgressReporter | None = None,
    ) -> None:
        self.config = config
        self.ranks = ranks or Ranks.from_env()
        self.output_uri = config.output.uri if config.output.uri.endswith("/") else config.output.uri + "/"
        self.storage = output_storage or open_storage(self.output_uri, config.storage)
        self.cache = NodeCache(
            Path(config.cache_dir) / "downloads", self._storage_for, self.ranks, durable=config.cache_durable
        )
        self.work_dir = Path(config.cache_dir) / "work" / config.job_name
        self.final_dir = self.work_dir / "final"
        self.tensorboard_dir = self.work_dir / tracking.TENSORBOARD_DIR
        self.tensorboard_uri = join_uri(self.output_uri, tracking.TENSORBOARD_DIR + "/")
        self._environ_before: dict[str, str | None] = {}
        if reporter is None and self.ranks.is_main:
            reporter = ProgressReporter(config.job_name, StatusClient.in_cluster(config.job_name, config.namespace))
        self.reporter = reporter
        self.identity = RunIdentity.of(config)
        self.resume: CheckpointRef | None = None
        self.attempt = ""
        self.resume_dir: Path | None = None
        self.trainer: Any = None
        self.uploader: CheckpointUploader | None = None
        self.preemption: Any = None
        self.checkpoint_callback: Any = None
        self.summary: Any = None
        self.data: Any = None

    def _storage_for(self, uri: str) -> Storage:
        return open_storage(uri, self.config.storage)

    # -- setup -------------------------------------------------------------------------------------------------

    def final_manifest(self) -> dict[str, Any] | None:
        """The manifest of this run's final outputs, if they are complete in storage (a restarted Pod after success
        must not train again); OutputInUseError if they are another run's."""
        uri = join_uri(self.output_uri, MANIFEST)
        raw = self.storage.read_bytes(uri)
        if raw is None:
            return None
        try:
            manifest = json.loads(raw)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict):
            manifest = {}  # complete all the same: it is written last, as before
        check_record(self.identity, self.output_uri, uri, manifest)
        return manifest

    def setup(self) -> None:
        """Resolve the checkpoint to resume from, fetch the model, build args, model, data and the Trainer."""
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Before any model is loaded: with ZeRO-3 the arguments must exist first so that loading is partitioned.
        args = self.training_arguments()
        _skip_zip_crc32()
        self._init_deepspeed_comm()
        self.resume = self._agree_on_resume()
        self._remove_earlier_local_checkpoints()
        model_dir = self._fetch_model_and_resume_checkpoint()
        tokenizer, model = self._load_tokenizer_and_model(model_dir)
        collator = self._build_data(tokenizer, model)
        if self.ranks.is_main:
            self._configure_tracking()
        self._build_trainer(model, args, tokenizer, collator, self._build_callbacks())
        if self.reporter is not None and self.resume is not None:
            self.reporter.seed_checkpoints(self._existing_checkpoint_records())
            self.reporter.resumed(self.resume.step)
        self._log_setup_done(started, args)

    def _configure_tracking(self) -> None:
        """TensorBoard's directory (this attempt's event files, uploaded to <output>/tensorboard/ with every
        checkpoint and at the end) and the tracking services' environment (undone in cleanup)."""
        self._environ_before = tracking.configure(self.config, self.work_dir, self.tensorboard_dir)

    def _init_deepspeed_comm(self) -> None:
        """ZeRO-3 partitions while the model loads, with DeepSpeed's view of the world; on CPU (gloo) accelerate
        leaves deepspeed.comm uninitialised until the engine starts, and the load would see one rank."""
        if self.config.deepspeed is None or not self.ranks.distributed:
            return
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend=dist.get_backend())

    def _remove_earlier_local_checkpoints(self) -> None:
        """Local checkpoint directories of an earlier container are never resumed from (storage is the truth) and
        must not be mixed into this run's uploads."""
        if self.ranks.is_local_main:
            for old in self.work_dir.glob(LOCAL_PREFIX + "*"):
                shutil.rmtree(old, ignore_errors=True)

    def _fetch_model_and_resume_checkpoint(self) -> Path:
        """Fetch the base model (returned) and the checkpoint to resume from (into self.resume_dir), once per
        node."""
        model_dir = self.cache.fetch(self.config.model.uri)
        if self.resume is not None:
            self.resume_dir = self.cache.fetch(self.resume.uri)
            log.info("resuming from %s (step %d)", self.resume.uri, self.resume.step)
        return model_dir

    def _load_tokenizer_and_model(self, model_dir: Path) -> tuple[Any, Any]:
        """The tokenizer (padding with EOS when it has no pad token) and the model with the method applied."""
        from transformers import AutoTokenizer, set_seed

        from finetune_trainer.methods import apply_method, load_model

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=self.config.model.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # The seed covers initialisation too: LoRA's A matrices are random, and a restarted run must match.
        set_seed(self.config.training.seed)
        model = load_model(self.config, model_dir, self.ranks)
        model, self.summary = apply_method(model, self.config)
        log.info("%s", self.summary.line())
        return tokenizer, model

    def _build_data(self, tokenizer: Any, model: Any) -> Any:
        """Build the datasets into self.data; returns the collator for the model's attention implementation."""
        from finetune_trainer.data import build_datasets

        self.data = build_datasets(
            self.config,
            tokenizer,
            self.cache.fetch,
            local_rank=self.ranks.local_rank,
            is_local_main=self.ranks.is_local_main,
        )
        attn = getattr(model.config, "_attn_implementation", None)
        return self.data.collator(attn)

    def _build_callbacks(self) -> list[Any]:
        """The checkpoint uploader (one per node) and the Trainer callbacks: checkpoint, preemption, progress."""
        from finetune_trainer.callbacks import (
            CheckpointCallback,
            PreemptionCallback,
            ProgressCallback,
            TrackingLinkCallback,
        )

        if self.ranks.is_local_main:
            self.uploader = CheckpointUploader(
                self.storage,
                self.output_uri,
                self.ranks,
                keep=self.config.output.checkpoints.keep,
                job_name=self.config.job_name,
                attempt=self.attempt,
                run=self.identity.record(),
                on_complete=self._checkpoint_complete if self.ranks.is_main else None,
            )
        self.preemption = PreemptionCallback(self.ranks)
        check = self.uploader.check if self.uploader is not None else None
        self.checkpoint_callback = CheckpointCallback(self.queue_checkpoint_upload, self.ranks, check)
        callbacks: list[Any] = [self.checkpoint_callback, self.preemption]
        if self.reporter is not None:
            callbacks.append(ProgressCallback(self.reporter))
            callbacks += tracking.callbacks(self.config, self.work_dir)
            services = tracking.services(self.config)
            if services:
                uri = tracking.spec_of(self.config).mlflow_tracking_uri
                callbacks.append(TrackingLinkCallback(services, self.reporter, uri))
        return callbacks

    def _build_trainer(self, model: Any, args: Any, tokenizer: Any, collator: Any, callbacks: list[Any]) -> None:
        from transformers import PrinterCallback

        from finetune_trainer.callbacks import ResumableTrainer, YieldCoreToCheckpoints
        from finetune_trainer.staging import StagedWrites

        self.trainer = ResumableTrainer(
            model=model,
            args=args,
            train_dataset=self.data.train,
            eval_dataset=self.data.eval,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        self.trainer.remove_callback(PrinterCallback)  # our JSON lines replace its printed dicts
        if self.uploader is not None:  # the process that uploads this node's checkpoints writes them off the step
            staging = self.trainer.staging = StagedWrites()
            self.trainer.stored_file = self.uploader.stored_file
            self.trainer.add_callback(YieldCoreToCheckpoints(self.uploader.busy_since, staging.busy_since))

    def _log_setup_done(self, started: float, args: Any) -> None:
        import torch

        log.info(
            "setup done in %.1fs: %d train rows, %s eval rows, device %s, torch %s",
            time.monotonic() - started,
            len(self.data.train),
            len(self.data.eval) if self.data.eval is not None else "no",
            args.device,
            torch.__version__,
        )

    def training_arguments(self) -> Any:
        from transformers import TrainingArguments

        cfg, training = self.config, self.config.training
        warmup: float = 0
        if training.warmup_steps is not None:
            warmup = training.warmup_steps
        elif training.warmup_ratio is not None:
            warmup = training.warmup_ratio  # transformers 5 reads a value below 1 as a fraction of all steps
        has_eval = bool(cfg.eval_datasets) or cfg.val_size is not None
        kind = device_type()
        kwargs: dict[str, Any] = {
            "output_dir": str(self.work_dir),
            "num_train_epochs": training.epochs,
            "max_steps": training.max_steps or -1,
            "learning_rate": training.learning_rate,
            "lr_scheduler_type": training.lr_scheduler,
            "warmup_steps": warmup,
            "weight_decay": training.weight_decay,
            "max_grad_norm": training.max_grad_norm,
            "per_device_train_batch_size": training.per_device_batch_size,
            "per_device_eval_batch_size": training.per_device_eval_batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "bf16": training.precision == "bf16",
            "fp16": training.precision == "fp16",
            "activation_checkpointing": training.gradient_checkpointing,
            "activation_checkpointing_kwargs": {"use_reentrant": False} if training.gradient_checkpointing else None,
            "seed": training.seed,
            "data_seed": training.seed,
            "logging_steps": training.logging_steps,
            "save_strategy": "steps",
            "save_steps": training.save_steps,
            "save_total_limit": None,  # retention happens in storage, after uploads (checkpoints.py)
            "eval_strategy": "steps" if has_eval else "no",
            "eval_steps": training.eval_steps or training.save_steps,
            # Global rank 0 reports: TensorBoard always, and the services spec.tracking names (tracking.py).
            "report_to": tracking.report_to(cfg) if self.ranks.is_main else "none",
            "run_name": tracking.run_name(cfg),
            "disable_tqdm": True,
            "include_num_input_tokens_seen": "non_padding",
            "remove_unused_columns": False,  # position_ids of packed rows are not in forward()'s signature names
            "use_cpu": kind == "cpu",
            "ddp_backend": collective_backend(kind) if self.ranks.distributed else None,
            # Ranks of different nodes can reach their first collective far apart (one node downloads longer).
            "ddp_timeout": int(os.environ.get("FTJ_DDP_TIMEOUT", "7200")),
            "log_level": "warning",  # our own log lines and JSON progress say what matters
        }
        if cfg.deepspeed is not None:
            kwargs["deepspeed"] = self._deepspeed_config_path()
        if cfg.fsdp is not None:
            kwargs["fsdp"] = True
            if cfg.fsdp.offload and kind == "cpu":
                log.warning("fsdp.offload has no effect here: this process trains on the CPU, where the shards are")
            kwargs["fsdp_config"] = fsdp_config(cfg, on_cpu=kind == "cpu")
            # FSDP checkpoints activations itself (fsdp_config); the Trainer's own would add an all-gather.
            kwargs["activation_checkpointing"] = False
            kwargs["activation_checkpointing_kwargs"] = None
        return TrainingArguments(**kwargs)

    def _deepspeed_config_path(self) -> str:
        path = self.config.deepspeed_config_path
        if path and Path(path).is_file():
            return path
        assert self.config.deepspeed is not None
        # No rendered file mounted (local runs): render the same JSON the operator would.
        rendered = self.work_dir / f"deepspeed.rank{self.ranks.rank}.json"
        rendered.write_text(json.dumps(deepspeed_config(self.config.deepspeed), indent=1))
        return str(rendered)

    def _agree_on_resume(self) -> CheckpointRef | None:
        """Global rank 0 checks that the checkpoints in storage are this run's, picks the newest complete one and
        names this attempt; every rank takes the verdict (a checkpoint may complete while the ranks look, so they
        must not each look for themselves).

        Incomplete checkpoints newer than the choice are leftovers of an earlier attempt that this one will reach
        again; rank 0 deletes them first, with what writes of an earlier attempt left unfinished under the output
        (no rank of this attempt writes yet), and node records carry the attempt id, so that a stale record of
        another node can never complete a new checkpoint."""
        choice: CheckpointRef | None = None
        attempt = ""
        other_run = ""  # OutputInUseError's message: every rank fails with it
        if self.ranks.is_main:
            try:
                check_checkpoints(self.storage, self.output_uri, self.identity)
            except OutputInUseError as exc:
                other_run = str(exc)
        if self.ranks.is_main and not other_run:
            choice = latest_complete(self.storage, self.output_uri)
            attempt = uuid.uuid4().hex
            start = choice.step if choice else 0
            remove_unfinished_writes(self.storage, self.output_uri)
            for step in list_checkpoints(self.storage, self.output_uri).incomplete:
                if step > start:
                    log.info("deleting incomplete checkpoint step %d of an earlier attempt", step)
                    self.storage.delete_prefix(step_uri(self.output_uri, step))
        if self.ranks.distributed:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                box: list[Any] = [choice, attempt, other_run]
                dist.broadcast_object_list(box, src=0)
                choice, attempt, other_run = box
        if other_run:
            raise OutputInUseError(other_run)
        self.attempt = attempt
        return choice

    def _existing_checkpoint_records(self) -> list[dict[str, Any]]:
        records = []
        for step in list_checkpoints(self.storage, self.output_uri).complete:
            uri = step_uri(self.output_uri, step)
            raw = self.storage.read_bytes(join_uri(uri, MANIFEST))
            manifest = json.loads(raw) if raw else {}
            record: dict[str, Any] = {"step": step, "uri": uri, "time": manifest.get("time")}
            if manifest.get("loss") is not None:
                record["loss"] = manifest["loss"]
            records.append({k: v for k, v in record.items() if v is not None})
        return records

    def _checkpoint_complete(self, step: int, uri: str, loss: float | None) -> None:
        self.sync_tensorboard()
        if self.reporter is not None:
            existing = set(list_checkpoints(self.storage, self.output_uri).complete)
            deleted = [s for s in self.reporter.checkpoints if s not in existing]
            self.reporter.checkpoint(step, uri, loss, deleted=deleted)

    def sync_tensorboard(self) -> None:
        """Global rank 0: upload this attempt's TensorBoard event files to <output>/tensorboard/ (each file whole,
        replacing its earlier copy; the files of earlier attempts stay beside them). A failed upload is logged, not
        raised: the next checkpoint or the end of training uploads again."""
        if not self.ranks.is_main or not self.tensorboard_dir.is_dir():
            return
        target = self.tensorboard_uri
        try:
            for path in sorted(p for p in self.tensorboard_dir.rglob("*") if p.is_file()):
                self.storage.upload_file(path, join_uri(target, path.relative_to(self.tensorboard_dir).as_posix()))
        except Exception as exc:  # storage trouble must not stop training; the final upload is checked
            log.warning("could not upload the TensorBoard logs to %s: %s", target, exc)
            return
        if self.reporter is not None and "tensorboard" not in self.reporter.trainer_artifacts:
            self.reporter.artifacts(tensorboard=target)

    # -- train -------------------------------------------------------------------------------------------------

    def train(self) -> RunResult:
        """Run (or continue) training; on SIGTERM, stop after saving a checkpoint."""
        assert self.trainer is not None, "setup() first"
        self.preemption.install()
        try:
            self.trainer.train(resume_from_checkpoint=str(self.resume_dir) if self.resume_dir else None)
        finally:
            # Uploads finish even if training failed: what was saved stays resumable.
            if self.uploader is not None:
                self.uploader.drain()
        resumed = self.resume.step if self.resume else None
        step = int(self.trainer.state.global_step)
        if self.preemption.preempted:
            log.warning("preempted: checkpoint step %d is uploaded; the next Pod resumes from it", step)
            return RunResult("preempted", step, resumed)
        return RunResult("finished", step, resumed)

    def queue_checkpoint_upload(self, step: int, local_dir: Path, loss: float | None) -> None:
        """Checkpoint `step` is complete in `local_dir` on every rank of this node (the Trainer wrote it, every
        saveSteps, at the last step and on SIGTERM): this node's local rank 0 queues it for upload to
        <output>/checkpoints/step-<step>/; training goes on while it uploads."""
        if self.uploader is not None:
            writes, self.trainer.pending_writes = self.trainer.pending_writes, None
            self.uploader.submit(local_dir, step, loss=loss, writes=writes)

    # -- final outputs -----------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Export the adapter or model, tokenizer, trainer_state.json and the loss plot to <output>/ (manifest
        last)."""
        from finetune_trainer.plot import plot_loss

        trainer = self.trainer
        if self.final_dir.exists() and self.ranks.is_local_main:
            shutil.rmtree(self.final_dir)
        self._barrier()
        self._save_final_model()  # every rank: under ZeRO-3 and FSDP the weights are gathered collectively
        samples = self._write_samples()
        if not self.ranks.is_main:
            return  # only rank 0 uploads; the others must not sit in a collective while it does
        trainer.state.save_to_json(str(self.final_dir / "trainer_state.json"))
        if self.config.output.plot_loss:  # no file when nothing was logged: see report_artifacts
            plot_loss(trainer.state.log_history, self.final_dir / LOSS_PLOT, title=self.config.job_name)
        if self.tensorboard_dir.is_dir():  # the Trainer closed its writer at the end of training
            shutil.copytree(self.tensorboard_dir, self.final_dir / tracking.TENSORBOARD_DIR)
        files = self.storage.upload_dir(self.final_dir, self.output_uri)
        manifest = {
            "format": 1,
            "job": self.config.job_name,
            "method": self.config.method.type,
            "step": int(trainer.state.global_step),
            "time": now_rfc3339(),
            "files": files,
            "run": self.identity.record(),
        }
        if samples is not None:
            manifest["samples"] = samples
        self.storage.write_bytes(join_uri(self.output_uri, MANIFEST), json.dumps(manifest, indent=1).encode())
        log.info("final outputs uploaded to %s (%d files)", self.output_uri, len(files))
        apply_retention(self.storage, self.output_uri, self.config.output.checkpoints.keep)
        self.report_artifacts(manifest)

    def _save_final_model(self) -> None:
        """The model or adapter into the final directory, whole. FSDP checkpoints keep each rank's shards (the
        Trainer's sharded state dict); the final save gathers the full state dict on every rank and rank 0 writes it,
        as DDP saves it. (accelerate's own gather offloads to the CPU, and in a CPU process group the offloaded
        tensors alias storage FSDP frees again: safetensors cannot save them; on the CPU nothing needs offloading.)"""
        trainer = self.trainer
        if self.config.fsdp is None:
            trainer.save_model(str(self.final_dir))
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=device_type() != "cpu")
        state = get_model_state_dict(trainer.model, options=options)
        if self.ranks.is_main:
            trainer._save(str(self.final_dir), state_dict=state)

    def _write_samples(self) -> int | None:
        """output.samples: generate with the trained model into the final directory; the number of rows. Global
        rank 0 generates; under ZeRO-3 and FSDP every rank takes part (the weights are partitioned), rank 0
        writes."""
        if self.config.output.samples is None:
            return None
        from finetune_trainer.samples import write_samples

        synced = self.config.sharded() and self.ranks.distributed
        if not (self.ranks.is_main or synced):
            return None
        path = self.final_dir / SAMPLES_FILE if self.ranks.is_main else None
        rows = write_samples(
            self.trainer.model, self.trainer.processing_class, self.config, self.data.eval, path, synced=synced
        )
        return len(rows)

    def report_artifacts(self, manifest: dict[str, Any]) -> None:
        """Report the final outputs that `manifest` lists: the loss plot only with plotLoss on and only if it was
        written and uploaded (a run that logged no loss has none); TensorBoard's logs and the samples when
        uploaded."""
        if self.reporter is None:
            return
        kind = "adapter" if self.config.method.uses_adapter else "model"
        listed = {str(f.get("path")) for f in manifest.get("files") or [] if isinstance(f, dict)}
        written = self.config.output.plot_loss and LOSS_PLOT in listed
        uris: dict[str, str] = {
            kind: self.output_uri,
            "loss_plot": join_uri(self.output_uri, LOSS_PLOT) if written else "",
        }
        if any(path.startswith(tracking.TENSORBOARD_DIR + "/") for path in listed):
            uris["tensorboard"] = self.tensorboard_uri
        if SAMPLES_FILE in listed:
            uris["samples"] = join_uri(self.output_uri, SAMPLES_FILE)
        count = manifest.get("samples")
        self.reporter.artifacts(**uris)
        if SAMPLES_FILE in listed and isinstance(count, int):
            self.reporter.samples(count)

    def _barrier(self) -> None:
        if not self.ranks.distributed:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    # -- cleanup -----------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        tracking.restore(self._environ_before)
        if self.preemption is not None:
            self.preemption.uninstall()
        if self.uploader is not None:
            self.uploader.close()
        if self.reporter is not None:
            self.reporter.close()
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception as exc:  # shutting down; nothing useful to do with it
            log.debug("destroy_process_group: %s", exc)


def run(config: TrainerConfig, **kwargs: Any) -> RunResult:
    """The whole recipe for this rank."""
    recipe = FineTuneRecipe(config, **kwargs)
    try:
        final = recipe.final_manifest()
        if final is not None:
            log.info("the outputs of %s are already complete: nothing to do", recipe.output_uri)
            if recipe.ranks.is_main and recipe.reporter is not None:
                recipe.reporter.already_complete(recipe.output_uri)
                recipe.report_artifacts(final)
            return RunResult("already-complete", 0)
        recipe.setup()
        result = recipe.train()
        if result.status == "finished":
            recipe.finish()
        return result
    finally:
        recipe.cleanup()
