"""`ftj run`: run a FineTuneJob on this machine with the same commands the cluster would run.

Every replica becomes a local torchrun process group on loopback, with the rendered torchrun arguments
(`render.torchrun_args`) and the rendered TrainerConfig; storage is local directories (file://) or S3 (keys from
the environment). Rank 0's structured progress lines drive a live progress bar and a loss table; after training the
merge runs as the merge Job would, and a summary says where everything went.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from finetune_operator.render import LAUNCH, JobRef, merge_uri, torchrun_args, trainer_config
from finetune_trainer.deepspeed import deepspeed_config


@dataclass
class RunReport:
    """What happened, for the summary and for tests."""

    returncode: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, str] = field(default_factory=dict)  # service -> link to the run
    sample_count: int | None = None
    failure: dict[str, Any] | None = None
    merged: str | None = None
    already_complete: bool = False  # an earlier run's outputs were complete: nothing was trained
    interrupted: bool = False  # Ctrl-C: the replicas were stopped as a preempted Pod is (checkpoint, then exit)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_path(uri: str) -> str:
    return uri.removeprefix("file://") if uri.startswith("file://") else uri


class ProgressView:
    """A progress bar on one line (when the output is a terminal) and a loss table, from rank 0's JSON lines.

    Rank 0 sends a snapshot per logging step and another after each evaluation, for the same step. The table has
    one row per logging step (a snapshot without a train loss, such as the one at step 0, gets none); an evaluation
    adds a row of its own holding only the eval loss, and a train row shows an eval loss only when it is new, so a
    stale value is never repeated beside a newer train loss.
    """

    HEADER = f"{'step':>10} {'epoch':>6} {'loss':>9} {'eval loss':>9} {'lr':>9} {'tokens/s':>9} {'eta':>7}"

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.tty = out.isatty()
        self.header_shown = False
        self._last_step: int | None = None
        self._last_eval: float | None = None
        self._last_loss: float | None = None

    def progress(self, record: dict[str, Any]) -> None:
        if not self.header_shown:
            self._line(self.HEADER)
            self.header_shown = True
        step, total = record.get("step", 0), record.get("totalSteps") or 0

        def num(key: str, fmt: str) -> str:
            value = record.get(key)
            return format(value, fmt) if isinstance(value, int | float) else "-"

        evaluation = record.get("evalLoss")
        new_eval = isinstance(evaluation, int | float) and evaluation != self._last_eval
        eval_cell = num("evalLoss", ".4f") if new_eval else "-"
        loss = record.get("loss")
        # A snapshot after an evaluation carries the last train loss again (and may come at a step that logged
        # nothing, such as the last one): it is not a train row.
        if step == self._last_step or not isinstance(loss, int | float) or (new_eval and loss == self._last_loss):
            if new_eval:  # the evaluation at the step just shown
                self._line(f"{f'{step}/{total}':>10} {'':>6} {'':>9} {eval_cell:>9}")
        else:
            eta = record.get("etaSeconds")
            self._line(
                f"{f'{step}/{total}':>10} {num('epoch', '.2f'):>6} {num('loss', '.4f'):>9} {eval_cell:>9} "
                f"{num('learningRate', '.2e'):>9} {num('tokensPerSecond', '.0f'):>9} "
                f"{(f'{int(eta) // 60}m{int(eta) % 60:02d}s' if isinstance(eta, int | float) else '-'):>7}"
            )
        self._last_step = step
        if isinstance(loss, int | float):
            self._last_loss = loss
        if new_eval:
            self._last_eval = evaluation
        if self.tty and total:
            width = 40
            done = int(width * step / total)
            self.out.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total}")
            self.out.flush()

    def note(self, text: str) -> None:
        self._line(text)

    def _line(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write(text + "\n")
        self.out.flush()


def _parse(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not (line.startswith("{") and '"event"' in line):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class LocalRun:
    """One local run of a FineTuneJob."""

    def __init__(self, job: JobRef, workdir: Path, out: IO[str] = sys.stdout, log_level: str = "INFO") -> None:
        self.job = job
        self.workdir = workdir
        self.out = out
        self.log_level = log_level
        self.view = ProgressView(out)

    def prepare(self) -> list[Path]:
        """Write the TrainerConfig (and DeepSpeed JSON) each replica reads, as the ConfigMap would hold them.

        One file per node: each local "node" gets a cache of its own, as each cluster node has its own disk.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = trainer_config(self.job)
        ds = self.job.spec.deepspeed
        if ds is not None:
            ds_path = self.workdir / "ds_config.json"
            ds_path.write_text(json.dumps(deepspeed_config(ds), indent=2))
            config = config.model_copy(update={"deepspeed_config_path": str(ds_path)})
        paths = []
        for rank in range(self.job.spec.distribution.nodes):
            # A local cache outlives this run (and a crash of the machine): its downloads are fsynced.
            cache = {"cache_dir": str(self.workdir / "cache" / f"node-{rank}"), "cache_durable": True}
            node = config.model_copy(update=cache)
            path = self.workdir / f"trainer-node-{rank}.json"
            path.write_text(json.dumps(node.to_wire(), indent=2))
            paths.append(path)
        return paths

    def commands(self, config_paths: list[Path]) -> list[list[str]]:
        """One torchrun command per node: the rendered arguments with the values a cluster would inject."""
        dist = self.job.spec.distribution
        port = str(_free_port())
        out = []
        for rank, config_path in enumerate(config_paths):
            args = torchrun_args(str(rank), "127.0.0.1", port, str(dist.nodes), str(dist.procs_per_node))
            args[args.index("--config") + 1] = str(config_path)
            out.append([sys.executable, *LAUNCH[1:], *args])
        return out

    def _env(self, rank: int) -> dict[str, str]:
        env = {
            **os.environ,
            "FTJ_JOB_NAME": self.job.name,
            "FTJ_BACKEND": "local",
            "FTJ_LOG_LEVEL": self.log_level,
            "FTJ_TERMINATION_LOG": str(self.workdir / f"termination-{rank}.json"),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)  # progress goes to the terminal, not to a cluster
        env.update({e.name: e.value for e in self.job.spec.env or []})
        return env

    def train(self) -> RunReport:
        config_paths = self.prepare()
        for rank in range(self.job.spec.distribution.nodes):
            (self.workdir / f"termination-{rank}.json").unlink(missing_ok=True)
        commands = self.commands(config_paths)
        self.view.note(
            f"ftj run: {self.job.name}: {len(commands)} node(s) x {self.job.spec.distribution.procs_per_node}"
        )
        procs = []
        for rank, cmd in enumerate(commands):
            log = open(self.workdir / f"node-{rank}.log", "w")  # noqa: SIM115 - closed after the process ends
            procs.append(
                (
                    subprocess.Popen(
                        cmd,
                        env=self._env(rank),
                        stdout=subprocess.PIPE if rank == 0 else log,
                        stderr=subprocess.STDOUT,
                        text=True,
                        start_new_session=True,  # Ctrl-C reaches torchrun once, through us
                    ),
                    log,
                )
            )
        report = RunReport(returncode=0)

        def interrupt(*_: Any) -> None:
            # SIGTERM is what a preempted pod gets: the trainer saves a checkpoint before it exits.
            report.interrupted = True
            for proc, _log in procs:
                os.killpg(proc.pid, signal.SIGTERM)

        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            head, head_log = procs[0]
            assert head.stdout is not None
            for line in head.stdout:
                head_log.write(line)
                record = _parse(line)
                if record is None:
                    continue
                event = record.get("event")
                if event == "progress":
                    report.steps.append(record)
                    self.view.progress(record)
                elif event == "checkpoint":
                    report.checkpoints.append(record)
                    self.view.note(f"checkpoint: step {record.get('step')} -> {record.get('uri')}")
                elif event == "resumed":
                    self.view.note(f"resumed from step {record.get('resumedFromStep')}")
                elif event == "already-complete":
                    report.already_complete = True
                    self.view.note(
                        f"the outputs in {record.get('output')} are complete from an earlier run: nothing to train "
                        "(delete them, or choose another output.uri, to train again)"
                    )
                elif event == "artifacts":
                    report.artifacts.update({k: v for k, v in record.items() if k not in ("event", "job")})
                elif event == "samples":
                    report.sample_count = record.get("sampleCount")
                elif event == "tracking":
                    links = {k: str(v) for k, v in record.items() if k not in ("event", "job")}
                    report.tracking.update(links)
                    for service, link in links.items():
                        self.view.note(f"{service}: {link}")
                elif event == "failed":
                    report.failure = record
            codes = [p.wait() for p, _ in procs]
        finally:
            signal.signal(signal.SIGINT, previous)
            for _, log in procs:
                log.close()
        report.returncode = next((c for c in codes if c != 0), 0)
        if report.returncode and report.failure is None:
            report.failure = self._termination()
        return report

    def _termination(self) -> dict[str, Any] | None:
        for rank in range(self.job.spec.distribution.nodes):
            path = self.workdir / f"termination-{rank}.json"
            if path.exists() and path.stat().st_size:
                try:
                    report: dict[str, Any] = json.loads(path.read_text())
                    return report
                except ValueError:
                    return {"reason": "Error", "message": path.read_text()[-2000:]}
        return None

    def merge(self) -> subprocess.CompletedProcess[str]:
        """The merge, as the merge Job runs it."""
        spec = self.job.spec
        cmd = [
            sys.executable,
            *("-m", "finetune_trainer", "merge"),
            *("--config", str(self.workdir / "trainer-node-0.json")),
            *("--base", spec.model.uri),
            *("--adapter", spec.output.uri),
            *("--output", merge_uri(spec)),
            *("--dtype", spec.output.merge.dtype),
            *("--max-shard-size", spec.output.merge.max_shard_size),
        ]
        self.view.note(f"merging the adapter into the base model -> {merge_uri(spec)}")
        return subprocess.run(cmd, env=self._env(0), capture_output=True, text=True, check=False)

    def run(self, merge: bool = True) -> RunReport:
        started = time.monotonic()
        report = self.train()
        if report.returncode == 0 and merge and self.job.spec.merge_enabled():
            result = self.merge()
            (self.workdir / "merge.log").write_text(result.stdout + result.stderr)
            if result.returncode == 0:
                report.merged = merge_uri(self.job.spec)
            else:
                report.returncode = result.returncode
                report.failure = {"reason": "MergeFailed", "message": (result.stderr or result.stdout)[-2000:]}
        self.summary(report, time.monotonic() - started)
        return report

    def summary(self, report: RunReport, seconds: float) -> None:
        spec = self.job.spec
        lines = [""]
        if report.returncode == 0:
            done = " (trained earlier; nothing trained this time)" if report.already_complete else ""
            lines.append(f"ftj run: {self.job.name} succeeded in {seconds:.0f}s{done}")
        elif report.interrupted:
            lines.append(f"ftj run: {self.job.name} interrupted after {seconds:.0f}s")
        else:
            failure = report.failure or {}
            lines.append(
                f"ftj run: {self.job.name} FAILED ({failure.get('reason', 'exit ' + str(report.returncode))}): "
                f"{failure.get('message', '')}".rstrip(": ")
            )
        losses = [r for r in report.steps if isinstance(r.get("loss"), int | float)]
        if losses:
            first, last = losses[0], losses[-1]
            lines.append(
                f"  loss: {first['loss']:.4f} at step {first.get('step')} -> "
                f"{last['loss']:.4f} at step {last.get('step')}"
            )
        out = spec.output.uri.rstrip("/")
        if report.returncode == 0:
            kind = "adapter" if spec.method.uses_adapter else "model"
            lines.append(f"  {kind + ':':<12} {_local_path(out)}/")
            plot = report.artifacts.get("lossPlot")  # the trainer reports it only once the plot is written
            if plot:
                lines.append(f"  {'loss plot:':<12} {_local_path(plot)}")
            if report.artifacts.get("tensorboard"):
                lines.append(
                    f"  {'tensorboard:':<12} tensorboard --logdir {_local_path(report.artifacts['tensorboard'])}"
                )
            if report.artifacts.get("samples"):
                lines += samples_lines(report.artifacts["samples"], report.sample_count)
            lines.append(f"  {'checkpoints:':<12} {_local_path(out)}/checkpoints/")
        elif report.checkpoints:  # a failed run names only what it left behind
            newest = report.checkpoints[-1].get("step")
            lines.append(
                f"  {'checkpoints:':<12} {_local_path(out)}/checkpoints/ (newest: step {newest}; "
                "`ftj run` again resumes from it)"
            )
        if report.merged:
            lines.append(f"  {'merged:':<12} {_local_path(report.merged)}")
        for service, link in sorted(report.tracking.items()):
            lines.append(f"  {service + ':':<12} {link}")
        lines.append(f"  {'logs:':<12} {self.workdir}/")
        for line in lines:
            self.view.note(line)


SHOWN_SAMPLES = 3
SHOWN_CHARS = 160


def _one_line(text: str) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= SHOWN_CHARS else flat[: SHOWN_CHARS - 1] + "…"


def samples_lines(uri: str, count: int | None) -> list[str]:
    """The summary's samples part: where they are, then the first few (prompt -> generation), read from a local
    samples.jsonl (nothing more for other URIs)."""
    lines = [f"  {'samples:':<12} {_local_path(uri)}" + (f" ({count} rows)" if count is not None else "")]
    path = Path(_local_path(uri))
    if not path.is_file():
        return lines
    for raw in path.read_text().splitlines()[:SHOWN_SAMPLES]:
        try:
            row = json.loads(raw)
        except ValueError:
            break
        lines.append(f"    > {_one_line(row.get('prompt', ''))}")
        lines.append(f"      {_one_line(row.get('generation', ''))}")
    return lines


def workdir_for(name: str, base: Path | None = None) -> Path:
    return (base or Path.cwd() / ".ftj") / name
