"""Runs in LLaMA-Factory's venv for bench/bench_preprocess.py --lf: times its SFT preprocessing of alpaca records.

    lf-venv/bin/python tests/parity/lf_bench_worker.py TOKENIZER_DIR DATA.json TEMPLATE CUTOFF

Prints {"samples": ..., "seconds": ...}: its alpaca converter and SupervisedDatasetProcessor over the records in
batches of 1000 (datasets.map's default), in one process, without writing an Arrow cache.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import _import_lf


def main(tokenizer_dir: str, data: str, template_name: str, cutoff: str) -> None:
    from transformers import AutoTokenizer

    lf = _import_lf()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = lf["DataArguments"](template=template_name, cutoff_len=int(cutoff))
    template = lf["template"].get_template_and_fix_tokenizer(tokenizer, args)
    processor = lf["Processor"](template=template, tokenizer=tokenizer, processor=None, data_args=args)
    converter = lf["converters"]["alpaca"](lf["DatasetAttr"]("file", data), args)
    records = json.loads(Path(data).read_text())
    started = time.perf_counter()
    converted = [converter(record) for record in records]
    samples = 0
    for start in range(0, len(converted), 1000):
        chunk = converted[start : start + 1000]
        batch = {key: [row[key] for row in chunk] for key in chunk[0]}
        samples += len(processor.preprocess_dataset(batch)["input_ids"])
    print(json.dumps({"samples": samples, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
