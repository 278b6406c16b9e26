"""Loader for the local task files beside it: `custom_dataset: !function local_data.load_jsonl`.

lm-eval calls it with the task's `dataset_kwargs` (and any metadata, ignored here). A relative
`data_files` is resolved against this directory, not the working directory, so the tasks run from
anywhere; the rows are read into memory, so nothing touches the Hugging Face hub or its cache.
"""

import json
from pathlib import Path


def load_jsonl(data_files: str, split: str = "test", **_):
    import datasets

    path = Path(__file__).parent / data_files
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
