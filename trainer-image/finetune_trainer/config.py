"""The trainer's input contract: pydantic models for everything a training run needs.

This module is the single source of truth for the data, template, method, training and DeepSpeed settings. The
operator's FineTuneJob spec reuses these models, and the CRD schema is generated from them. It must import without
torch: the operator image does not carry the training stack.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from finetune_trainer.data.lf_templates import TEMPLATES as LF_TEMPLATES
from finetune_trainer.rules import Needs, OnlyFor, Raw, Rule, WithItem, human_list, not_both

API_GROUP = "finetune.dev"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"

# Bounds keep the CRD's CEL cost estimates finite; they are far above any real use.
MAX_URI = 2048
MAX_NAME = 253
MAX_LIST = 64

# The URI schemes live in one table, finetune_trainer.schemes: validation, the CRD pattern, storage and mounts.
from finetune_trainer import schemes as _schemes  # noqa: E402

SCHEMES = _schemes.NAMES
URI_PATTERN = _schemes.URI_PATTERN
# The CRD's pattern, compiled: what the API server accepts (check_uri accepts the same URIs and names the problem).
URI_RE: re.Pattern[str] = re.compile(URI_PATTERN)
check_uri = _schemes.check_uri


# The CRD gets the pattern; pydantic runs check_uri instead, whose messages name the problem.
Uri = Annotated[
    str,
    Field(min_length=1, max_length=MAX_URI, json_schema_extra={"pattern": URI_PATTERN}),
    AfterValidator(check_uri),
]


class Model(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in YAML/JSON: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    # Rules between this model's fields (finetune_trainer.rules): checked here on the raw input, so that they are
    # reported along with field errors, and written into the CRD as CEL by finetune_operator.crd.
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def cross_field_errors(cls, data: Raw) -> list[str]:
        return [rule.explain(cls, data) for rule in cls.RULES if rule.violated(cls, data)]

    @model_validator(mode="wrap")
    @classmethod
    def _report_all(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        problems = cls.cross_field_errors(Raw(data)) if isinstance(data, dict) else []
        try:
            result = handler(data)
        except ValidationError as exc:
            if not problems:
                raise
            details: list[Any] = [
                {"type": e["type"], "loc": e["loc"], "input": e["input"], "ctx": e.get("ctx", {})} for e in exc.errors()
            ]
            details += [{"type": "value_error", "loc": (), "input": data, "ctx": {"error": p}} for p in problems]
            raise ValidationError.from_exception_data(cls.__name__, details) from None
        if problems:
            raise ValueError("; ".join(problems))
        return result


# --- data -------------------------------------------------------------------------------------------------------


class DatasetColumns(Model):
    """Column mapping, the same keys as LLaMA-Factory's dataset_info.json `columns`."""

    prompt: str | None = Field(
        None, max_length=MAX_NAME, description="alpaca: instruction column (default instruction)."
    )
    query: str | None = Field(None, max_length=MAX_NAME, description="alpaca: input column (default input).")
    response: str | None = Field(None, max_length=MAX_NAME, description="alpaca: output column (default output).")
    history: str | None = Field(
        None, max_length=MAX_NAME, description="alpaca: [[query, response], ...] history column."
    )
    messages: str | None = Field(
        None, max_length=MAX_NAME, description="sharegpt: the conversation column (default conversations)."
    )
    system: str | None = Field(None, max_length=MAX_NAME, description="System prompt column.")
    tools: str | None = Field(None, max_length=MAX_NAME, description="sharegpt: tool description column.")


ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT_COLUMNS = {"messages": "conversations"}


def _both_spellings(schema: dict[str, Any]) -> None:
    """The schema lists each tag in both spellings (the CRD must not prune the camelCase one), without defaults: the
    API server would otherwise fill in the snake_case default beside a camelCase value (pydantic applies them)."""
    properties = schema.get("properties", {})
    for name in list(properties):
        properties[name].pop("default", None)
        properties.setdefault(to_camel(name), dict(properties[name]))


