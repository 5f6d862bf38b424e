"""The adapter merge on real torch/peft/bitsandbytes (CPU, tiny random models): merged logits equal the adapter's,
QLoRA adapters merge onto the full-precision base, shards respect the size limit, bad inputs fail clearly, outputs
are never half-written or silently replaced, and the CLI merges between S3 prefixes with the manifest last.

Tolerance: the merged model computes x @ (W + s·BA)^T where peft computes x @ W^T + s·(x @ A^T) @ B^T (and, for
DoRA, scales the two parts separately). Both are float32; the results differ only by rounding, a few float32 ulps
per matmul of 32-128 terms (eps 1.2e-7), compounded over 2 layers: observed differences are below 1e-6 for logits
of magnitude ~1, so 1e-5 is an order of magnitude of headroom, while each adapter moves the logits by ~0.1-1 (checked
in every test, so equality cannot come from an adapter that does nothing).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from trainer.tiny import build_tokenizer
from trainer.tinymodels import PYTHON, REPO_ROOT, config_dict, trainer_env, write_model

from finetune_trainer.errors import ConfigError, MergeError
from finetune_trainer.merge import merge_model
from finetune_trainer.merge.shards import SAFE_INDEX, ShardWriter, TensorEntry, parse_size, plan_shards
from finetune_trainer.merge.weights import merge_state_dict, parse_adapter
from finetune_trainer.storage import sha256_file
from support.s3 import S3Bucket

TOLERANCE = 1e-5
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_LINEAR = ["c_attn", "c_proj", "c_fc"]


# --- builders ---------------------------------------------------------------------------------------------------


def write_gpt2(directory: Path) -> Path:
    """A tiny GPT-2 (Conv1D layers store weights as (in, out): peft's fan_in_fan_out path)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    config.pad_token_id = config.eos_token_id = tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_fp32(directory: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


def make_adapter(base: Path, out: Path, *, seed: int = 1, dora: bool = False, **lora: Any) -> Path:
    """A peft adapter with random (non-zero) A and B; DoRA magnitudes scaled away from their initial norms and
    modules_to_save copies perturbed, so that every part of the adapter changes the output."""
    from peft import LoraConfig, get_peft_model

    settings: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_LINEAR, **lora}
    model = load_fp32(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, use_dora=dora, **settings))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            # At initialisation m = ||W + sBA|| makes DoRA's scale exactly 1; a trained magnitude differs.
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    peft_model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)  # the run saves its tokenizer next to the adapter
    return out


def token_ids(vocab: int = 500) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def adapter_logits(base: Path, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with the adapter applied by peft on the full-precision base, logits of the base alone)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_fp32(base), adapter).eval()
    with torch.no_grad():
        with_adapter = model(token_ids()).logits
        with model.disable_adapter():
            plain = model(token_ids()).logits
    return with_adapter, plain


