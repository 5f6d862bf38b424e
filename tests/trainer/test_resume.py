"""Checkpoints and resume: a run stopped by SIGTERM saves at the step it reached, a new run resumes from the newest
complete checkpoint in storage and continues with exactly the losses of an uninterrupted run; incomplete checkpoints
(no manifest) are skipped; retention keeps the newest `keep` complete ones."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, load_file
from trainer.leftovers import kill_while_writing
from trainer.tinymodels import losses_by_step, make_config, progress_lines, write_dataset, write_model
from transformers import TrainerCallback

from finetune_trainer.checkpoints import CheckpointUploader, latest_complete, list_checkpoints
from finetune_trainer.config import StorageSpec
from finetune_trainer.distenv import Ranks
from finetune_trainer.progress import ProgressReporter
from finetune_trainer.recipe import EXIT_PREEMPTED, FineTuneRecipe, RunResult
from finetune_trainer.storage import LocalStorage, S3Storage, StorageError
from support.s3 import MinioServer, S3Bucket

# Dropout > 0 makes the losses depend on the restored RNG state, so "equal" also proves RNG restore.
METHOD = {"type": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target": ["q_proj", "v_proj", "o_proj"]}}
TRAINING = {"maxSteps": 8, "saveSteps": 2, "learningRate": 2e-2, "lrScheduler": "cosine", "warmupSteps": 2}


class SigtermAt(TrainerCallback):  # type: ignore[misc]
    """Deliver a real SIGTERM to this process once training reaches `step`, as a Pod eviction would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _run(config: Any, sigterm_at: int | None = None, *, export: bool = True) -> tuple[RunResult, FineTuneRecipe, str]:
    """setup -> train -> finish -> cleanup as the launcher runs it; `export=False` stops before finish(), as a Pod
    killed (or an export failing) after training ended would."""
    stream = io.StringIO()
    recipe = FineTuneRecipe(config, reporter=ProgressReporter(config.job_name, stream=stream))
    try:
        recipe.setup()
        if sigterm_at is not None:
            recipe.trainer.add_callback(SigtermAt(sigterm_at))
        result = recipe.train()
        if result.status == "finished" and export:
            recipe.finish()
    finally:
        recipe.cleanup()
    return result, recipe, stream.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sources")
    return write_model(root / "model"), write_dataset(root / "train.jsonl", n=40)


@pytest.mark.parametrize("method", [METHOD, {"type": "full"}], ids=["lora", "full"])
def test_a_preempted_run_resumes_from_its_checkpoint_with_the_losses_of_an_uninterrupted_run(
    tmp_path: Path, sources: tuple[Path, Path], method: dict[str, Any]
) -> None:
    model, data = sources
    common = {"model_uri": model.as_uri(), "data_uri": data.as_uri(), "method": method, "training": TRAINING}
    reference, _, ref_log = _run(make_config(tmp_path / "a", **common))
    assert reference.status == "finished"
    expected = losses_by_step(progress_lines(ref_log))
    assert sorted(expected) == list(range(1, 9))

    interrupted_cfg = make_config(tmp_path / "b", **common)
    stopped, stopped_recipe, _ = _run(interrupted_cfg, sigterm_at=3)
    # The signal arrives during step 3's callbacks; all ranks agree on the following step boundary at the latest.
    assert stopped.status == "preempted"
    assert stopped.exit_code == EXIT_PREEMPTED
    assert stopped.step in (3, 4)
    storage = LocalStorage()
    listing = list_checkpoints(storage, interrupted_cfg.output.uri)
    assert listing.complete[-1] == stopped.step, "the preemption checkpoint was not uploaded before exit"
    assert not (tmp_path / "b" / "out" / "manifest.json").exists(), "a preempted run must not write final outputs"
    # Saved without torch.save's zip CRC32s (torch.load ignores them; the record's sha256 covers the file); the
    # resumed run below loads the optimizer state all the same.
    saved = tmp_path / "b" / "out" / "checkpoints" / f"step-{stopped.step}" / "optimizer.pt"
    assert {record.CRC for record in zipfile.ZipFile(saved).infolist()} == {0}
    # Both checkpoints (step 2 and the preemption's) went through the staging buffers: the optimizer state (and a
    # full fine-tune's weights) written in the background while training went on, then uploaded.
    assert not list(stopped_recipe.work_dir.glob("checkpoint-*")), "an uploaded checkpoint's local copy is removed"
    staging = stopped_recipe.trainer.staging
    assert staging is not None
    assert staging.staged_saves == 2
    # Their buffers were reserved after the first step, off the step that saved: the saves allocated nothing.
    assert staging.reserved_bytes == staging.buffer_bytes > 0
    assert staging.allocated_in_save == 0
    weights = "adapter_model.safetensors" if method is METHOD else "model.safetensors"
    assert (saved.parent / weights).is_file()
    if method is not METHOD:
        assert staging.buffer_bytes > 3 * sum(p.numel() * 4 for p in stopped_recipe.trainer.model.parameters())

    # A newer checkpoint whose upload never finished (no manifest) must be ignored.
    torn = tmp_path / "b" / "out" / "checkpoints" / "step-7"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"half a file")

    resumed, recipe, resume_log = _run(interrupted_cfg)
    assert resumed.status == "finished"
    assert resumed.resumed_from == stopped.step
    assert recipe.resume is not None
    assert recipe.resume.step == stopped.step
    events = [json.loads(line) for line in resume_log.splitlines() if '"event":"resumed"' in line]
    assert events
    assert events[0]["resumedFromStep"] == stopped.step
    got = losses_by_step(progress_lines(resume_log))
    assert sorted(got) == list(range(stopped.step + 1, 9)), "resumed run repeated or skipped steps"
    for step in got:
        # Same data order, RNG, optimizer and scheduler state: on CPU the numbers match to float rounding.
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got[step], expected[step])

    after = list_checkpoints(storage, interrupted_cfg.output.uri)
    assert after.complete == [6, 8], "retention keeps the newest 2 complete checkpoints"
    assert after.incomplete == [], "the torn checkpoint of the earlier attempt is cleaned up"
    assert json.loads((tmp_path / "b" / "out" / "manifest.json").read_text())["step"] == 8


