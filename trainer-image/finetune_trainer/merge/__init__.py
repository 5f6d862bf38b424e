"""Merging a trained LoRA/DoRA adapter into its full-precision base: one deployable, sharded safetensors model.

    from finetune_trainer.merge import merge_model, merge_from_storage, MergeRequest

    merge_model(base: Path, adapter: Path, output: Path, *, dtype: str, max_shard_size: str,
                model_card_extra: dict | None = None, overwrite: bool = False,
                config: TrainerConfig | None = None) -> MergeReport
    merge_from_storage(request: MergeRequest, *, cache_dir: Path, storage: StorageSpec | None = None) -> MergeReport

`merge_model` works on local directories (what `ftj merge` calls); `merge_from_storage` takes s3://, pvc://,
file:// (and hf:// for the base) URIs and is what `python -m finetune_trainer merge` runs. Both stream the base
tensor by tensor (`local`), apply the pure tensor arithmetic of `weights`, write shards as planned in `shards`, and
finish with a model card (`card`) and manifest.json, written last. Errors a person must fix raise
`finetune_trainer.errors.MergeError`.
"""

from finetune_trainer.merge.local import MergeReport, MergeSettings, merge_model, merge_to_directory
from finetune_trainer.merge.remote import MergeRequest, merge_from_storage

__all__ = ["MergeReport", "MergeRequest", "MergeSettings", "merge_from_storage", "merge_model", "merge_to_directory"]
