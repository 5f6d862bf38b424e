"""A Trainer callback both sides of the side-by-side benches run with: the time at the end of every optimizer step,
the input tokens the model has been fed by then (counted at the model's forward: every input id that is not the pad
token, so both sides count the same way whatever their packing and masks), and the process's peak memory at the end,
written as JSON. The same code measures LLaMA-Factory's trainer (lf_driver.py) and ours (ours_driver.py); it depends
only on torch and transformers."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class StepTimer(TrainerCallback):  # type: ignore[misc]
    def __init__(self, path: str | Path, pad_token_id: int) -> None:
        self.path = Path(path)
        self.pad_token_id = pad_token_id
        self.tokens = 0
        self.steps: list[tuple[int, float, int]] = []
        self._hook: Any = None

    def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and ids is not None:
            self.tokens += int((ids != self.pad_token_id).sum())

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append((int(state.global_step), time.monotonic(), self.tokens))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
        if not state.is_world_process_zero:
            return
        import torch

        peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.path.write_text(json.dumps({"steps": self.steps, "peak_gpu_bytes": peak_gpu, "peak_rss_bytes": peak_rss}))