# 40 rows, 4 a batch: 10 steps an epoch. A quarter epoch is 3 steps (ceil(2.5)), ending inside the epoch; 1 epoch
# ends on the epoch boundary.
@pytest.mark.parametrize(
    ("training", "total"),
    [({"maxSteps": 2}, 2), ({"epochs": 0.25}, 3), ({"epochs": 1}, 10)],
    ids=["maxSteps", "fractional-epochs", "whole-epochs"],
)
def test_a_run_resumed_from_its_final_checkpoint_trains_no_further_step_and_exports_it(
    tmp_path: Path, sources: tuple[Path, Path], training: dict[str, Any], total: int
) -> None:
    model, data = sources
    config = make_config(
        tmp_path,
        model_uri=model.as_uri(),
        data_uri=data.as_uri(),
        method=METHOD,
        training={**TRAINING, "maxSteps": None, "saveSteps": 1000, **training},
    )
    storage = LocalStorage()
    out = tmp_path / "out"

    # Training ends and the checkpoint forced at the last step is complete, but the Pod dies before the export.
    first, _, first_log = _run(config, export=False)
    assert first.status == "finished"
    assert first.step == total
    assert max(losses_by_step(progress_lines(first_log))) == total
    assert list_checkpoints(storage, config.output.uri).complete == [total]
    assert not (out / "manifest.json").exists()
    final_weights = load_file(out / "checkpoints" / f"step-{total}" / "adapter_model.safetensors")

    resumed, recipe, resume_log = _run(config)
    assert resumed.status == "finished"
    assert resumed.resumed_from == total
    assert resumed.step == total, f"resumed from the final step {total} and trained on to step {resumed.step}"
    progress = progress_lines(resume_log)
    assert losses_by_step(progress) == {}, "a step was trained after the final one"
    assert progress, "the resumed run reported no progress"
    assert all(r["step"] == total and r["totalSteps"] == total for r in progress), progress
    assert progress[-1]["summary"] == f"{total}/{total}"
    assert recipe.trainer.state.global_step == total

    # No checkpoint past the end; the final outputs are the weights of the final checkpoint, with its step.
    assert list_checkpoints(storage, config.output.uri).complete == [total]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == total
    exported = load_file(out / "adapter_model.safetensors")
    assert exported.keys() == final_weights.keys()
    for name, tensor in final_weights.items():
        assert exported[name].equal(tensor), name
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == total
    assert max(e["step"] for e in state["log_history"] if "loss" in e) == total
    artifacts = progress_lines(resume_log, "artifacts")
    assert [a.get("adapter") for a in artifacts] == [recipe.output_uri], artifacts


