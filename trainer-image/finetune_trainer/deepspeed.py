"""The sharding engines' settings: a DeepSpeed JSON config from a DeepSpeedSpec (with the "auto" values the Hugging
Face integration fills in) and transformers' fsdp_config from an FsdpSpec.

Importable without torch: the operator renders the DeepSpeed JSON into the trainer ConfigMap, and the trainer reads
it back.
"""

from __future__ import annotations

from typing import Any

from finetune_trainer.config import DeepSpeedSpec, RunSpec

_BUCKET = 500_000_000


def deepspeed_config(spec: DeepSpeedSpec) -> dict[str, Any]:
    """The DeepSpeed config for ZeRO stage 0-3 with optional CPU offload; batch and precision are left "auto"."""
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.zero_stage in (1, 2):
        zero.update(
            allgather_partitions=True,
            allgather_bucket_size=_BUCKET,
            overlap_comm=True,
            reduce_scatter=True,
            reduce_bucket_size=_BUCKET,
            contiguous_gradients=True,
            round_robin_gradients=True,
        )
    elif spec.zero_stage == 3:
        zero.update(
            overlap_comm=True,
            contiguous_gradients=True,
            sub_group_size=1_000_000_000,
            # The Hugging Face integration sizes these from the model's hidden size.
            reduce_bucket_size="auto",
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if spec.offload in ("optimizer", "all") and spec.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.offload == "all" and spec.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if "offload_optimizer" in zero:
        # With the optimizer state on the CPU, DeepSpeed insists on its own CPU Adam (a torch optimizer there is
        # refused unless zero_force_ds_cpu_optimizer is turned off, and would be slow); the Hugging Face
        # integration fills the "auto" values from the training arguments.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def fsdp_config(config: RunSpec, *, on_cpu: bool = False) -> dict[str, Any]:
    """transformers' fsdp_config for spec.fsdp: FSDP2, full sharding (parameters resharded after forward), each
    decoder layer its own unit (transformer-based wrapping over the model's _no_split_modules), sharded checkpoints
    (every rank writes its own; resume reads them back), CPU offload on request, FSDP's own activation checkpointing
    when gradientCheckpointing is on. `on_cpu`: the processes train on the CPU, where the shards already are
    (torch's offload policy would look for a GPU and fail), so offload is left out."""
    assert config.fsdp is not None
    return {
        "version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "SHARDED_STATE_DICT",
        "cpu_offload": config.fsdp.offload and not on_cpu,
        "activation_checkpointing": config.training.gradient_checkpointing,
        "cpu_ram_efficient_loading": False,
    }