class DatasetTags(BaseModel):
    """Role/content tags of sharegpt messages. LLaMA-Factory's dataset_info.json spells them in snake_case
    (role_tag); that spelling is kept, so an entry can be copied over as it is, and the camelCase spelling of the
    rest of the API (roleTag) is accepted too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra=_both_spellings)

    role_tag: str = Field("from", max_length=MAX_NAME, description="Key holding a message's role.")
    content_tag: str = Field("value", max_length=MAX_NAME, description="Key holding a message's text.")
    user_tag: str = Field("human", max_length=MAX_NAME, description="Role value of user turns.")
    assistant_tag: str = Field("gpt", max_length=MAX_NAME, description="Role value of assistant turns.")
    observation_tag: str = Field("observation", max_length=MAX_NAME, description="Role value of tool results.")
    function_tag: str = Field("function_call", max_length=MAX_NAME, description="Role value of tool calls.")
    system_tag: str = Field("system", max_length=MAX_NAME, description="Role value of a system message.")

    @model_validator(mode="before")
    @classmethod
    def _camel_case_too(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name in cls.model_fields:
            camel = to_camel(name)
            if camel in out:
                if name in out:
                    raise ValueError(f"set {name} or {camel}, not both")
                out[name] = out.pop(camel)
        return out

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class DatasetSpec(Model):
    """One dataset: a file or a prefix (every file under it), in alpaca or sharegpt format."""

    uri: Uri = Field(description="s3://, pvc://, hf:// or file:// URI of a file or a prefix (every file under it).")
    format: Literal["alpaca", "sharegpt", "auto"] = Field(
        "auto", description="Record layout; auto decides from the columns present."
    )
    file_type: Literal["json", "jsonl", "parquet", "csv"] | None = Field(
        None, description="File type; by default taken from each file's extension."
    )
    columns: DatasetColumns | None = Field(None, description="Column mapping as in dataset_info.json.")
    tags: DatasetTags | None = Field(
        None,
        description=(
            "sharegpt role/content tags, spelled as in dataset_info.json (role_tag, ...) or in camelCase (roleTag, "
            "...); not both for one tag."
        ),
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many samples of this dataset.")

    RULES = (
        OnlyFor(
            "tags apply to sharegpt datasets only; remove tags or set format: sharegpt",
            "tags",
            "format",
            ("sharegpt", "auto"),
        ),
    )


# "auto" (the tokenizer's own chat template) or a LLaMA-Factory template by its name (those that run on text).
TEMPLATES = ("auto", *sorted(name for name, spec in LF_TEMPLATES.items() if spec["text_only"]))


def _known_template(value: str) -> str:
    if value not in TEMPLATES:
        raise ValueError(
            f"unknown template {value!r}; use auto or a LLaMA-Factory template: {', '.join(TEMPLATES[1:])}"
        )
    return value


# --- method -----------------------------------------------------------------------------------------------------


def _split_targets(value: Any) -> Any:
    # LLaMA-Factory writes `lora_target: q_proj,v_proj` or `all`; accept that spelling too.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class LoraSpec(Model):
    """LoRA adapter settings (lora, qlora, dora)."""

    rank: int = Field(8, ge=1, le=4096, description="Adapter rank r.")
    alpha: float = Field(16, gt=0, description="Scaling alpha (the update is scaled by alpha/rank).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target: Annotated[list[str], BeforeValidator(_split_targets)] = Field(
        default_factory=lambda: ["all"],
        min_length=1,
        max_length=MAX_LIST,
        description="Module names to adapt, or [all] for every linear layer but the output head.",
    )
    modules_to_save: list[str] | None = Field(
        None, max_length=MAX_LIST, description="Extra modules trained fully and saved with the adapter."
    )


class QuantizationSpec(Model):
    """bitsandbytes quantization of the frozen base (qlora only)."""

    bits: Literal[4, 8] = Field(4, description="4 (nf4/fp4) or 8 (LLM.int8).")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (4-bit).")


class FreezeSpec(Model):
    """Partial fine-tuning: train only the last layers and/or named modules."""

    trainable_layers: int = Field(2, ge=1, description="Train the last N transformer layers.")
    extra_modules: list[str] | None = Field(
        None, max_length=MAX_LIST, description="Further module names to train (e.g. embed_tokens)."
    )


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: everything the API, the trainer, the merge, `ftj convert` and the model card need to
    know about it. A new method is one entry in METHOD_REGISTRY (and its training code in finetune_trainer.methods)."""

    name: str
    display: str  # in the model card and logs
    settings: tuple[str, ...]  # the MethodSpec objects that apply to it
    adapter: bool  # trains a PEFT adapter, which the merge Job merges into the base afterwards
    quantized_base: bool = False  # the frozen base is loaded 4/8-bit through bitsandbytes
    dora: bool = False  # weight-decomposed LoRA (peft use_dora)
    # How LLaMA-Factory's YAML says it: finetuning_type, and whether quantization_bit / use_dora are set.
    lf_finetuning_type: str = ""
    lf_quantization: bool = False
    lf_use_dora: bool = False