def merged_logits(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = load_fp32(directory)(token_ids()).logits
    return logits


def assert_reproduces_adapter(base: Path, adapter: Path, merged: Path) -> None:
    expected, plain = adapter_logits(base, adapter)
    got = merged_logits(merged)
    assert (expected - plain).abs().max() > 0.05, "the adapter barely changes the output: the check would be void"
    diff = (got - expected).abs().max().item()
    assert diff <= TOLERANCE, f"merged logits differ from the adapter's by {diff:.3g}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Qwen2 has q/k/v biases: DoRA must leave them alone.
    return write_model(tmp_path_factory.mktemp("base") / "qwen2", arch="qwen2")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gpt2(tmp_path_factory.mktemp("base") / "gpt2")


@pytest.fixture(scope="module")
def llama_adapter(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(llama, tmp_path_factory.mktemp("adapter") / "lora")


# --- logits -----------------------------------------------------------------------------------------------------


def test_merged_lora_model_gives_the_adapters_logits(llama: Path, llama_adapter: Path, tmp_path: Path) -> None:
    report = merge_model(llama, llama_adapter, tmp_path / "merged", dtype="fp32", max_shard_size="5GB")

    assert report.method == "lora"
    assert report.merged_modules == 2 * len(LLAMA_LINEAR)
    assert_reproduces_adapter(llama, llama_adapter, tmp_path / "merged")


@pytest.mark.parametrize(
    ("arch", "targets"),
    [pytest.param("qwen2", LLAMA_LINEAR, id="qwen2-with-biases"), pytest.param("gpt2", GPT2_LINEAR, id="gpt2-conv1d")],
)
def test_merged_dora_model_gives_the_adapters_logits(
    arch: str, targets: list[str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    base: Path = request.getfixturevalue(arch)
    extra = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    adapter = make_adapter(base, tmp_path / "dora", dora=True, target_modules=targets, **extra)

    report = merge_model(base, adapter, tmp_path / "merged", dtype="fp32", max_shard_size="5GB")

    assert report.method == "dora"
    assert_reproduces_adapter(base, adapter, tmp_path / "merged")


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param({"use_rslora": True}, id="rslora"),
        pytest.param(
            {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}, "modules_to_save": ["lm_head"]},
            id="rank-alpha-patterns-and-modules-to-save",
        ),
        pytest.param({"target_modules": ["q_proj", "embed_tokens"]}, id="embedding-lora"),
    ],
)
def test_scaling_variants_and_saved_modules_merge_exactly(llama: Path, lora: dict[str, Any], tmp_path: Path) -> None:
    adapter = make_adapter(llama, tmp_path / "adapter", **lora)

    merge_model(llama, adapter, tmp_path / "merged", dtype="fp32", max_shard_size="5GB")

    assert_reproduces_adapter(llama, adapter, tmp_path / "merged")


def test_a_qlora_adapter_merges_onto_the_full_precision_base(llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    quantized = prepare_model_for_kbit_training(load_fp32(llama, quantization_config=quant))
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    torch.manual_seed(5)
    model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR, lora_dropout=0.0))
    # A few real optimizer steps on the 4-bit model (B starts at zero, so training is what makes it non-zero).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=token_ids(), labels=token_ids()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "qlora")

    report = merge_model(llama, tmp_path / "qlora", tmp_path / "merged", dtype="fp32", max_shard_size="5GB")

    assert report.method == "lora"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    # Equal to the adapter on the FULL-precision base; the 4-bit base alone is ~1e-2 away from it.
    assert_reproduces_adapter(llama, tmp_path / "qlora", tmp_path / "merged")


def test_merge_state_dict_is_a_pure_function_of_the_weights(llama: Path, llama_adapter: Path) -> None:
    base = load_file(str(llama / "model.safetensors"))
    snapshot = {k: v.clone() for k, v in base.items()}
    adapter = parse_adapter(
        load_file(str(llama_adapter / "adapter_model.safetensors")),
        json.loads((llama_adapter / "adapter_config.json").read_text()),
    )

    merged = merge_state_dict(base, adapter, dtype=torch.bfloat16)

    assert all(torch.equal(base[k], snapshot[k]) for k in base), "the input state dict was modified"
    changed = {k for k in base if not torch.equal(merged[k].float(), base[k].to(torch.bfloat16).float())}
    assert changed == {f"{d.module}.weight" for d in adapter.deltas.values()}
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}


# --- output layout ----------------------------------------------------------------------------------------------


def test_shards_respect_the_size_limit_and_the_index_maps_every_tensor(tmp_path: Path) -> None:
    base = write_model(tmp_path / "base", hidden=64)
    adapter = make_adapter(base, tmp_path / "adapter")

    report = merge_model(base, adapter, tmp_path / "merged", dtype="fp32", max_shard_size="200KB")

    out = tmp_path / "merged"
    assert len(report.shards) >= 3
    index = json.loads((out / SAFE_INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == report.shards
    stored: dict[str, str] = {}
    total = 0
    for shard in report.shards:
        with safe_open(str(out / shard), framework="pt") as handle:
            names = list(handle.keys())
            for name in names:
                stored[name] = shard
                total += handle.get_tensor(name).nbytes
        size = (out / shard).stat().st_size
        assert size <= 200_000 or len(names) == 1, f"{shard} is {size} bytes with {len(names)} tensors"
    assert index["weight_map"] == stored
    with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
        assert set(stored) == set(handle.keys())
    assert index["metadata"]["total_size"] == total
    assert_reproduces_adapter(base, adapter, out)


def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own() -> None:
    entries = [TensorEntry("a", "F32", (10,)), TensorEntry("big", "F32", (1000,)), TensorEntry("c", "F32", (10,))]

    plan = plan_shards(entries, max_bytes=1000)

    assert [[e.name for e in shard] for shard in plan.shards] == [["a"], ["big"], ["c"]]
    assert plan.files[1] == "model-00002-of-00003.safetensors"


@pytest.mark.parametrize("limit", [700, 1_500, 6_000])
def test_shard_files_stay_within_the_limit_when_headers_outweigh_the_data(limit: int, tmp_path: Path) -> None:
    # Long names and tiny tensors: the JSON header is most of each file, so a plan that counted data alone would
    # overshoot.
    tensors = {f"model.layers.{i}.block.with.a.rather.long.module.path.weight": torch.randn(3, 2) for i in range(40)}
    entries = [TensorEntry(name, "F32", tuple(t.shape)) for name, t in tensors.items()]

    plan = plan_shards(entries, max_bytes=limit)

    assert len(plan.files) > 1
    for number, (name, shard) in enumerate(zip(plan.files, plan.shards, strict=True), 1):
        writer = ShardWriter(tmp_path / name, shard)
        for entry in shard:
            writer.write(entry.name, tensors[entry.name])
        written = writer.close()
        assert written.size == (tmp_path / name).stat().st_size <= limit
        if number < len(plan.files):
            assert written.size > limit // 2, "shards are filled, not just split"
        assert written.sha256 == sha256_file(tmp_path / name)
        back = load_file(str(tmp_path / name))
        assert all(torch.equal(back[e.name], tensors[e.name]) for e in shard)


def test_a_tensor_written_in_row_slices_reads_back_whole(tmp_path: Path) -> None:
    tensor = torch.randn(10, 3).to(torch.bfloat16)
    writer = ShardWriter(tmp_path / "x.safetensors", [TensorEntry("t", "BF16", (10, 3)), TensorEntry("s", "F32", ())])
    for start in range(0, 10, 4):
        writer.write("t", tensor[start : start + 4])
    writer.write("s", torch.tensor(2.5))
    writer.close()

    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["t"], tensor)
    assert back["s"].item() == 2.5


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("200KB", 200_000), ("2GiB", 2 * 2**30), ("1.5 MB", 1_500_000)]
)
def test_shard_sizes_read_like_transformers_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_malformed_shard_size_is_refused_with_the_value() -> None:
    with pytest.raises(ConfigError, match="'5 gigs'"):
        parse_size("5 gigs")


