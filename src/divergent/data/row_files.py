"""Rows of a data file read as a stream and a subset of them written back in the same format.

:class:`RowFile` reads the formats of :mod:`divergent.data.lm_data` (``.jsonl``, ``.json``,
``.csv``, ``.parquet``, ``.txt``, a ``save_to_disk`` folder) one row at a time, so that a
pass over a corpus holds one row (one Parquet record batch) in memory — except ``.json``,
which is one JSON document and is parsed whole. :meth:`RowFile.write_subset` writes the
rows selected by a mask in corpus order, in the input's own format (JSON Lines and text
lines byte for byte; CSV with the same header; Parquet with the same schema; a
``save_to_disk`` folder with the other splits unchanged), atomically: into a temporary
name beside the target, renamed when complete.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from divergent.data.lm_data import ACCEPTED, FILE_SUFFIXES, _is_saved_dataset

__all__ = ["RowFile", "atomic_output"]

_PARQUET_BATCH = 1024


@contextlib.contextmanager
def atomic_output(target: Path, *, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed over it when the body completes, removed otherwise."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) if folder else \
        Path(tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)[1])
    try:
        yield tmp
        if not folder:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


class RowFile:
    """A data file (or ``save_to_disk`` folder) read as a stream of row dicts.

    ``kind`` is the suffix (``".jsonl"`` …) or ``"save_to_disk"``; ``suffix`` names the output
    (``data.jsonl``, or ``data`` for a folder). Iterating yields the rows in order (blank lines of
    ``.jsonl``/``.txt`` are not rows). Errors name the file and the line.
    """

    def __init__(self, path: str | Path, what: str = "--data") -> None:
        self.path = Path(path)
        self.what = what
        if not self.path.exists():
            raise FileNotFoundError(f"{what}: {self.path} not found; expected {ACCEPTED}")
        if self.path.is_dir():
            if not _is_saved_dataset(self.path):
                raise ValueError(f"{what}: {self.path} is a folder but not one written by datasets' save_to_disk "
                                 f"(no dataset_info.json/state.json/dataset_dict.json); expected {ACCEPTED}")
            self.kind = "save_to_disk"
        else:
            self.kind = self.path.suffix.lower()
            if self.kind not in FILE_SUFFIXES:
                raise ValueError(f"{what}: {self.path} has the suffix {self.kind or '(none)'!r}; expected {ACCEPTED}")

    @property
    def output_name(self) -> str:
        return "data" if self.kind == "save_to_disk" else f"data{self.kind}"

    # ------------------------------------------------------------------ reading

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            if self.kind == ".jsonl":
                for number, line in self._lines():
                    yield self._jsonl_row(line, number)
            elif self.kind == ".txt":
                for _, line in self._lines():
                    yield {"text": line.rstrip("\r\n")}
            elif self.kind == ".csv":
                with open(self.path, encoding="utf-8", newline="") as handle:
                    yield from csv.DictReader(handle)
            elif self.kind == ".json":
                yield from self._json_rows()[0]
            elif self.kind == ".parquet":
                for batch in self._parquet().iter_batches(batch_size=_PARQUET_BATCH):
                    yield from batch.to_pylist()
            else:
                yield from self._dataset()[0]
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.what}: {self.path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except csv.Error as exc:
            raise ValueError(f"{self.what}: {self.path} is not valid CSV ({exc})") from None

    def _lines(self) -> Iterator[tuple[int, str]]:
        with open(self.path, encoding="utf-8", newline="") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line

    def _jsonl_row(self, line: str, number: int) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.what}: {self.path} line {number} is not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{self.what}: {self.path} line {number} is a JSON {type(row).__name__}; expected an object (one row)")
        return row

    def _json_rows(self) -> tuple[list[dict[str, Any]], bool]:
        from divergent.data.lm_data import _parse_json

        text = self.path.read_text(encoding="utf-8")
        data = json.loads(text) if text.strip() else []
        columns = isinstance(data, dict)
        return (_parse_json(text, self.path, self.what) if text.strip() else []), columns

    def _parquet(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except Exception as exc:
            raise ValueError(f"{self.what}: {self.path} is not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None

    def _dataset(self):
        """(the split refined, its name, the loaded object) of a save_to_disk folder."""
        import datasets

        try:
            loaded = datasets.load_from_disk(str(self.path))
        except Exception as exc:
            raise ValueError(f"{self.what}: could not read the save_to_disk folder {self.path}: {str(exc).splitlines()[0][:200]}") from None
        if isinstance(loaded, datasets.DatasetDict):
            name = "train" if "train" in loaded else next(iter(loaded))
            return loaded[name], name, loaded
        return loaded, None, loaded

    def count(self) -> int:
        """The number of rows (a pass over the file; Parquet and save_to_disk from their metadata)."""
        if self.kind == ".parquet":
            return int(self._parquet().metadata.num_rows)
        if self.kind == "save_to_disk":
            return len(self._dataset()[0])
        if self.kind in (".jsonl", ".txt"):
            return sum(1 for _ in self._lines())
        return sum(1 for _ in self)

    # ------------------------------------------------------------------ writing

    def write_subset(self, keep: np.ndarray, target: str | Path) -> Path:
        """Write the rows where ``keep`` is True, in order and in this file's format, atomically to ``target``."""
        target = Path(target)
        keep = np.asarray(keep, dtype=bool)
        with atomic_output(target, folder=self.kind == "save_to_disk") as tmp:
            if self.kind in (".jsonl", ".txt"):
                with open(tmp, "w", encoding="utf-8", newline="") as out:
                    for index, (_, line) in enumerate(self._lines()):
                        if keep[index]:
                            out.write(line if line.endswith("\n") else line + "\n")
            elif self.kind == ".csv":
                with open(self.path, encoding="utf-8", newline="") as handle, \
                        open(tmp, "w", encoding="utf-8", newline="") as out:
                    reader = csv.DictReader(handle)
                    writer = csv.DictWriter(out, fieldnames=reader.fieldnames or [])
                    writer.writeheader()
                    for index, row in enumerate(reader):
                        if keep[index]:
                            writer.writerow(row)
            elif self.kind == ".json":
                rows, columns = self._json_rows()
                kept = [row for index, row in enumerate(rows) if keep[index]]
                data: Any = {key: [row[key] for row in kept] for key in rows[0]} if columns else kept
                Path(tmp).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            elif self.kind == ".parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                source = self._parquet()
                with pq.ParquetWriter(tmp, source.schema_arrow) as writer:
                    start = 0
                    for batch in source.iter_batches(batch_size=_PARQUET_BATCH):
                        mask = pa.array(keep[start:start + batch.num_rows])
                        start += batch.num_rows
                        writer.write_table(pa.Table.from_batches([batch]).filter(mask))
            else:
                import datasets

                split, name, loaded = self._dataset()
                subset = split.select(np.flatnonzero(keep).tolist())
                if name is not None:
                    subset = datasets.DatasetDict({**{k: v for k, v in loaded.items()}, name: subset})
                subset.save_to_disk(str(tmp))
        return target

    def write_rows(self, rows: Iterable[dict[str, Any]], target: str | Path) -> Path:
        """Write new rows (e.g. packed chunks) in this file's format, atomically to ``target``, as they come."""
        target = Path(target)
        with atomic_output(target, folder=self.kind == "save_to_disk") as tmp:
            if self.kind in (".jsonl", ".txt", ".json", ".csv"):
                with open(tmp, "w", encoding="utf-8", newline="") as out:
                    writer, index = None, -1
                    for index, row in enumerate(rows):
                        if self.kind == ".jsonl":
                            out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        elif self.kind == ".txt":
                            out.write(row["text"] + "\n")
                        elif self.kind == ".json":
                            out.write(("[\n" if index == 0 else ",\n") + json.dumps(row, ensure_ascii=False))
                        else:
                            if writer is None:
                                writer = csv.DictWriter(out, fieldnames=list(row))
                                writer.writeheader()
                            writer.writerow(row)
                    if self.kind == ".json":
                        out.write("\n]\n" if index >= 0 else "[]\n")
            elif self.kind == ".parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                writer = None
                batch: list[dict[str, Any]] = []
                for row in itertools.chain(rows, [None]):
                    if row is not None:
                        batch.append(row)
                    if batch and (row is None or len(batch) == _PARQUET_BATCH):
                        table = pa.Table.from_pylist(batch)
                        writer = writer or pq.ParquetWriter(tmp, table.schema)
                        writer.write_table(table)
                        batch = []
                if writer is None:
                    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp)
                else:
                    writer.close()
            else:
                import datasets

                collected = list(rows)  # datasets builds a folder from an in-memory list; kept chunks only
                datasets.Dataset.from_list(collected).save_to_disk(str(tmp))
        return target
