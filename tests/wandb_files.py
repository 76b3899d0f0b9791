"""W&B's own offline files as test evidence: the records of `wandb/offline-run-*/run-<id>.wandb`.

The file is a LevelDB-style log (wandb's "datastore"): a 7-byte header (`:W&B`, magic 0xBEE1, version),
then 32 KiB blocks of chunks, each with a 7-byte header (CRC32, length, type: full/first/middle/last),
every record a `wandb_internal_pb2.Record` protobuf. wandb 0.31 no longer ships a reader in Python.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            chunks.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            chunks.append(pending + chunk)
    records = []
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    folder: Path
    run: object = None  # the RunRecord
    history: list[dict] = field(default_factory=list)  # one dict per logged row, JSON values decoded
    metrics: dict[str, object] = field(default_factory=dict)  # define_metric records by name
    artifacts: list = field(default_factory=list)  # ArtifactRecords

    @property
    def id(self) -> str:
        return self.run.run_id

    def steps(self, key: str) -> list[int]:
        """The `_step` of every row that logged `key`."""
        return [row["_step"] for row in self.history if key in row or any(k.startswith(key + "/") for k in row)]


def finished_records(file: Path, timeout: float = 30.0) -> list:
    """The records of a finished run. wandb's service process writes the file; a run that returned from
    `finish()` may still be flushing there (seen on a loaded machine), so wait for its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_runs(output_dir: Path) -> list[OfflineRun]:
    """Every offline run folder under `output_dir/wandb`, oldest first, parsed."""
    runs = []
    for folder in sorted((Path(output_dir) / "wandb").glob("offline-run-*")):
        [file] = folder.glob("run-*.wandb")
        parsed = OfflineRun(folder)
        for record in finished_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                parsed.run = record.run
            elif kind == "history":
                parsed.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "metric":
                parsed.metrics[record.metric.name] = record.metric
            elif kind == "artifact":
                parsed.artifacts.append(record.artifact)
        assert parsed.run is not None, f"{file} has no run record"
        runs.append(parsed)
    return runs