METHOD_REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", "full fine-tuning", (), adapter=False, lf_finetuning_type="full"),
        Method("freeze", "partial (freeze) fine-tuning", ("freeze",), adapter=False, lf_finetuning_type="freeze"),
        Method("lora", "LoRA", ("lora",), adapter=True, lf_finetuning_type="lora"),
        Method(
            "qlora",
            "QLoRA",
            ("lora", "quantization"),
            adapter=True,
            quantized_base=True,
            lf_finetuning_type="lora",
            lf_quantization=True,
        ),
        Method("dora", "DoRA", ("lora",), adapter=True, dora=True, lf_finetuning_type="lora", lf_use_dora=True),
    )
}
METHODS = tuple(METHOD_REGISTRY)


def _known_method(value: str) -> str:
    if value not in METHOD_REGISTRY:
        raise ValueError(f"unknown method {value!r}; use one of {', '.join(METHODS)}")
    return value


def _methods_with(setting: str) -> tuple[str, ...]:
    return tuple(m.name for m in METHOD_REGISTRY.values() if setting in m.settings)


class MethodSpec(Model):
    """The fine-tuning method and its settings."""

    type: Annotated[str, AfterValidator(_known_method)] = Field(
        "lora", description="Fine-tuning method.", json_schema_extra={"enum": list(METHODS)}
    )
    lora: LoraSpec | None = Field(None, description="Adapter settings; lora, qlora and dora only.")
    quantization: QuantizationSpec | None = Field(None, description="Base quantization; qlora only.")
    freeze: FreezeSpec | None = Field(None, description="Which parts train; freeze only.")

    RULES = (
        OnlyFor(
            f"lora settings apply to {human_list(_methods_with('lora'))} only, not to type {{value}}",
            "lora",
            "type",
            _methods_with("lora"),
        ),
        OnlyFor(
            f"quantization applies to {human_list(_methods_with('quantization'))} only, not to type {{value}}",
            "quantization",
            "type",
            _methods_with("quantization"),
        ),
        OnlyFor(
            f"freeze settings apply to {human_list(_methods_with('freeze'))} only, not to type {{value}}",
            "freeze",
            "type",
            _methods_with("freeze"),
        ),
    )

    @property
    def info(self) -> Method:
        return METHOD_REGISTRY[self.type]

    @property
    def uses_adapter(self) -> bool:
        return self.info.adapter

    def lora_or_default(self) -> LoraSpec:
        return self.lora or LoraSpec()

    def quantization_or_default(self) -> QuantizationSpec:
        return self.quantization or QuantizationSpec()


# --- training ---------------------------------------------------------------------------------------------------


# training.attention: "auto" or a transformers attn_implementation (see finetune_trainer.methods).
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"]


class TrainingSpec(Model):
    """Optimisation and batching, with LLaMA-Factory's defaults where it has them."""

    epochs: float = Field(3.0, gt=0, description="Passes over the training data (num_train_epochs).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = Field("cosine", description="Learning-rate schedule (lr_scheduler_type).")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps; exclusive with warmupRatio.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warm-up as a fraction of all steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    per_device_batch_size: int = Field(1, ge=1, le=4096, description="Micro-batch per process.")
    per_device_eval_batch_size: int = Field(1, ge=1, le=4096, description="Eval micro-batch per process.")
    gradient_accumulation_steps: int = Field(8, ge=1, le=4096, description="Micro-batches per optimizer step.")
    cutoff_len: int = Field(2048, ge=8, le=1048576, description="Maximum tokens per sample (after packing: per row).")
    packing: bool = Field(True, description="Pack samples into rows of cutoffLen tokens, without cross-attention.")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens.")
    mask_history: bool = Field(False, description="Compute loss on the last assistant turn only.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Mixed-precision mode.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations to save memory.")
    seed: int = Field(42, ge=0, description="Seed for data order, initialisation and dropout.")
    logging_steps: int = Field(10, ge=1, description="Report progress every N steps.")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: saveSteps).")
    attention: Attention = Field(
        "auto",
        description=(
            "Attention kernel: auto (flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed, else "
            "sdpa), sdpa, eager, flash_attention_2 or flash_attention_3 (CUDA only). Packed samples never attend "
            "to each other, whichever is used."
        ),
    )
    liger: bool = Field(
        False,
        description=(
            "Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU) for the model families "
            "liger-kernel supports; an error names the family otherwise. Needs a GPU."
        ),
    )

    RULES = (not_both("warmup_steps", "warmup_ratio"),)


