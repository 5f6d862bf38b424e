"""Checkpoint files written in the background (finetune_trainer.staging): the staged copy is a snapshot that the
next optimizer step cannot change, tied weights stay tied, buffers are reused from save to save, buffers reserved
ahead are resident before the first save and take it, staging steps aside when memory is short, and a failed write
names its file; staged state goes straight into the store, or to the local file where the store refuses it, and a
model's staged weights go there laid out as its own save_pretrained lays them. The whole path through the Trainer
(a preempted full fine-tune resuming with the losses of an uninterrupted run, the optimizer state and weights of a
full fine-tune stored without a local file) is in test_resume.py."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer import staging as staging_module
from finetune_trainer.config import StorageSpec
from finetune_trainer.errors import CheckpointWriteError
from finetune_trainer.staging import StagedWrites, available_memory, fault_in, save_staged, save_weights_staged
from finetune_trainer.storage import S3Storage


def _optimizer_like() -> dict[str, object]:
    torch.manual_seed(0)
    return {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 32), "exp_avg_sq": torch.rand(64, 32)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
    }


def _assert_same_state(loaded: dict[str, Any], expected: dict[str, Any]) -> None:
    for name, tensor in expected["state"][0].items():
        assert torch.equal(loaded["state"][0][name], tensor), name
    assert loaded["param_groups"] == expected["param_groups"]


def test_a_staged_state_is_a_snapshot_that_later_in_place_updates_do_not_reach(tmp_path: Path) -> None:
    state = _optimizer_like()
    expected = {k: v.clone() for k, v in state["state"][0].items()}  # type: ignore[index]
    staging = StagedWrites()
    staged = staging.stage("optimizer", state)
    assert staged is not None
    for tensor in state["state"][0].values():  # type: ignore[index]
        tensor.add_(1.0)  # the next optimizer step, before the background write has run
    path = tmp_path / "optimizer.pt"
    staging.defer(str(path), lambda: torch.save(staged, path))
    pending = staging.flush()
    assert pending is not None
    assert pending.paths == [str(path)]
    staging.ready()
    loaded = torch.load(path, weights_only=True)
    for name, tensor in expected.items():
        assert torch.equal(loaded["state"][0][name], tensor), name
    assert loaded["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]
    assert staging.staged_saves == 1


def test_tied_weights_stay_one_tensor_and_the_buffers_are_reused_from_save_to_save() -> None:
    embedding, other = torch.randn(16, 8), torch.randn(8, 8)
    state = OrderedDict(embed=embedding, lm_head=embedding, proj=other, half=other[:4])
    state._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]  # as nn.Module.state_dict() carries
    staging = StagedWrites()
    first = staging.stage("model", state)
    assert first is not None
    assert type(first) is OrderedDict
    assert first._metadata == {"": {"version": 1}}
    assert first["embed"] is first["lm_head"], "a tied weight must stay one tensor (save_pretrained drops the twin)"
    assert first["proj"] is not first["half"]
    assert torch.equal(first["half"], other[:4])
    assert first["embed"].untyped_storage().data_ptr() != embedding.untyped_storage().data_ptr()
    assert staging.buffer_bytes == embedding.nbytes + other.nbytes + other[:4].nbytes
    assert staging.flush() is None  # nothing deferred, nothing to write

    embedding.mul_(2.0)
    staging.ready()
    second = staging.stage("model", state)
    assert second is not None
    assert second["embed"].data_ptr() == first["embed"].data_ptr(), "the second save reuses the first one's buffers"
    assert torch.equal(second["embed"], embedding)
    assert staging.buffer_bytes == embedding.nbytes + other.nbytes + other[:4].nbytes


def _resident_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """(pages of `tensor`'s memory present in RAM, pages it spans), from /proc/self/pagemap (bit 63: present)."""
    page = mmap.PAGESIZE
    first, end = tensor.data_ptr() // page, -(-(tensor.data_ptr() + tensor.nbytes) // page)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entries = os.pread(fd, 8 * (end - first), 8 * first)
    finally:
        os.close(fd)
    return sum(entry >> 63 for (entry,) in struct.iter_unpack("<Q", entries)), end - first


def test_buffers_reserved_ahead_are_resident_and_the_first_save_allocates_nothing() -> None:
    """What the Trainer does after its first step: the buffers of the saves to come are allocated and their pages
    faulted in off the step, so that the first save only copies (on the development VM faulting in a full
    fine-tune's 4 GiB took longer than a training step)."""
    big = torch.randn(16 * 2**20 // 4)  # 16 MiB: its buffer gets pages of its own
    state = {"state": {0: {"exp_avg": big, "exp_avg_sq": torch.rand(64, 32)}}, "param_groups": [{"lr": 0.1}]}
    needed = big.nbytes + 64 * 32 * 4
    staging = StagedWrites()
    staging.reserve({"optimizer": state})
    big.add_(1.0)  # the next steps change the values, never the shapes: the save copies what is there then
    staged = staging.stage("optimizer", state)
    assert staged is not None
    assert (staging.reserved_bytes, staging.allocated_in_save, staging.buffer_bytes) == (needed, 0, needed)
    copy = staged["state"][0]["exp_avg"]
    assert torch.equal(copy, big)
    assert copy.untyped_storage().data_ptr() != big.untyped_storage().data_ptr()

    staging.ready()
    staging.reserve({"optimizer": state})  # the buffers are there already: nothing more to reserve
    assert staging.reserved_bytes == needed

    # 64 MiB, over glibc's largest mmap threshold: a fresh mapping, whose pages are not in memory until touched
    larger = torch.empty(64 * 2**20 // 4)
    untouched = torch.empty_like(larger)  # what the first save used to copy into
    assert _resident_pages(untouched)[0] < _resident_pages(untouched)[1] // 2
    fresh = StagedWrites()
    fresh.reserve({"optimizer": {"exp_avg": larger}})
    fresh.ready()  # waits for the reservation as it waits for writes
    (buffer,) = fresh._buffers.values()
    present, pages = _resident_pages(buffer)
    assert present == pages, f"only {present} of the reserved buffer's {pages} pages are in memory"

    unstaged = StagedWrites()
    assert unstaged.stage("optimizer", state) is not None
    assert (unstaged.reserved_bytes, unstaged.allocated_in_save) == (0, needed), "no reservation: the save allocates"


@pytest.mark.parametrize("by_madvise", [True, False], ids=["madvise", "a-byte-per-page"])
def test_fault_in_makes_every_page_of_a_fresh_buffer_resident(
    monkeypatch: pytest.MonkeyPatch, by_madvise: bool
) -> None:
    """Both ways: MADV_POPULATE_WRITE, and the write per page for kernels older than 5.14."""
    monkeypatch.setattr(staging_module, "_populate_by_madvise", by_madvise)
    buffer = torch.empty(64 * 2**20 // 4)  # over glibc's largest mmap threshold: a fresh mapping
    present, pages = _resident_pages(buffer)
    assert present < pages // 2
    fault_in(buffer)
    assert _resident_pages(buffer) == (pages, pages)
    assert staging_module._populate_by_madvise is by_madvise, "this kernel (5.14+) populates by madvise"


def test_nothing_is_reserved_where_the_buffers_would_not_fit_in_memory() -> None:
    state = _optimizer_like()
    needed = sum(t.nbytes for t in state["state"][0].values())  # type: ignore[index]
    tight = StagedWrites(available=lambda: 2 * needed - 1)
    tight.reserve({"optimizer": state})
    tight.ready()
    assert (tight.reserved_bytes, tight.buffer_bytes) == (0, 0)
    assert tight.stage("optimizer", state) is None


def test_the_next_save_waits_until_the_previous_files_are_written(tmp_path: Path) -> None:
    staging = StagedWrites()
    staged = staging.stage("optimizer", _optimizer_like())
    release = threading.Event()

    def slow_write() -> None:
        release.wait(30)
        torch.save(staged, tmp_path / "optimizer.pt")

    staging.defer(str(tmp_path / "optimizer.pt"), slow_write)
    pending = staging.flush()
    assert pending is not None
    assert not pending.done()
    with pytest.raises(AssertionError, match="ready"):
        staging.stage("optimizer", _optimizer_like())  # its buffers are still being written
    waiter = threading.Thread(target=staging.ready)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "ready() returned while the previous checkpoint was still being written"
    release.set()
    waiter.join(30)
    assert not waiter.is_alive()
    assert (tmp_path / "optimizer.pt").is_file()
    assert staging.stage("optimizer", _optimizer_like()) is not None


def test_a_failed_write_names_its_file_and_stops_the_next_save(tmp_path: Path) -> None:
    staging = StagedWrites()
    staged = staging.stage("optimizer", _optimizer_like())
    path = tmp_path / "gone" / "optimizer.pt"  # its directory does not exist
    staging.defer(str(path), lambda: torch.save(staged, path))
    pending = staging.flush()
    assert pending is not None
    with pytest.raises(CheckpointWriteError, match=rf"cannot write checkpoint file {path}: "):
        pending.wait()
    staging.defer(str(path), lambda: None)
    staging.discard()
    assert staging.flush() is None, "discard() drops the writes of a failed save"


def test_staging_steps_aside_when_its_buffers_would_not_fit_in_memory(caplog: pytest.LogCaptureFixture) -> None:
    state = _optimizer_like()
    needed = sum(t.nbytes for t in state["state"][0].values())  # type: ignore[index]
    assert StagedWrites(available=lambda: 2 * needed).stage("optimizer", state) is not None
    tight = StagedWrites(available=lambda: 2 * needed - 1)
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.staging"):
        assert tight.stage("optimizer", state) is None
        assert tight.stage("optimizer", state) is None
    warnings = [r.getMessage() for r in caplog.records if "synchronously" in r.getMessage()]
    assert len(warnings) == 1, "said once, not at every save"
    assert "more than 50% of the 0 MiB this process may still use" in warnings[0]
    assert StagedWrites(available=lambda: None).stage("optimizer", state) is None, "unknown memory: no staging"


def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroup_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:    2000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory(meminfo, cgroup) == 2000 * 1024, "no cgroup files: MemAvailable"
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123456\n")
    assert available_memory(meminfo, cgroup) == 2000 * 1024, "no limit: MemAvailable"
    (cgroup / "memory.max").write_text("1000000\n")
    assert available_memory(meminfo, cgroup) == 1000000 - 123456
    (cgroup / "memory.current").write_text("2000000\n")
    assert available_memory(meminfo, cgroup) == 0, "over the limit already"
    assert available_memory(tmp_path / "none", tmp_path / "none") is None
    assert available_memory() is not None, "this machine's own figures are readable"


def _storage(s3: Any, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    return S3Storage(StorageSpec(endpoint=s3.endpoint_url, region=s3.region, addressing_style="path"))


def _safetensors_files(directory: Path) -> dict[str, Any]:
    """Every tensor of the safetensors files in `directory` by name, and each file's metadata."""
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}, path.name
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is no mapping)
                assert name not in tensors, f"{name} in two files"
                tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_models_staged_weights_go_into_the_store_as_its_own_save_pretrained_lays_them_out(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch, tied: bool
) -> None:
    """What the Trainer defers for a full fine-tune: the staged state dict's weights, named and laid out as the
    model's own save_pretrained writes them (the tied lm_head dropped as there), straight into the store, as one
    file or as shards with their index; not the updates training makes after the copy."""
    from trainer.tiny import tiny_llama

    from finetune_trainer.callbacks import saved_weights

    storage = _storage(s3, monkeypatch)
    model = tiny_llama(96, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "direct")
    direct = _safetensors_files(tmp_path / "direct")
    assert ("lm_head.weight" in direct) is not tied
    staging = StagedWrites()
    staged = staging.stage("model", model.state_dict())
    assert staged is not None
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # training goes on

    def stored_in(prefix: str) -> Any:
        return lambda name: (storage, s3.uri(f"{prefix}/{name}"))

    tensors = saved_weights(model, staged)
    assert tensors is not None
    for prefix, max_bytes in (("one", 10**9), ("sharded", 40_000)):
        local = tmp_path / prefix
        model.save_pretrained(local, state_dict={})  # the configuration, written first as by the Trainer
        entries = save_weights_staged(tensors, str(local), stored_in(prefix), max_bytes)
        names = sorted(entry["path"] for entry in entries)
        for entry in entries:
            data = storage.read_bytes(s3.uri(f"{prefix}/{entry['path']}"))
            assert data is not None
            assert (entry["size"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
            (local / entry["path"]).write_bytes(data)  # as a resume would download it
        written = _safetensors_files(local)
        assert sorted(written) == sorted(direct)
        for name, tensor in direct.items():
            assert torch.equal(written[name], tensor), name
        if prefix == "one":
            assert names == ["model.safetensors"]
            assert not (local / "model.safetensors.index.json").exists()
        else:
            assert len(names) > 2, names
            assert names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
            index = json.loads((local / "model.safetensors.index.json").read_text())
            assert sorted(index["weight_map"]) == sorted(direct)
            assert set(index["weight_map"].values()) == set(names)
            # transformers loads the shards through the index, beside the configuration the Trainer writes.
            loaded = type(model).from_pretrained(local).state_dict()
            for name, tensor in direct.items():
                assert torch.equal(loaded[name], tensor), name


def test_staged_weights_the_store_refuses_are_written_to_local_files_for_the_upload(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from trainer.tiny import tiny_llama

    from finetune_trainer.callbacks import saved_weights

    storage = _storage(s3, monkeypatch)
    model = tiny_llama(96)
    staged = StagedWrites().stage("model", model.state_dict())
    assert staged is not None
    tensors = saved_weights(model, staged)
    assert tensors is not None
    refused = f"s3://no-such-bucket-{os.getpid()}/run/checkpoints/step-2"
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.staging"):
        entries = save_weights_staged(tensors, str(tmp_path), lambda name: (storage, f"{refused}/{name}"), 10**9)
    assert entries == []
    assert f"cannot upload to {refused}/model.safetensors" in caplog.text
    assert "writing model.safetensors to the local disk" in caplog.text
    written = _safetensors_files(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(written[name], tensor), name


def test_staged_state_goes_into_the_store_and_where_the_store_refuses_it_to_the_local_file(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = _storage(s3, monkeypatch)
    staged = StagedWrites().stage("optimizer", _optimizer_like())
    path = tmp_path / "checkpoint-2" / "optimizer.pt"
    path.parent.mkdir()

    uri = s3.uri("run/checkpoints/step-2/optimizer.pt")
    entries = save_staged(staged, str(path), (storage, uri))
    stored = storage.read_bytes(uri)
    assert stored is not None
    assert entries == [{"path": "optimizer.pt", "size": len(stored), "sha256": hashlib.sha256(stored).hexdigest()}]
    assert not path.exists(), "nothing written to the local disk"
    _assert_same_state(torch.load(io.BytesIO(stored), weights_only=True), _optimizer_like())

    # The store refuses the object (here: no such bucket): the same staged state goes to the local file, for the
    # uploader to send with the checkpoint's other files, and the log says why.
    refused = f"s3://no-such-bucket-{os.getpid()}/run/checkpoints/step-2/optimizer.pt"
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.staging"):
        assert save_staged(staged, str(path), (storage, refused)) == []
    assert f"cannot upload to {refused}" in caplog.text
    assert "the bucket does not exist" in caplog.text
    assert "writing optimizer.pt to the local disk" in caplog.text
    _assert_same_state(torch.load(path, weights_only=True), _optimizer_like())
    assert s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