def test_an_epochs_run_resumed_mid_way_ends_exactly_at_its_last_step(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    model, data = sources
    config = make_config(
        tmp_path,
        model_uri=model.as_uri(),
        data_uri=data.as_uri(),
        method=METHOD,
        training={**TRAINING, "maxSteps": None, "epochs": 0.5, "saveSteps": 2},  # 5 steps
    )
    stopped, _, _ = _run(config, sigterm_at=2)
    assert stopped.status == "preempted"
    assert stopped.step in (2, 3)
    resumed, _, resume_log = _run(config)
    assert resumed.status == "finished"
    assert resumed.resumed_from == stopped.step
    assert resumed.step == 5
    assert sorted(losses_by_step(progress_lines(resume_log))) == list(range(stopped.step + 1, 6))
    assert list_checkpoints(LocalStorage(), config.output.uri).complete[-1] == 5
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["step"] == 5


class StoreStalled(TrainerCallback):  # type: ignore[misc]
    """Stops the object store (SIGSTOP to MinIO) at the end of each step in `stalls`, before its checkpoint is saved
    and once the uploader is done with every checkpoint before it, so that this one's upload cannot finish; lets the
    store go on once the step `stalls[step]` began. Records torch's intra-op threads at the beginning of every step
    (this callback runs after the recipe's)."""

    def __init__(self, store_pid: int, stalls: dict[int, int], uploader: CheckpointUploader) -> None:
        self.store_pid = store_pid
        self.stalls = stalls
        self.uploader = uploader
        self.stopped = False
        self.threads: dict[int, int] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.stalls:
            deadline = time.monotonic() + 60
            while self.uploader.busy_since() is not None and time.monotonic() < deadline:
                time.sleep(0.01)  # the upload, the manifest and retention (which lists the store)
            assert self.uploader.busy_since() is None
            os.kill(self.store_pid, signal.SIGSTOP)
            self.stopped = True

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step + 1
        self.threads[step] = torch.get_num_threads()
        if step in self.stalls.values():
            self.resume_store()

    def resume_store(self) -> None:
        if self.stopped:
            os.kill(self.store_pid, signal.SIGCONT)
            self.stopped = False


def _config_to_s3(
    tmp: Path,
    sources: tuple[Path, Path],
    s3: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
    method: dict[str, Any],
    *,
    max_steps: int,
) -> Any:
    """A run of the module's model and data whose output (checkpoints included) goes to the session's MinIO."""
    model, data = sources
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    return make_config(
        tmp,
        model_uri=model.as_uri(),
        data_uri=data.as_uri(),
        output_uri=s3.uri("run/"),
        method=method,
        training={**TRAINING, "maxSteps": max_steps},
        storage={"endpoint": s3.endpoint_url, "region": s3.region, "addressingStyle": "path"},
    )


def test_on_the_cpu_a_step_leaves_a_core_to_checkpoint_uploads_that_outlast_a_step(
    tmp_path: Path,
    sources: tuple[Path, Path],
    s3: S3Bucket,
    minio: MinioServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The checkpoint's background work (its files written, hashed and uploaded) competes with the step's intra-op
    # threads for the cores (see callbacks.YieldCoreToCheckpoints). A step gives one thread back when that work has
    # outlasted a step, or the work of the checkpoint before did; work shorter than a step costs none.
    config = _config_to_s3(tmp_path, sources, s3, monkeypatch, METHOD, max_steps=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    recipe = FineTuneRecipe(config, reporter=ProgressReporter(config.job_name, stream=io.StringIO()))
    stall: StoreStalled | None = None
    try:
        recipe.setup()
        assert recipe.uploader is not None
        # Step 2's checkpoint stays out of the store across step 3; step 4's (the store stopped once the uploader is
        # done with step 2's) across the beginning of step 5.
        stall = StoreStalled(minio.pid, {2: 4, 4: 5}, recipe.uploader)
        recipe.trainer.add_callback(stall)
        result = recipe.train()
        after = torch.get_num_threads()
    finally:
        if stall is not None:
            stall.resume_store()
        recipe.cleanup()
        torch.set_num_threads(threads)
    assert result.status == "finished"
    assert recipe.uploader.completed == [2, 4, 6]
    assert stall.threads[1] == 2, "nothing in the background yet: the step has every thread"
    # Step 3 began with step 2's checkpoint just submitted (the reservation after step 1 is joined by that save):
    # nothing had outlasted a step yet. Step 4 began with it still not in the store, a whole step later.
    assert stall.threads[3] == 2
    assert stall.threads[4] == 1
    # Step 5 began with step 4's checkpoint just submitted, after step 2's had outlasted a step: given at once.
    assert stall.threads[5] == 1
    assert after == 2, "the threads are given back once training ends"


def test_a_save_does_not_wait_past_its_patience_for_a_store_that_stopped_answering(
    tmp_path: Path,
    sources: tuple[Path, Path],
    s3: S3Bucket,
    minio: MinioServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Step 2's optimizer state streams into a store that stops answering before it can finish; the save at step 4
    # waits for it only until it has run for the trainer's patience (1 s here), then writes its own checkpoint to the
    # local disk, unstaged, and training goes on. Once the store answers again, everything is uploaded and complete.
    config = _config_to_s3(tmp_path, sources, s3, monkeypatch, METHOD, max_steps=6)
    recipe = FineTuneRecipe(config, reporter=ProgressReporter(config.job_name, stream=io.StringIO()))
    stall: StoreStalled | None = None
    try:
        recipe.setup()
        assert recipe.uploader is not None
        recipe.trainer.staged_patience = 1.0
        stall = StoreStalled(minio.pid, {2: 5}, recipe.uploader)
        recipe.trainer.add_callback(stall)
        with caplog.at_level(logging.WARNING, logger="finetune_trainer.callbacks"):
            result = recipe.train()
    finally:
        if stall is not None:
            stall.resume_store()
        recipe.cleanup()
    assert result.status == "finished"
    assert recipe.uploader.completed == [2, 4, 6]
    staging = recipe.trainer.staging
    assert staging is not None
    assert staging.staged_saves == 2, "steps 2 and 6 staged; step 4 written to the local disk beside the stream"
    assert "checkpoint step 4 is written to the local disk" in caplog.text
    storage = S3Storage(StorageSpec(endpoint=s3.endpoint_url, region=s3.region, addressing_style="path"))
    listing = list_checkpoints(storage, config.output.uri)
    assert listing.complete == [4, 6]  # retention keeps two
    for step in (4, 6):
        assert {"optimizer.pt", "adapter_model.safetensors"} <= set(listing.files[step])


class LocalFileBlocked(TrainerCallback):  # type: ignore[misc]
    """Puts a directory where the Trainer's local checkpoint-<step>/<name> would go, just before the save at `step`:
    writing that file to the local disk fails there."""

    def __init__(self, step: int, name: str) -> None:
        self.step, self.name = step, name

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            (Path(args.output_dir) / f"checkpoint-{self.step}" / self.name).mkdir(parents=True)


def test_a_full_fine_tunes_optimizer_state_and_weights_go_from_their_staged_copy_straight_into_the_store(
    tmp_path: Path, sources: tuple[Path, Path], s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The largest files of a full fine-tune's checkpoint (AdamW state, twice the weights, and the weights) are
    # serialized from the staged copy into the store by the background thread, without local files the uploader
    # would read back: here those local files cannot even be created, and the checkpoint is complete all the same,
    # its record listing the objects.
    config = _config_to_s3(tmp_path, sources, s3, monkeypatch, {"type": "full"}, max_steps=4)
    recipe = FineTuneRecipe(config, reporter=ProgressReporter(config.job_name, stream=io.StringIO()))
    try:
        recipe.setup()
        recipe.trainer.add_callback(LocalFileBlocked(2, "optimizer.pt"))
        recipe.trainer.add_callback(LocalFileBlocked(2, "model.safetensors"))
        result = recipe.train()
    finally:
        recipe.cleanup()
    assert result.status == "finished"
    assert recipe.uploader is not None
    assert recipe.uploader.completed == [2, 4]
    client = s3.client()
    manifest = json.loads(
        client.get_object(Bucket=s3.bucket, Key="run/checkpoints/step-2/manifest.json")["Body"].read()
    )
    listed = {f["path"]: f for f in manifest["files"]}
    assert {"optimizer.pt", "model.safetensors", "scheduler.pt", "trainer_state.json"} <= set(listed)
    stored = client.get_object(Bucket=s3.bucket, Key="run/checkpoints/step-2/optimizer.pt")["Body"].read()
    assert listed["optimizer.pt"]["size"] == len(stored)
    assert listed["optimizer.pt"]["sha256"] == hashlib.sha256(stored).hexdigest()
    state = torch.load(io.BytesIO(stored), weights_only=True)
    params = [p for p in recipe.trainer.model.parameters() if p.requires_grad]
    assert len(state["state"]) == len(params)
    assert sorted(tuple(s["exp_avg"].shape) for s in state["state"].values()) == sorted(tuple(p.shape) for p in params)
    assert int(state["state"][0]["step"]) == 2
    weights = client.get_object(Bucket=s3.bucket, Key="run/checkpoints/step-2/model.safetensors")["Body"].read()
    assert listed["model.safetensors"]["size"] == len(weights)
    assert listed["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    # The names and shapes of the model's own save, beside its configuration.
    stored_weights = load(weights)
    model = recipe.trainer.model
    model.save_pretrained(tmp_path / "direct")
    direct = load_file(tmp_path / "direct" / "model.safetensors")
    shapes = {name: tuple(tensor.shape) for name, tensor in direct.items()}
    assert {name: tuple(tensor.shape) for name, tensor in stored_weights.items()} == shapes
    assert "config.json" in listed


def test_a_new_attempt_removes_the_unfinished_writes_an_earlier_attempt_left_under_its_output(
    tmp_path: Path, sources: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # An attempt killed while it streamed a checkpoint's optimizer state and while its export wrote the weights
    # left their temporary files in the output; the next attempt removes them before it trains.
    model, data = sources
    config = make_config(
        tmp_path, model_uri=model.as_uri(), data_uri=data.as_uri(), method=METHOD, training={**TRAINING, "maxSteps": 2}
    )
    out = tmp_path / "out"
    kill_while_writing(f"file://{out}/checkpoints/step-7/optimizer.pt")
    kill_while_writing(f"file://{out}/adapter_model.safetensors")
    with caplog.at_level(logging.INFO, logger="finetune_trainer"):
        result, recipe, _ = _run(config, export=False)
    assert result.status == "finished"
    assert recipe.uploader is not None
    assert recipe.uploader.completed == [2]
    assert f"removed 2 unfinished write(s) of an earlier attempt under {config.output.uri}" in caplog.text
    assert [p for p in out.rglob(".*") if p.is_file()] == []  # the temporary files' names begin with a dot


def test_resume_takes_the_newest_checkpoint_whose_manifest_and_files_are_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    storage = LocalStorage()

    def checkpoint(step: int, files: dict[str, bytes], manifest: bool | dict[str, Any] = True) -> None:
        folder = out / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        if manifest:
            listed = manifest if isinstance(manifest, dict) else {n: len(d) for n, d in files.items()}
            entries = [{"path": n, "size": s, "sha256": "-"} for n, s in listed.items()]
            (folder / "manifest.json").write_text(json.dumps({"step": step, "files": entries, "loss": 1.5}))

    assert latest_complete(storage, out.as_uri()) is None
    checkpoint(10, {"model.safetensors": b"a" * 10, "optimizer.pt": b"b" * 5})
    checkpoint(20, {"model.safetensors": b"a" * 10, "optimizer.pt": b"b" * 5})
    checkpoint(30, {"model.safetensors": b"a" * 10}, manifest=False)  # upload interrupted
    checkpoint(40, {"model.safetensors": b"a" * 10}, manifest={"model.safetensors": 10, "optimizer.pt": 5})
    found = latest_complete(storage, out.as_uri() + "/")
    # 40 lists a file that is missing, 30 has no manifest: 20 is the newest usable one.
    assert found is not None
    assert found.step == 20
    assert found.loss == 1.5
    assert found.uri.endswith("/checkpoints/step-20/")


def test_a_node_record_left_by_an_earlier_attempt_cannot_complete_a_checkpoint(tmp_path: Path) -> None:
    storage = LocalStorage()
    out = (tmp_path / "out").as_uri() + "/"
    stale = tmp_path / "out" / "checkpoints" / "step-10" / ".nodes" / "node-1.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"node": 1, "attempt": "earlier", "files": [{"path": "rng_state_1.pth", "size": 1}]}))
    local = tmp_path / "work" / "checkpoint-10"
    local.mkdir(parents=True)
    (local / "rng_state_0.pth").write_bytes(b"0")
    ranks = Ranks(rank=0, local_rank=0, world_size=2, local_world_size=1, node_rank=0)
    uploader = CheckpointUploader(storage, out, ranks, keep=2, attempt="this-run", nodes_wait_seconds=1.5)
    uploader.submit(local, 10, loss=1.0)
    with pytest.raises(StorageError, match="only 1 of 2 nodes uploaded their files"):
        uploader.drain()
    uploader.close()
    assert list_checkpoints(storage, out).complete == []

    # Node 1 of this attempt reports: now the checkpoint completes.
    stale.write_text(json.dumps({"node": 1, "attempt": "this-run", "files": [{"path": "rng_state_1.pth", "size": 1}]}))
    uploader = CheckpointUploader(storage, out, ranks, keep=2, attempt="this-run", nodes_wait_seconds=5)
    uploader.submit(local, 10, loss=1.0)
    uploader.drain()
    uploader.close()
    manifest = json.loads((tmp_path / "out" / "checkpoints" / "step-10" / "manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["rng_state_0.pth", "rng_state_1.pth"]
