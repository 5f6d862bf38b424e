"""Each fine-tuning method trains a tiny model on CPU through the real recipe: the loss falls, only the parts the
method owns change, QLoRA runs on bitsandbytes 4-bit (and 8-bit) layers, and the final outputs are complete."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer.tinymodels import losses_by_step, make_config, progress_lines, write_dataset, write_model

from finetune_trainer.errors import ConfigError
from finetune_trainer.methods import apply_freeze, linear_module_names, resolve_lora_targets
from finetune_trainer.progress import ProgressReporter
from finetune_trainer.recipe import FineTuneRecipe
from finetune_trainer.storage import sha256_file

LORA = {"rank": 8, "alpha": 16, "dropout": 0.0, "target": "all"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl", n=48)


def _train(tmp: Path, model_dir: Path, data_file: Path, method: dict[str, Any], **training: Any) -> dict[str, Any]:
    """Run setup + train + finish in-process; return params before/after, losses and the recipe."""
    stream = io.StringIO()
    config = make_config(
        tmp, model_uri=model_dir.as_uri(), data_uri=data_file.as_uri(), method=method, training=training
    )
    recipe = FineTuneRecipe(config, reporter=ProgressReporter(config.job_name, stream=stream))
    try:
        recipe.setup()
        model = recipe.trainer.model
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = recipe.train()
        recipe.finish()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        recipe.cleanup()
    losses = losses_by_step(progress_lines(stream.getvalue()))
    return {"recipe": recipe, "model": model, "before": before, "after": after, "losses": losses, "result": result}


def _falls(losses: dict[int, float]) -> tuple[float, float]:
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:2]) / 2
    last = sum(losses[s] for s in steps[-2:]) / 2
    return first, last


def _changed(run: dict[str, Any], name: str) -> bool:
    return not torch.equal(run["before"][name], run["after"][name])


@pytest.mark.parametrize(
    ("kind", "lr"),
    [("lora", 2e-2), ("dora", 2e-2)],
)
def test_adapter_methods_train_the_adapter_and_leave_the_base_unchanged(
    tmp_path: Path, model_dir: Path, data_file: Path, kind: str, lr: float
) -> None:
    run = _train(tmp_path, model_dir, data_file, {"type": kind, "lora": LORA}, learningRate=lr, maxSteps=10)
    first, last = _falls(run["losses"])
    assert last < first - 0.15, f"{kind}: loss did not fall: {run['losses']}"
    adapter = [n for n in run["before"] if "lora_" in n]
    base = [n for n in run["before"] if "lora_" not in n]
    assert adapter
    assert base
    assert all(_changed(run, n) for n in adapter if "lora_B" in n), "every lora_B matrix must have trained"
    assert not any(_changed(run, n) for n in base), "base weights changed"
    if kind == "dora":
        assert any("lora_magnitude_vector" in n for n in adapter), "DoRA magnitude vectors missing"


def test_qlora_trains_an_adapter_on_4bit_base_layers(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    import bitsandbytes as bnb

    method = {"type": "qlora", "lora": LORA, "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True}}
    # With gradient checkpointing, as QLoRA is usually run: recomputed 4-bit forwards must still train the adapter.
    run = _train(tmp_path, model_dir, data_file, method, learningRate=1e-2, maxSteps=10, gradientCheckpointing=True)
    model = run["model"]
    assert model.is_activation_checkpointing
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # 2 layers x 7 projections, every one a 4-bit layer wrapped by a LoRA adapter.
    assert len(quantized) == 14
    for layer in quantized:
        assert isinstance(layer.weight, bnb.nn.Params4bit)
        assert layer.weight.quant_state is not None
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.dtype == torch.uint8  # packed 4-bit storage, not a dequantized copy
        assert layer.weight.quant_state.nested, "double quantization requested"
    wrapped = [m for m in model.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, bnb.nn.Linear4bit)]
    assert len(wrapped) == 14
    first, last = _falls(run["losses"])
    assert last < first - 0.15, f"qlora: loss did not fall: {run['losses']}"
    four_bit = [n for n in run["before"] if n.endswith("base_layer.weight")]
    assert len(four_bit) == 14
    assert not any(_changed(run, n) for n in four_bit), "4-bit base weights changed"
    assert all(_changed(run, n) for n in run["before"] if "lora_B" in n)


def test_qlora_8bit_runs_on_int8_layers(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    import bitsandbytes as bnb

    method = {"type": "qlora", "lora": LORA, "quantization": {"bits": 8}}
    run = _train(tmp_path, model_dir, data_file, method, learningRate=2e-2, maxSteps=4)
    layers = [m for m in run["model"].modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 14
    assert all(layer.weight.dtype == torch.int8 for layer in layers)
    assert all(_changed(run, n) for n in run["before"] if "lora_B" in n)
    assert run["losses"][4] < run["losses"][1]


def test_full_training_changes_every_weight(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    run = _train(tmp_path, model_dir, data_file, {"type": "full"}, learningRate=3e-3, maxSteps=8)
    first, last = _falls(run["losses"])
    assert last < first - 0.3, f"full: loss did not fall: {run['losses']}"
    assert all(_changed(run, n) for n in run["before"]), "a weight did not train in full fine-tuning"
    files = {p.name for p in Path(run["recipe"].config.output.uri.removeprefix("file://")).iterdir()}
    assert "model.safetensors" in files
    assert "config.json" in files


def test_freeze_trains_only_the_last_layers_and_named_modules(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    method = {"type": "freeze", "freeze": {"trainableLayers": 1, "extraModules": ["norm"]}}
    run = _train(tmp_path, model_dir, data_file, method, learningRate=3e-3, maxSteps=8)
    first, last = _falls(run["losses"])
    assert last < first - 0.1, f"freeze: loss did not fall: {run['losses']}"
    for name in run["before"]:
        trains = name.startswith("model.layers.1.") or name == "model.norm.weight"
        assert _changed(run, name) == trains, name


def test_final_outputs_hold_adapter_tokenizer_state_plot_and_a_manifest_written_last(
    tmp_path: Path, model_dir: Path, data_file: Path
) -> None:
    _train(tmp_path, model_dir, data_file, {"type": "lora", "lora": LORA}, learningRate=2e-2, maxSteps=4, evalSteps=2)
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    for required in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.json"):
        assert required in names
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (800, 500)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == 4
    assert manifest["method"] == "lora"
    for entry in manifest["files"]:
        path = out / entry["path"]
        assert path.stat().st_size == entry["size"]
        assert sha256_file(path) == entry["sha256"]
        assert path.stat().st_mtime <= (out / "manifest.json").stat().st_mtime
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_eval_loss_is_reported_every_eval_steps(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    stream = io.StringIO()
    config = make_config(
        tmp_path,
        model_uri=model_dir.as_uri(),
        data_uri=data_file.as_uri(),
        training={"maxSteps": 4, "evalSteps": 2, "learningRate": 2e-2},
        valSize=0.25,
    )
    from finetune_trainer.recipe import run

    run(config, reporter=ProgressReporter("tiny", stream=stream))
    evals = [r for r in progress_lines(stream.getvalue()) if "evalLoss" in r]
    # Progress keeps the last eval loss between evaluations; a new value appears at each eval step.
    new_values = [
        r["step"] for prev, r in zip([{}, *evals], evals, strict=False) if r["evalLoss"] != prev.get("evalLoss")
    ]
    assert new_values == [2, 4]


@pytest.mark.parametrize(
    ("plot_loss", "logging_steps", "plotted"),
    [(True, 1, True), (True, 50, False), (False, 1, False)],
    ids=["plotted", "nothing-logged", "plot-off"],
)
def test_the_loss_plot_is_reported_only_when_it_was_written_and_uploaded(
    tmp_path: Path, model_dir: Path, data_file: Path, plot_loss: bool, logging_steps: int, plotted: bool
) -> None:
    from finetune_trainer.recipe import run

    out = tmp_path / "out"
    config = make_config(
        tmp_path,
        model_uri=model_dir.as_uri(),
        data_uri=data_file.as_uri(),
        training={"maxSteps": 2, "loggingSteps": logging_steps},
        output={"uri": out.as_uri(), "plotLoss": plot_loss},
    )
    # The run reports the plot, and so does a restarted Pod that finds the outputs complete.
    tracking_env = ("WANDB_", "MLFLOW_", "TENSORBOARD_")
    env_before = {k: v for k, v in os.environ.items() if k.startswith(tracking_env)}
    reported = []
    for _ in range(2):
        stream = io.StringIO()
        status = run(config, reporter=ProgressReporter("tiny", stream=stream)).status
        # The final outputs' event (TensorBoard's logs are reported on their own once the first sync uploaded them).
        (artifacts,) = [a for a in progress_lines(stream.getvalue(), event="artifacts") if "adapter" in a]
        assert artifacts["adapter"] == out.as_uri() + "/"
        reported.append((status, artifacts.get("lossPlot")))
    assert (out / "loss.png").is_file() == plotted
    plot = (out / "loss.png").as_uri() if plotted else None
    assert reported == [("finished", plot), ("already-complete", plot)]
    # The run's tracking settings do not outlive it in this process.
    assert {k: v for k, v in os.environ.items() if k.startswith(tracking_env)} == env_before


def test_unknown_lora_target_fails_with_the_models_linear_module_names(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    names = linear_module_names(model)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # no lm_head
    assert resolve_lora_targets(model, ["all"]) == names
    assert resolve_lora_targets(model, ["q_proj", "self_attn.v_proj"]) == ["q_proj", "self_attn.v_proj"]
    with pytest.raises(ConfigError) as info:
        resolve_lora_targets(model, ["q_proj", "qkv"])
    assert "['qkv']" in str(info.value)
    assert str(names) in str(info.value)


def test_freeze_refuses_unknown_modules_and_too_many_layers(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from finetune_trainer.config import MethodSpec

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ConfigError, match=r"unknown module\(s\) \['embeddings'\].*embed_tokens"):
        apply_freeze(model, MethodSpec.model_validate({"type": "freeze", "freeze": {"extraModules": ["embeddings"]}}))
    with pytest.raises(ConfigError, match="3 is more than the model's 2 layers"):
        apply_freeze(model, MethodSpec.model_validate({"type": "freeze", "freeze": {"trainableLayers": 3}}))