def test_the_output_loads_with_transformers_with_tokenizer_generation_config_and_model_card(
    llama: Path, llama_adapter: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    report = merge_model(
        llama,
        llama_adapter,
        tmp_path / "merged",
        dtype="bf16",
        max_shard_size="5GB",
        model_card_extra={"ticket": "ML-7"},
    )

    out = tmp_path / "merged"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hello world")["input_ids"] == build_tokenizer()("Hello world")["input_ids"]
    assert tokenizer.chat_template
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.eos_token_id
    card = (out / "README.md").read_text()
    for fact in ("library_name: transformers", str(llama), str(llama_adapter), "LoRA", "bf16", "ML-7", "q_proj"):
        assert fact in card
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert [f["path"] for f in manifest["files"]] == on_disk == [f["path"] for f in report.files]
    for entry in manifest["files"]:
        assert entry["size"] == (out / entry["path"]).stat().st_size
        assert entry["sha256"] == sha256_file(out / entry["path"])


# --- bad input --------------------------------------------------------------------------------------------------


def test_an_adapter_for_other_dimensions_names_the_module_and_both_shapes(llama: Path, tmp_path: Path) -> None:
    wider = write_model(tmp_path / "wider", hidden=64)
    adapter = make_adapter(wider, tmp_path / "adapter", target_modules=["q_proj"])

    with pytest.raises(MergeError) as excinfo:
        merge_model(llama, adapter, tmp_path / "merged", dtype="bf16", max_shard_size="5GB")

    message = str(excinfo.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "[64, 64]" in message  # what the adapter expects
    assert "[32, 32]" in message  # what the base has
    assert not (tmp_path / "merged").exists()


def test_an_adapter_for_another_architecture_names_the_missing_modules(
    gpt2: Path, llama_adapter: Path, tmp_path: Path
) -> None:
    with pytest.raises(MergeError) as excinfo:
        merge_model(gpt2, llama_adapter, tmp_path / "merged", dtype="bf16", max_shard_size="5GB")

    message = str(excinfo.value)
    assert "GPT2LMHeadModel" in message
    assert (
        "module model.layers.0.mlp.down_proj: the base model has no tensor model.layers.0.mlp.down_proj.weight"
        in message
    )
    assert not (tmp_path / "merged").exists()


def test_a_missing_adapter_names_the_path(llama: Path, tmp_path: Path) -> None:
    with pytest.raises(MergeError, match=f"no adapter at {tmp_path / 'nowhere'}"):
        merge_model(llama, tmp_path / "nowhere", tmp_path / "merged", dtype="bf16", max_shard_size="5GB")


def test_a_run_output_without_an_adapter_says_what_it_holds(llama: Path, tmp_path: Path) -> None:
    full_run = tmp_path / "run"
    shutil.copytree(llama, full_run)

    with pytest.raises(MergeError, match=r"adapter_config\.json not found .*config\.json"):
        merge_model(llama, full_run, tmp_path / "merged", dtype="bf16", max_shard_size="5GB")


def test_a_quantized_base_is_refused(llama: Path, llama_adapter: Path, tmp_path: Path) -> None:
    base = tmp_path / "base-4bit"
    shutil.copytree(llama, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))

    with pytest.raises(MergeError, match=r"quantized \(bitsandbytes\).*full-precision"):
        merge_model(base, llama_adapter, tmp_path / "merged", dtype="bf16", max_shard_size="5GB")


def overflowing_base(source: Path, target: Path) -> Path:
    """A copy of `source` whose last-written tensor holds a value beyond the fp16 range: an fp16 merge fails after
    earlier shards are written."""
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    tensors["model.norm.weight"][0] = 1e6
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_a_merge_that_fails_half_way_leaves_no_output(llama: Path, llama_adapter: Path, tmp_path: Path) -> None:
    base = overflowing_base(llama, tmp_path / "base")

    with pytest.raises(MergeError, match=r"model\.norm\.weight .*fp16"):
        merge_model(base, llama_adapter, tmp_path / "merged", dtype="fp16", max_shard_size="20KB")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


# --- existing outputs -------------------------------------------------------------------------------------------


def test_an_existing_merge_is_kept_unless_overwrite_is_given(llama: Path, llama_adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    first = merge_model(llama, llama_adapter, out, dtype="bf16", max_shard_size="5GB")
    manifest = (out / "manifest.json").read_bytes()

    again = merge_model(llama, llama_adapter, out, dtype="bf16", max_shard_size="5GB")
    assert again.already_complete
    assert again.files == first.files
    assert (out / "manifest.json").read_bytes() == manifest

    with pytest.raises(MergeError, match=r"already holds a different merged model.*--overwrite"):
        merge_model(llama, llama_adapter, out, dtype="fp32", max_shard_size="5GB")
    assert (out / "manifest.json").read_bytes() == manifest

    replaced = merge_model(llama, llama_adapter, out, dtype="fp32", max_shard_size="5GB", overwrite=True)
    assert not replaced.already_complete
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_an_output_holding_other_files_is_not_touched(llama: Path, llama_adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    with pytest.raises(MergeError, match="not a complete merged model"):
        merge_model(llama, llama_adapter, out, dtype="bf16", max_shard_size="5GB")

    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_output_that_would_replace_the_adapter_is_refused(llama: Path, llama_adapter: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(llama_adapter, run / "adapter")

    with pytest.raises(MergeError, match=f"the output {run} holds the adapter"):
        merge_model(llama, run / "adapter", run, dtype="bf16", max_shard_size="5GB", overwrite=True)

    assert (run / "adapter" / "adapter_model.safetensors").is_file()


# --- CLI and S3 -------------------------------------------------------------------------------------------------


def upload_dir(s3: S3Bucket, directory: Path, prefix: str) -> None:
    client = s3.client()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3.bucket, prefix + path.relative_to(directory).as_posix())


def run_merge_cli(s3: S3Bucket, tmp: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    termination = tmp / f"termination-{len(list(tmp.glob('termination-*')))}"
    env = trainer_env(
        AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key, FTJ_TERMINATION_LOG=str(termination)
    )
    proc = subprocess.run(
        [PYTHON, "-m", "finetune_trainer", "merge", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = json.loads(termination.read_text()) if termination.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, message


def listing(s3: S3Bucket, prefix: str) -> dict[str, Any]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"][len(prefix) :]: o for page in pages for o in page.get("Contents", [])}


def test_cli_merges_between_s3_prefixes_with_the_manifest_last(
    s3: S3Bucket, llama: Path, llama_adapter: Path, tmp_path: Path
) -> None:
    # The adapter sits where training writes it: directly under the run's output, next to checkpoints/.
    upload_dir(s3, llama, "models/llama/")
    upload_dir(s3, llama_adapter, "runs/r1/")
    files = [{"path": p.name, "size": p.stat().st_size} for p in sorted(llama_adapter.iterdir())]
    s3.client().put_object(
        Bucket=s3.bucket, Key="runs/r1/manifest.json", Body=json.dumps({"method": "lora", "files": files}).encode()
    )
    s3.client().put_object(Bucket=s3.bucket, Key="runs/r1/checkpoints/step-5/optimizer.pt", Body=b"x" * 1000)
    config = config_dict(
        tmp_path,
        model_uri=s3.uri("models/llama/"),
        data_uri=s3.uri("data/train.jsonl"),
        output_uri=s3.uri("runs/r1/"),
        storage={"endpoint": s3.endpoint_url, "region": s3.region},
    )
    config["output"]["merge"] = {"maxShardSize": "60KB", "dtype": "fp32"}
    (tmp_path / "trainer.json").write_text(json.dumps(config))
    cache = tmp_path / "cache"

    code, log, _ = run_merge_cli(s3, tmp_path, "--config", str(tmp_path / "trainer.json"), "--cache-dir", str(cache))

    assert code == 0, log
    objects = listing(s3, "runs/r1/merged/")
    manifest = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="runs/r1/merged/manifest.json")["Body"].read())
    assert sorted(objects) == sorted([f["path"] for f in manifest["files"]] + ["manifest.json"])
    assert len(manifest["shards"]) >= 2
    assert all(objects[f["path"]]["Size"] == f["size"] for f in manifest["files"])
    written_last = max(o["LastModified"] for k, o in objects.items() if k != "manifest.json")
    assert objects["manifest.json"]["LastModified"] >= written_last
    assert not list(cache.rglob("optimizer.pt")), "the run's checkpoints were downloaded with the adapter"
    merged = tmp_path / "downloaded"
    for key in objects:
        (merged / key).parent.mkdir(parents=True, exist_ok=True)
        s3.client().download_file(s3.bucket, "runs/r1/merged/" + key, str(merged / key))
    assert all(sha256_file(merged / f["path"]) == f["sha256"] for f in manifest["files"])
    for f in manifest["files"]:  # the store checked every file against the digest the manifest lists
        head = s3.client().head_object(Bucket=s3.bucket, Key="runs/r1/merged/" + f["path"], ChecksumMode="ENABLED")
        assert base64.b64decode(head["ChecksumSHA256"]).hex() == f["sha256"], f["path"]
    assert '"learningRate": 0.005' in (merged / "README.md").read_text()  # the training configuration
    assert_reproduces_adapter(llama, llama_adapter, merged)

    code, log, _ = run_merge_cli(s3, tmp_path, "--config", str(tmp_path / "trainer.json"), "--cache-dir", str(cache))
    assert code == 0, log
    assert "already holds this merge" in log
    assert listing(s3, "runs/r1/merged/")["manifest.json"]["ETag"] == objects["manifest.json"]["ETag"]


def test_cli_recovers_its_own_interrupted_s3_output_and_reports_bad_input(
    s3: S3Bucket, llama: Path, llama_adapter: Path, tmp_path: Path
) -> None:
    upload_dir(s3, overflowing_base(llama, tmp_path / "overflowing"), "models/overflowing/")
    upload_dir(s3, llama, "models/llama/")
    upload_dir(s3, llama_adapter, "runs/r2/")
    storage = write_storage_config(tmp_path, s3)

    def merge(base: str, adapter: str, dtype: str) -> tuple[int, str, dict[str, Any]]:
        return run_merge_cli(
            s3,
            tmp_path,
            *("--base", s3.uri(base), "--adapter", s3.uri(adapter), "--output", s3.uri("merged/r2/")),
            *("--dtype", dtype, "--max-shard-size", "20KB", "--config", str(storage)),
            *("--cache-dir", str(tmp_path / "cache")),
        )

    # fp16 overflows in the last tensor: earlier shards are already uploaded, the manifest never is.
    code, log, message = merge("models/overflowing/", "runs/r2/", "fp16")
    assert code == 3, log
    assert message["reason"] == "MergeError"
    left = listing(s3, "merged/r2/")
    assert any(k.endswith(".safetensors") for k in left)
    assert "manifest.json" not in left

    code, log, _ = merge("models/llama/", "runs/r2/", "bf16")
    assert code == 0, log
    manifest = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="merged/r2/manifest.json")["Body"].read())
    assert sorted(listing(s3, "merged/r2/")) == sorted([f["path"] for f in manifest["files"]] + ["manifest.json"])

    code, log, message = merge("models/llama/", "runs/missing/", "bf16")
    assert code == 3, log
    assert message["reason"] == "MergeError"
    assert f"no adapter at {s3.uri('runs/missing/')}" in message["message"]


def write_storage_config(tmp: Path, s3: S3Bucket) -> Path:
    """A TrainerConfig carrying only what the merge needs from it here: the storage endpoint."""
    config = config_dict(
        tmp,
        model_uri=s3.uri("unused/"),
        data_uri=s3.uri("unused.jsonl"),
        output_uri=s3.uri("unused-run/"),
        storage={"endpoint": s3.endpoint_url, "region": s3.region},
    )
    path = tmp / "storage.json"
    path.write_text(json.dumps(config))
    return path
