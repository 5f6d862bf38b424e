"""The `ftj` command line: print the CRD, validate FineTuneJob files, convert LLaMA-Factory configs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api import KIND, FineTuneJob, validate_document
from finetune_operator.convert import ConvertOptions, convert
from finetune_operator.yamlio import dump_all


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each field path of every YAML document to its 1-based line, for error messages."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        index.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                index[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, str(i)))

    for n, doc in enumerate(yaml.compose_all(text)):
        if doc is not None:
            walk(doc, (str(n),))
    return index


def _locate(index: dict[tuple[str, ...], int], doc_no: int, error: str) -> int | None:
    path = error.split(":", 1)[0]
    parts = (str(doc_no), *[p for p in path.split(".") if p and p != "<root>"])
    while parts:
        if parts in index:
            return index[parts]
        parts = parts[:-1]
    return None


def validate_file(path: Path) -> tuple[list[FineTuneJob], list[str]]:
    """Validate every FineTuneJob in a file; return the valid ones and one line per error."""
    try:
        text = path.read_text()
    except OSError as exc:
        return [], [f"{path}: cannot read: {exc.strerror}"]
    try:
        docs = list(yaml.safe_load_all(text))
        index = _line_index(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        return [], [f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]
    valid: list[FineTuneJob] = []
    errors: list[str] = []
    for n, doc in enumerate(docs):
        if doc is None or (isinstance(doc, dict) and doc.get("kind") not in (KIND, None)):
            continue  # other kinds (Secrets, Argo CD Applications) may share the file
        job, problems = validate_document(doc)
        name = doc.get("metadata", {}).get("name", "?") if isinstance(doc, dict) else "?"
        located = sorted(((_locate(index, n, p) or 1, p) for p in problems), key=lambda lp: lp[0])
        errors += [f"{path}:{line}: {KIND} {name}: {problem}" for line, problem in located]
        if job is not None:
            valid.append(job)
    if not valid and not errors:
        errors.append(f"{path}: no {KIND} documents found")
    return valid, errors


def cmd_crd(args: argparse.Namespace) -> int:
    from finetune_operator.crd import crd_yaml

    text = crd_yaml()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from finetune_operator.apidoc import api_markdown

    text = api_markdown()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for name in args.files:
        jobs, errors = validate_file(Path(name))
        for line in errors:
            print(line, file=sys.stderr)
        if errors:
            failed = True
        else:
            print(f"{name}: {len(jobs)} {KIND}{'s' if len(jobs) != 1 else ''} valid")
    return 1 if failed else 0


def render_file(path: Path, namespace: str, backend: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Render every FineTuneJob in a file into its child objects; errors as `validate` reports them."""
    from finetune_operator.render import JobRef, children
    from finetune_operator.settings import Settings

    jobs, errors = validate_file(path)
    if errors:
        return [], errors
    settings = Settings.from_env()
    objects: list[dict[str, Any]] = []
    for job in jobs:
        if not job.metadata.name:
            return [], [f"{path}: {KIND} metadata.name is required to render (generateName is resolved by the server)"]
        spec = job.spec
        if not backend and spec.distribution.backend == "auto":
            return [], [
                f"{path}: {job.metadata.name}: distribution.backend auto is chosen by the operator against the "
                "cluster; pass --backend trainjob, pytorchjob or job to render one"
            ]
        if backend:
            spec = spec.with_backend(backend)
            refused = spec.rule_errors()
            if refused:
                return [], [f"{path}: {job.metadata.name} with backend {backend}: {'; '.join(refused)}"]
        ref = JobRef(job.metadata.name, job.metadata.namespace or namespace, spec)
        objects += children(ref, settings)
    return objects, []