class ConfigMapKeyRef(Model):
    name: str = Field(min_length=1, max_length=MAX_NAME, description="ConfigMap name in the job's namespace.")
    key: str = Field("ds_config.json", min_length=1, max_length=MAX_NAME, description="Key holding the JSON.")


class DeepSpeedSpec(Model):
    """DeepSpeed ZeRO; the operator renders the JSON with Hugging Face "auto" values."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage.")
    offload: Literal["none", "optimizer", "all"] = Field(
        "none", description="Offload optimizer state (and with all, parameters in stage 3) to CPU."
    )
    config_map_ref: ConfigMapKeyRef | None = Field(
        None, description="Use this DeepSpeed JSON instead of the rendered one."
    )

    RULES = (
        Needs("offload: all (parameters) needs zeroStage 3, got zeroStage {value}", "offload", "all", "zero_stage", 3),
    )


class FsdpSpec(Model):
    """FSDP2 through transformers/Accelerate, the alternative to DeepSpeed: parameters, gradients and optimizer
    state fully sharded over every process, each decoder layer wrapped on its own (the model's _no_split_modules).
    Checkpoints hold each rank's shards; the final model or adapter is gathered whole."""

    offload: bool = Field(False, description="Keep the sharded parameters and optimizer state in CPU memory.")


class ModelSource(Model):
    """The base model."""

    uri: Uri = Field(description="s3://, pvc://, hf:// or file:// URI of a Hugging Face model directory.")
    trust_remote_code: bool = Field(False, description="Allow the model's own Python code.")


# --- storage and output -----------------------------------------------------------------------------------------


class SecretRef(Model):
    name: str = Field(min_length=1, max_length=MAX_NAME, description="Secret in the job's namespace.")
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", max_length=MAX_NAME, description="Key of the access key id.")
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY", max_length=MAX_NAME, description="Key of the secret access key."
    )


class StorageSpec(Model):
    """S3-compatible storage (AWS, MinIO, Ceph RGW). Keys come only from the Secret, as env vars."""

    endpoint: str | None = Field(
        None,
        max_length=MAX_URI,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="Endpoint URL, e.g. http://minio.minio:9000; empty for AWS.",
    )
    region: str = Field("us-east-1", max_length=64, description="Region name.")
    addressing_style: Literal["path", "virtual", "auto"] = Field("path", description="Bucket addressing style.")
    secret_ref: SecretRef | None = Field(None, description="Secret with the access keys.")


QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$"


class Resources(Model):
    """Container resources, as in a Pod spec."""

    requests: dict[str, int | str] | None = Field(None, description="Resource requests.")
    limits: dict[str, int | str] | None = Field(None, description="Resource limits (e.g. nvidia.com/gpu).")


class MergeSpec(Model):
    """Merging a LoRA/DoRA adapter into the base after training."""

    enabled: bool | None = Field(None, description="Merge after training; default on for lora, qlora and dora.")
    uri: Uri | None = Field(None, description="Where the merged model goes; default <output>/merged/.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Data type of the merged weights.")
    max_shard_size: str = Field("5GB", pattern=QUANTITY_PATTERN, max_length=32, description="Largest shard file.")
    resources: Resources | None = Field(None, description="Merge Job resources (CPU by default).")


class CheckpointSpec(Model):
    keep: int = Field(3, ge=1, le=1000, description="Keep this many newest complete checkpoints.")


