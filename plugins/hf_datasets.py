"""Hugging Face ``datasets``, from a saved copy or local data files: never downloaded."""

import contextlib
import os

import kerasllm
from kerasllm import reading, records

BUILDERS = ("json", "csv", "parquet", "text")


class HFDatasetSource(kerasllm.DataSource):
    """Args:
        directory: a dataset saved with ``save_to_disk`` (a ``Dataset``, or a
            ``DatasetDict`` whose ``split`` is read); memory-mapped, not loaded.
        builder: instead of ``directory``, one of ``datasets``' packaged builders
            reading local files: ``json`` (JSON Lines too), ``csv``, ``parquet`` or
            ``text`` (one ``text`` per line). The files are streamed, with no cache.
        data_files: the builder's files: a path or glob, or a list of them.
        split: the split of a ``DatasetDict`` in ``directory``; for a builder,
            the name its files are loaded under.
        text_field: the column holding the document, a string.
        label_field: the column holding an integer label, or None.
        on_error: what to do with a malformed row (a null text or label, or one
            of the wrong type): ``raise`` an error naming the row, or ``skip`` it
            and count it.

    Empty texts are skipped and counted. Hugging Face Hub access is switched off
    while loading. Needs ``pip install "kerasllm[datasets]"``. Rows are numbered
    from 0 in errors; a malformed line in a ``json`` or ``csv`` file is reported by
    ``datasets`` itself: the ``jsonl`` and ``csv`` sources name the file and line.

    Examples:
    ```python
    source = HFDatasetSource(directory="data/reviews", split="train", label_field="label")
    source = HFDatasetSource(builder="parquet", data_files="data/*.parquet")
    ```
    """

    def __init__(self, directory=None, builder=None, data_files=None, split="train",
                 text_field="text", label_field=None, on_error="raise"):
        if (directory is None) == (builder is None):
            raise ValueError("give exactly one of directory (a dataset saved with "
                             "save_to_disk) and builder (with data_files)")
        if builder is not None:
            reading.check_choice("builder", builder, BUILDERS)
            if data_files is None:
                raise ValueError(f"builder {builder!r} needs data_files: the files to read")
        elif data_files is not None:
            raise ValueError("data_files go with builder, not with directory")
        reading.check_choice("on_error", on_error, reading.ON_ERROR)
        datasets = reading.import_optional("datasets", "datasets", "datasets",
                                           "data source 'hf_datasets'")
        self.report = reading.InputReport()
        with _local_only(datasets):
            if directory is not None:
                self.name = os.fspath(directory)
                dataset = _saved_split(datasets, self.name, split)
            else:
                files = reading.resolve_paths(data_files, self.report)
                self.name = f"{builder} files ({', '.join(files)})"
                dataset = datasets.load_dataset(
                    builder, data_files={split: files}, split=split, streaming=True)
            columns = [text_field] + ([label_field] if label_field is not None else [])
            for option, column in zip(("text_field", "label_field"), columns):
                if dataset.column_names is not None and column not in dataset.column_names:
                    raise ValueError(f"{option} {column!r}: {self.name} has no such column; "
                                     f"its columns: {', '.join(dataset.column_names)}")
            self.dataset = dataset.select_columns(columns)
        self.text_field = text_field
        self.label_field = label_field
        self.on_error = on_error

    def examples(self):
        return records.python_examples(self._rows, label=self.label_field is not None)

    def _rows(self):
        rows = reading.Rows(self.report, "row", on_error=self.on_error)
        index = 0
        for batch in self.dataset.iter(batch_size=reading.BATCH):
            for values in zip(*batch.values()):
                example = rows.example(
                    f"{self.name} row {index}", False, records.record_example,
                    dict(zip(batch, values)), self.text_field, self.label_field, "column")
                index += 1
                if example:
                    yield example


def _saved_split(datasets, directory, split):
    try:
        saved = datasets.load_from_disk(directory, keep_in_memory=False)
    except FileNotFoundError as error:
        raise ValueError(f"directory: {error} (give a folder written by save_to_disk)") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ValueError(f"split {split!r}: {directory} has the splits "
                             f"{', '.join(saved)}")
        return saved[split]
    return saved


@contextlib.contextmanager
def _local_only(datasets):
    """datasets' settings while loading, restored after for the rest of the process:
    offline (it can otherwise ask the Hub, e.g. to count a load), and without torch,
    which a streaming dataset imports when installed (seconds, and memory) only to
    share its epoch with torch workers."""
    config = datasets.config
    saved = config.HF_HUB_OFFLINE, config.TORCH_AVAILABLE
    config.HF_HUB_OFFLINE, config.TORCH_AVAILABLE = True, False
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.TORCH_AVAILABLE = saved


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"hf_datasets": HFDatasetSource}
