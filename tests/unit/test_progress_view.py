"""The loss table `ftj run` prints from rank 0's progress snapshots."""

from __future__ import annotations

import io

from finetune_operator.local import ProgressView


def snapshot(step: int, loss: float, eval_loss: float | None = None) -> dict[str, object]:
    record: dict[str, object] = {"event": "progress", "step": step, "totalSteps": 90, "loss": loss, "epoch": 1.0}
    if eval_loss is not None:
        record["evalLoss"] = eval_loss
    return record


def table(*records: dict[str, object]) -> list[list[str]]:
    out = io.StringIO()
    view = ProgressView(out)
    for record in records:
        view.progress(record)
    return [line.split() for line in out.getvalue().splitlines()[1:]]


def test_one_row_per_logging_step_and_an_eval_row_of_its_own() -> None:
    rows = table(
        snapshot(45, 0.9379),
        snapshot(50, 0.9112),
        snapshot(50, 0.9112, eval_loss=0.8781),  # the evaluation at step 50
        snapshot(55, 0.8970, eval_loss=0.8781),  # the same eval loss carried in the next snapshot
    )
    assert [row[:4] for row in rows] == [
        ["45/90", "1.00", "0.9379", "-"],
        ["50/90", "1.00", "0.9112", "-"],
        ["50/90", "0.8781"],
        ["55/90", "1.00", "0.8970", "-"],
    ]


def test_a_new_eval_loss_on_a_new_step_shows_in_its_row() -> None:
    rows = table(snapshot(10, 2.0, eval_loss=1.9), snapshot(20, 1.5, eval_loss=1.9), snapshot(30, 1.2, eval_loss=1.1))
    assert [row[3] for row in rows] == ["1.9000", "-", "1.1000"]


def test_a_repeated_snapshot_or_one_without_a_loss_prints_nothing_new() -> None:
    start = {"event": "progress", "step": 0, "totalSteps": 90}
    rows = table(start, snapshot(5, 3.0), snapshot(5, 3.0))
    assert rows == [["5/90", "1.00", "3.0000", "-", "-", "-", "-"]]


def test_an_evaluation_at_a_step_that_logged_nothing_is_an_eval_row() -> None:
    rows = table(snapshot(15, 1.3215), snapshot(18, 1.3215, eval_loss=1.3647))
    assert rows == [["15/90", "1.00", "1.3215", "-", "-", "-", "-"], ["18/90", "1.3647"]]
