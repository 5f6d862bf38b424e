"""training.attention and training.liger reach the model, and the choices this process cannot run fail before
anything is loaded, saying why; the trainer picks its device and collective backend without naming a vendor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer.tinymodels import make_config, write_model

from finetune_trainer.device import BACKENDS, collective_backend, device_type
from finetune_trainer.errors import ConfigError
from finetune_trainer.methods import apply_liger, attention_implementation, load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "tiny-llama")


def _config(tmp: Path, model_dir: Path, **training: Any) -> Any:
    return make_config(tmp, model_uri=model_dir.as_uri(), data_uri="file:///unused.jsonl", training=training)


def test_this_machine_trains_on_the_cpu_with_gloo() -> None:
    assert device_type() == "cpu"
    assert collective_backend() == "gloo"
    assert (BACKENDS["cuda"], BACKENDS["npu"], BACKENDS["xpu"]) == ("nccl", "hccl", "xccl")
    assert collective_backend("unheard-of") == "gloo"


@pytest.mark.parametrize("choice", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_without_cuda_fails_naming_what_is_missing(
    tmp_path: Path, model_dir: Path, choice: str
) -> None:
    config = _config(tmp_path, model_dir, attention=choice, precision="fp32")
    with pytest.raises(ConfigError) as info:
        attention_implementation(config)
    message = str(info.value)
    assert message.startswith(f"training.attention: {choice} needs a CUDA device (this process has cpu)")
    assert "precision bf16 or fp16 (got fp32)" in message
    assert "use auto, sdpa or eager" in message


@pytest.fixture
def llama_module_restored() -> Any:
    """Liger also patches transformers' Llama module (its RoPE function, for every Llama in the process): what a
    training process wants, but the other tests in this one must get the original back."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for name in set(vars(modeling_llama)) - set(saved):
        delattr(modeling_llama, name)
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


@pytest.mark.usefixtures("llama_module_restored")
def test_liger_kernels_replace_the_models_modules(tmp_path: Path, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.model.norm._get_name() == "LlamaRMSNorm"
    forward = model.forward
    replaced = apply_liger(model, _config(tmp_path, model_dir, liger=True))
    assert "model.norm" in replaced
    assert model.model.norm._get_name() == "LigerRMSNorm"
    assert {model.model.layers[0].mlp._get_name()} == {"LigerSwiGLUMLP"}, replaced
    assert model.forward != forward, "the fused linear cross-entropy replaces the model's forward"


def test_liger_for_a_family_it_lacks_names_the_model_type(tmp_path: Path) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    config = _config(tmp_path, tmp_path, liger=True)
    with pytest.raises(ConfigError, match=r"training.liger: liger-kernel has no kernels for model type 'gpt_neox'"):
        apply_liger(model, config)


def test_liger_on_a_machine_without_gpu_fails_before_loading(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="Liger kernels need a GPU, and this process has none"):
        load_model(_config(tmp_path, model_dir, liger=True), model_dir)
