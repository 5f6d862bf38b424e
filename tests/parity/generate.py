"""Runs LLaMA-Factory's own template and SFT preprocessing code on the parity sets and writes the reference.

Run by `make lf-reference` in the LLaMA-Factory venv (tests/parity/lf_venv.sh), never by the product. It writes
* trainer-image/finetune_trainer/data/lf_templates.py: LLaMA-Factory's template registry transcribed as data
  (slots, default system, stop words, tool formats, ...), which the trainer's named templates are built from
  (`make lf-reference` runs ruff format on it);
* tests/parity/lf_reference.json.gz: for every case of cases.py and every row of its sets, what LLaMA-Factory
  makes of it: input_ids and labels, the text of the trained and untrained runs, or that it drops the row or fails.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _datetime
import gzip
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TABLE = ROOT / "trainer-image" / "finetune_trainer" / "data" / "lf_templates.py"
REFERENCE = HERE / "lf_reference.json.gz"
sys.path.insert(0, str(HERE))

from cases import SEED, TOOL_DATE, Case, as_dict, cases  # noqa: E402
from tokenizers_build import build  # noqa: E402

IGNORE = -100


def _import_lf() -> dict[str, Any]:
    """LLaMA-Factory's data modules, without its package __init__ files (they import the whole training stack)."""
    spec = importlib.util.find_spec("llamafactory")
    assert spec
    assert spec.origin
    root = os.path.dirname(spec.origin)
    try:
        import torchaudio  # noqa: F401
    except ImportError:  # imported by its multimodal plugin module, unused for text
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    for name in ("llamafactory.data", "llamafactory.hparams"):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, name.split(".")[1])]
        sys.modules[name] = module
    import llamafactory
    from llamafactory.data import template, tool_utils
    from llamafactory.data.converter import AlpacaDatasetConverter, SharegptDatasetConverter
    from llamafactory.data.parser import DatasetAttr
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.hparams.data_args import DataArguments

    class FixedDate(_datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> FixedDate:
            return cls(*TOOL_DATE)

    tool_utils.datetime = FixedDate  # llama3's tool prompt prints today's date
    return {
        "version": llamafactory.__version__,
        "template": template,
        "converters": {"alpaca": AlpacaDatasetConverter, "sharegpt": SharegptDatasetConverter},
        "DatasetAttr": DatasetAttr,
        "Processor": SupervisedDatasetProcessor,
        "DataArguments": DataArguments,
    }


# --- the template registry as data ------------------------------------------------------------------------------


def _slots(slots: list[Any]) -> list[Any]:
    out: list[Any] = []
    for slot in slots:
        if isinstance(slot, str):
            out.append(slot)
        elif isinstance(slot, dict):
            out.append({"token": slot["token"]})
        elif isinstance(slot, set):
            (name,) = tuple(slot)
            out.append({"special": name})
        else:
            raise TypeError(f"unexpected slot {slot!r}")
    return out


KINDS = {"Template": "plain", "Llama2Template": "llama2", "ReasoningTemplate": "reasoning"}
KINDS["Glm47ReasoningTemplate"] = "glm47"


class _StandIn:
    """A processor stand-in whose every attribute is an empty string (some plugins format its tokens into text)."""

    def __getattr__(self, name: str) -> str:
        return ""


def text_processor(template: Any) -> tuple[bool, Any]:
    """A processor under which the template's multimodal plugin leaves a text-only sample alone, if any.

    Multimodal plugins refuse to run without the model's processor even on text; with no image, video or audio in
    the sample the processor is never really used, so a stand-in shows whether the text comes out untouched.
    """
    from unittest.mock import MagicMock

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for processor in (None, MagicMock(), _StandIn()):
        try:
            out = template.mm_plugin.process_messages(copy.deepcopy(messages), [], [], [], processor)
            ids, labels = template.mm_plugin.process_token_ids([], [], [], [], [], MagicMock(), processor)
        except Exception:
            continue
        if out == messages and ids == [] and labels == []:
            return True, processor
    return False, None


def dump_templates(lf: dict[str, Any]) -> dict[str, Any]:
    templates: dict[str, Any] = {}
    for name, t in sorted(lf["template"].TEMPLATES.items()):
        plugin = type(t.mm_plugin).__name__
        templates[name] = {
            "kind": KINDS[type(t).__name__],
            "prefix": _slots(t.format_prefix.slots),
            "system": _slots(t.format_system.slots),
            "user": _slots(t.format_user.slots),
            "assistant": _slots(t.format_assistant.slots),
            "observation": _slots(t.format_observation.slots),
            "function": _slots(t.format_function.slots),
            "function_format": t.format_function.tool_format,
            "tools_format": t.format_tools.tool_format,
            # A template may write the tool list through plain string slots instead of a tool format.
            "tools": None if t.format_tools.tool_format else _slots(t.format_tools.slots),
            "default_system": t.default_system,
            "stop_words": list(t.stop_words),
            "thought_words": list(t.thought_words),
            "tool_call_words": list(t.tool_call_words),
            "efficient_eos": t.efficient_eos,
            "replace_eos": t.replace_eos,
            "multimodal": None if plugin == "BasePlugin" else plugin,
            "text_only": text_processor(t)[0],
        }
    return {
        "source": f"LLaMA-Factory {lf['version']} (Apache-2.0), llamafactory/data/template.py, via tests/parity",
        "templates": templates,
    }


# --- the reference rows -----------------------------------------------------------------------------------------


def _label_mask(ids: list[int], labels: list[int]) -> tuple[str, dict[str, int]]:
    mask = []
    other: dict[str, int] = {}
    for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label == IGNORE:
            mask.append(".")
        elif label == token:
            mask.append("x")
        else:
            mask.append("o")
            other[str(position)] = label
    return "".join(mask), other


def _segments(tokenizer: Any, ids: list[int], mask: str) -> list[list[Any]]:
    runs: list[list[Any]] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (mask[end] == ".") != (mask[start] == "."):
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            runs.append([text, mask[start] != "."])
            start = end
    return runs


def _attr(lf: dict[str, Any], name: str, entry: dict[str, Any]) -> Any:
    attr = lf["DatasetAttr"]("file", entry["file_name"], formatting=entry.get("formatting", "alpaca"))
    for key, value in {**entry.get("columns", {}), **entry.get("tags", {})}.items():
        setattr(attr, key, value)
    return attr


def run_case(lf: dict[str, Any], case: Case, tokenizer_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out: dict[str, Any] = {"case": as_dict(case), "key": case.key}
    registry = lf["template"].TEMPLATES
    saved = registry[case.template]
    registry[case.template] = copy.deepcopy(saved)  # LLaMA-Factory mutates the registered template
    try:
        args = lf["DataArguments"](
            template=case.template,
            cutoff_len=case.cutoff_len,
            train_on_prompt=case.train_on_prompt,
            mask_history=case.mask_history,
        )
        template = lf["template"].get_template_and_fix_tokenizer(tokenizer, args)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    finally:
        registry[case.template] = saved
    _, mm_processor = text_processor(template)
    processor = lf["Processor"](template=template, tokenizer=tokenizer, processor=mm_processor, data_args=args)
    out["eos_token"] = tokenizer.eos_token
    rows: list[dict[str, Any]] = []
    for set_name in case.sets:
        entry = info[set_name]
        attr = _attr(lf, set_name, entry)
        converter = lf["converters"][attr.formatting](attr, args)
        records = json.loads((HERE / "sets" / entry["file_name"]).read_text())
        for index, record in enumerate(records):
            row: dict[str, Any] = {"set": set_name, "index": index}
            try:
                converted = converter(record)
                batch = {key: [value] for key, value in converted.items()}
                result = processor.preprocess_dataset(batch)
            except Exception as exc:  # in LLaMA-Factory this stops the whole run
                row["status"] = "error"
                row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                continue
            if not result.get("input_ids"):
                row["status"] = "dropped"
            else:
                ids, labels = result["input_ids"][0], result["labels"][0]
                mask, other = _label_mask(ids, labels)
                row.update(status="ok", input_ids=ids, labels=mask)
                if other:
                    row["label_other"] = other
                row["segments"] = _segments(tokenizer, ids, mask)
            rows.append(row)
    out["rows"] = rows
    return out


def _as_module(table: dict[str, Any]) -> str:
    import pprint

    header = (
        "# ruff: noqa: E501, RUF001\n"
        '"""LLaMA-Factory\'s chat templates as data: generated by tests/parity/generate.py (`make lf-reference`).\n\n'
        "Do not edit by hand; regenerate. Slots: a string (`{{content}}` marks the text), {'token': name} (that\n"
        "token's id), {'special': 'bos_token'|'eos_token'} (the tokenizer's, if it has one).\n"
        '"""\n\n'
        "from typing import Any\n\n"
        f"SOURCE = {table['source']!r}\n"
    )
    body = pprint.pformat(table["templates"], width=110, sort_dicts=True)
    return f"{header}\nTEMPLATES: dict[str, dict[str, Any]] = {body}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="run only the cases whose key contains this text (no files written)")
    options = parser.parse_args()
    lf = _import_lf()
    table = dump_templates(lf)
    text = [name for name, spec in table["templates"].items() if spec["text_only"]]
    info = json.loads((HERE / "sets" / "dataset_info.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        shas = {}
        dirs = {}
        for kind in ("nobos", "bos", "eos0"):
            dirs[kind] = build(kind, Path(tmp) / kind, table["templates"])
            shas[kind] = hashlib.sha256((dirs[kind] / "tokenizer.json").read_bytes()).hexdigest()
        selected = [c for c in cases(text) if not options.only or options.only in c.key]
        results = [run_case(lf, case, dirs[case.tokenizer], info) for case in selected]
    if options.only:
        print(json.dumps(results, ensure_ascii=False, indent=1)[:20000])
        return
    TABLE.write_text(_as_module(table))
    import tokenizers
    import transformers

    meta = {
        "llamafactory": lf["version"],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer_sha256": shas,
        "seed": SEED,
        "tool_date": list(TOOL_DATE),
        "templates": sorted(table["templates"]),
        "text_templates": sorted(text),
    }
    lines = [json.dumps(meta, ensure_ascii=False)] + [json.dumps(r, ensure_ascii=False) for r in results]
    # One JSON document per line (meta, then one per case), gzip'd: about 10x smaller than the text.
    with gzip.GzipFile(REFERENCE, "wb", mtime=0) as handle:
        handle.write(("\n".join(lines) + "\n").encode())
    rows = sum(len(r.get("rows", [])) for r in results)
    print(f"{len(results)} cases, {rows} rows, {len(text)} text templates of {len(table['templates'])} -> {REFERENCE}")


if __name__ == "__main__":
    main()