class SamplesSpec(Model):
    """Generations of the trained model, written after training to <output>/samples.jsonl."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=32768)]] | None = Field(
        None, max_length=MAX_LIST, description="User prompts to answer (one turn each, with the chat template)."
    )
    from_eval: int = Field(
        0, ge=0, le=1000, description="Also answer the prompts of this many held-out eval samples (with reference)."
    )
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest generation (greedy decoding).")


class OutputSpec(Model):
    """Where checkpoints, the adapter/model, the loss plot, TensorBoard logs, samples and the merged model are
    written."""

    uri: Uri = Field(description="Output prefix; checkpoints go to <uri>/checkpoints/step-<N>/.")
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint retention.")
    merge: MergeSpec = Field(default_factory=MergeSpec, description="Adapter merge after training.")
    plot_loss: bool = Field(True, description="Write loss.png with train and eval loss.")
    samples: SamplesSpec | None = Field(
        None, description="Generate answers with the trained model after training (samples.jsonl)."
    )


# --- experiment tracking ----------------------------------------------------------------------------------------

# The services reportTo may name; each is also a transformers report_to integration.
TRACKERS = ("wandb", "mlflow", "swanlab")


def _no_repeats(value: list[str] | None) -> list[str] | None:
    if value is not None and len(set(value)) != len(value):
        raise ValueError(f"names a service more than once: {value}")
    return value


class TrackingSecretRef(Model):
    name: str = Field(
        min_length=1,
        max_length=MAX_NAME,
        description=(
            "Secret in the job's namespace; each key becomes an environment variable of the trainer (WANDB_API_KEY, "
            "SWANLAB_API_KEY, MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD, ...)."
        ),
    )


class TrackingSpec(Model):
    """Experiment tracking. TensorBoard event files are always written (<output>/tensorboard/); the services named
    here receive the same metrics (loss, eval loss, learning rate, grad norm, tokens/s) from global rank 0."""

    report_to: Annotated[list[Literal["wandb", "mlflow", "swanlab"]] | None, AfterValidator(_no_repeats)] = Field(
        None,
        max_length=len(TRACKERS),
        description="Services to report to: wandb, mlflow, swanlab (any of them).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    project: str | None = Field(
        None, max_length=MAX_NAME, description="wandb/swanlab project and MLflow experiment (default finetune)."
    )
    run_name: str | None = Field(None, max_length=MAX_NAME, description="Run name (default: the FineTuneJob name).")
    mlflow_tracking_uri: str | None = Field(
        None,
        max_length=MAX_URI,
        pattern=r"^(https?://[^\s/]+(/.*)?|file:.+|databricks(://.*)?)$",
        description="MLflow tracking server, e.g. http://mlflow.mlflow:5000 (mlflow only).",
    )
    secret_ref: TrackingSecretRef | None = Field(
        None, description="Credentials for the services, as environment variables from a Secret."
    )

    RULES = (
        WithItem("mlflowTrackingUri applies to reportTo: [mlflow] only", "mlflow_tracking_uri", "report_to", "mlflow"),
    )


# --- the whole run ----------------------------------------------------------------------------------------------


class RunSpec(Model):
    """The fields that define a training run; shared by TrainerConfig and the FineTuneJob spec."""

    model: ModelSource = Field(description="Base model.")
    datasets: list[DatasetSpec] = Field(min_length=1, max_length=MAX_LIST, description="Training datasets, mixed.")
    eval_datasets: list[DatasetSpec] | None = Field(
        None, max_length=MAX_LIST, description="Evaluation datasets; exclusive with valSize."
    )
    val_size: float | None = Field(None, gt=0, lt=1, description="Hold out this fraction of the training data.")
    template: Annotated[str, AfterValidator(_known_template)] = Field(
        "auto",
        description="Chat template: a LLaMA-Factory template name, or auto for the tokenizer's own.",
        json_schema_extra={"enum": list(TEMPLATES)},
    )
    method: MethodSpec = Field(default_factory=MethodSpec, description="Fine-tuning method.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
    deepspeed: DeepSpeedSpec | None = Field(None, description="DeepSpeed ZeRO; exclusive with fsdp; DDP when neither.")
    fsdp: FsdpSpec | None = Field(None, description="FSDP2 full sharding (fsdp: {}); exclusive with deepspeed.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3-compatible storage settings.")
    output: OutputSpec = Field(description="Output location.")
    tracking: TrackingSpec | None = Field(
        None, description="Experiment tracking (wandb, mlflow, swanlab); TensorBoard files are always written."
    )

    RULES: ClassVar[tuple[Rule, ...]] = (not_both("eval_datasets", "val_size"), not_both("deepspeed", "fsdp"))

    def sharded(self) -> bool:
        """Whether the weights are partitioned across processes (ZeRO-3 or FSDP): collective saves and generation."""
        return self.fsdp is not None or (self.deepspeed is not None and self.deepspeed.zero_stage == 3)

    def merge_enabled(self) -> bool:
        enabled = self.output.merge.enabled
        return self.method.uses_adapter if enabled is None else enabled and self.method.uses_adapter


class TrainerConfig(RunSpec):
    """What the operator hands each replica (as JSON in a ConfigMap) and what `ftj run` passes locally."""

    job_name: str = Field("local", max_length=MAX_NAME, description="FineTuneJob name, for logs and status.")
    namespace: str | None = Field(None, max_length=MAX_NAME, description="FineTuneJob namespace (in a cluster).")
    deepspeed_config_path: str | None = Field(None, description="Path of the rendered DeepSpeed JSON.")
    cache_dir: str = Field("/scratch/cache", description="Node-local cache for downloads and tokenized data.")
    cache_durable: bool = Field(
        True,
        description="Whether cache_dir outlives its node (a PVC, a local disk): downloads are then fsynced before "
        "they take their final name, so a crash of the machine cannot leave a torn file that a later run would "
        "keep. The operator sets false for an emptyDir scratch, which dies with its node.",
    )


# --- run identity -----------------------------------------------------------------------------------------------

# Run identity covers the fields of RunSpec (TrainerConfig's own additions, job name, namespace and mount paths, say
# who runs it and where things are on this machine) except these: how storage is reached, and settings that change
# neither the trained weights nor where they go. A FineTuneJob re-created with only these changed (GitOps delete and
# re-apply, another S3 endpoint or keys, other retention, merge or reporting settings) resumes its own checkpoints.
# Everything else (model, datasets, evalDatasets, valSize, template, method, the other training fields, deepspeed, fsdp,
# output.uri) defines the run; a field added to RunSpec is run-defining unless it is listed here.
NOT_RUN_DEFINING: dict[str, Any] = {
    "storage": True,  # endpoint, region, addressing style, credentials
    "output": {
        "checkpoints": True,  # retention (keep)
        "merge": True,  # what happens after training
        "plot_loss": True,  # a report
        "samples": True,  # a look at the result after training
    },
    "training": {
        "logging_steps": True,  # how often progress is reported,
        "save_steps": True,  # checkpointed,
        "eval_steps": True,  # and evaluated
        "attention": True,  # kernels: the same computation, faster or in less memory
        "liger": True,
    },
    "tracking": True,  # where metrics are reported
}


def run_definition(config: RunSpec) -> dict[str, Any]:
    """The run-defining part of `config` as canonical JSON data: camelCase, fields at their default left out (so a
    value written out and the same value left to its default agree, and a trainer that adds a field with a default
    still recognises an older run), output.uri with one trailing slash. An optional object set to all defaults stays
    as {}: `deepspeed: {}` (ZeRO-2) is not the run without deepspeed (DDP)."""
    data = config.model_dump(
        mode="json", by_alias=True, include=set(RunSpec.model_fields), exclude=NOT_RUN_DEFINING, exclude_defaults=True
    )
    for key, part in NOT_RUN_DEFINING.items():
        if isinstance(part, dict) and data.get(key) == {}:
            del data[key]  # emptied by the exclusions above: the same as left to its defaults
    data["output"] = {"uri": config.output.uri.rstrip("/") + "/"}
    return data


def run_fingerprint(config: RunSpec) -> str:
    """sha256 (hex) of run_definition(config): equal for every attempt and re-creation of the same run, different
    when anything that defines it differs. Checkpoint and final manifests record it; see finetune_trainer.identity."""
    canonical = json.dumps(run_definition(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Progress(Model):
    """Live training progress; the trainer's rank 0 writes it to FineTuneJob.status.progress."""

    step: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=0)
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    updated_at: str | None = Field(None, description="RFC 3339 time of this report.")
    summary: str | None = Field(None, max_length=64, description="step/totalSteps, for kubectl get.")


def format_validation_error(exc: Any, prefix: str = "", document: Any = None) -> list[str]:
    """Turn a pydantic ValidationError into one line per error: `field.path: message (got value)`."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        path = ".".join(p for p in (prefix, path) if p)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = "required field is missing"
        got = err.get("input")
        # Scalars only: a whole list or mapping is noise, and may hold values (env) that must not reach status.
        show = err["type"] != "missing" and not isinstance(got, dict | list)
        show = show and not (isinstance(got, str) and repr(got) in message)
        lines.append(f"{path or '<root>'}: {message}" + (f" (got {got!r})" if show else ""))
    return lines