def cmd_render(args: argparse.Namespace) -> int:
    out: list[str] = []
    for name in args.files:
        objects, errors = render_file(Path(name), args.namespace, args.backend)
        for line in errors:
            print(line, file=sys.stderr)
        if errors:
            return 1
        out.append(dump_all(objects))
    sys.stdout.write("---\n".join(out))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    source = Path(args.config)
    try:
        train = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        print(f"{source}: cannot read LLaMA-Factory config: {exc}", file=sys.stderr)
        return 2
    info_path = Path(args.dataset_info) if args.dataset_info else None
    if info_path is None:
        guess = source.parent / "data" / "dataset_info.json"
        info_path = guess if guess.is_file() else None
    dataset_info: dict[str, Any] = {}
    if info_path is not None:
        try:
            dataset_info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"{info_path}: cannot read dataset_info.json: {exc}", file=sys.stderr)
            return 2
    options = ConvertOptions(
        name=args.name,
        namespace=args.namespace,
        model_uri=args.model_uri,
        data_uri=args.data_uri,
        output_uri=args.output_uri,
        nodes=args.nodes,
        procs_per_node=args.procs_per_node,
        storage_secret=args.storage_secret,
        storage_endpoint=args.storage_endpoint,
    )
    result = convert(train, dataset_info, source, info_path, options)
    if not result.errors:
        _, problems = validate_document(result.document)
        result.errors.extend(f"converted spec: {p}" for p in problems)
    for line in result.errors:
        print(f"error: {line}", file=sys.stderr)
    if result.errors:
        return 1
    header = f"# Converted by `ftj convert` from {source.name}.\n"
    if result.not_carried:
        header += "# Not carried over:\n" + "".join(f"#   - {line}\n" for line in result.not_carried)
    text = header + yaml.safe_dump(result.document, sort_keys=False, width=120)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    for line in result.not_carried:
        print(f"not carried: {line}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from finetune_operator.local import LocalRun, workdir_for
    from finetune_operator.render import JobRef

    path = Path(args.file)
    jobs, errors = validate_file(path)
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        return 1
    if len(jobs) != 1:
        print(f"{path}: ftj run takes a file with exactly one {KIND}, found {len(jobs)}", file=sys.stderr)
        return 1
    job = jobs[0]
    name = job.metadata.name or "local"
    ref = JobRef(name, job.metadata.namespace or "local", job.spec)
    workdir = Path(args.workdir) if args.workdir else workdir_for(name)
    report = LocalRun(ref, workdir, log_level=args.log_level).run(merge=not args.no_merge)
    if report.returncode == 0:
        return 0
    return 130 if report.interrupted else 1  # 130: stopped by Ctrl-C, as shells report it


def _as_uri(value: str) -> str:
    return value if "://" in value else "file://" + str(Path(value).resolve())


def cmd_merge(args: argparse.Namespace) -> int:
    """The merge Job's command, run here: local directories (or URIs) in, a merged sharded model out."""
    from finetune_trainer.cli import main as trainer_main

    argv = [
        "merge",
        *("--base", _as_uri(args.base)),
        *("--adapter", _as_uri(args.adapter)),
        *("--output", _as_uri(args.output)),
        *("--dtype", args.dtype),
        *("--max-shard-size", args.max_shard_size),
    ]
    if args.overwrite:
        argv.append("--overwrite")
    return trainer_main(argv)


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    from finetune_operator import handlers

    namespaces = handlers.SETTINGS.watch_namespaces
    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=True,  # one actor is guaranteed by the Lease (finetune_operator.leader), not by kopf peering
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{handlers.SETTINGS.health_port}/healthz",
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftj", description="finetune-operator command line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("docs", help="print the API reference (docs/api.md) generated from the models")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("validate", help="validate FineTuneJob YAML files; every error, with field and line")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="print every Kubernetes object the operator creates for FineTuneJobs")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-n", "--namespace", default="default", help="namespace when the file names none")
    p.add_argument("--backend", choices=["pytorchjob", "trainjob", "job"], help="override spec.distribution.backend")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("run", help="run a FineTuneJob on this machine (local torchrun, local dirs or S3)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--workdir", help="where configs, caches and logs go (default ./.ftj/<name>)")
    p.add_argument("--no-merge", action="store_true", help="skip the adapter merge after training")
    p.add_argument("--log-level", default="WARNING", help="trainer log level on the terminal (default WARNING)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("merge", help="merge a LoRA/DoRA adapter into its full-precision base (sharded safetensors)")
    p.add_argument("--base", required=True, help="base model directory or URI")
    p.add_argument("--adapter", required=True, help="adapter directory or URI (a run's output)")
    p.add_argument("--output", required=True, help="where the merged model goes (directory or URI)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged output")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("operator", help="run the operator (settings from FTJ_* environment variables)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("convert", help="convert a LLaMA-Factory training YAML into a FineTuneJob")
    p.add_argument("config", help="LLaMA-Factory YAML (stage: sft)")
    p.add_argument("--dataset-info", help="dataset_info.json (default: data/dataset_info.json beside the config)")
    p.add_argument("--name", help="FineTuneJob name (default: from the file name)")
    p.add_argument("--namespace")
    p.add_argument("--model-uri", help="where the base model is, e.g. s3://models/Qwen2-7B/")
    p.add_argument("--data-uri", help="prefix holding the dataset files named in dataset_info.json")
    p.add_argument("--output-uri", help="output prefix, e.g. s3://runs/my-run/")
    p.add_argument("--nodes", type=int, help="replicas (torchrun --nnodes)")
    p.add_argument("--procs-per-node", type=int, help="processes per replica (torchrun --nproc_per_node)")
    p.add_argument("--storage-secret", help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    p.add_argument("--storage-endpoint", help="S3 endpoint URL (MinIO, Ceph RGW)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
