"""An offline W&B search holds the metrics, the choice probabilities and the exported architecture."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.helpers import TINY_SEARCH, run_app

BLOCK = 32768


def read_wandb_records(path: Path):
    """Records of a W&B run file (``run-*.wandb``: LevelDB-log framing of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B run file"
    pos, chunks, records = 7, [], []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record complete
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            records.append(rec)
            chunks = []
    return records


@pytest.mark.slow
def test_offline_wandb_run_has_metrics_probs_and_architecture_artifact(tmp_path, smoke_search, shared_cache,
                                                                       monkeypatch):
    run_dir = tmp_path / "search"
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(run_dir / "wandb-files"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = run_app("nas.apps.search", *TINY_SEARCH, "logger=wandb", "run_name=wb_test", f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.describe()
    files = list(run_dir.rglob("run-*.wandb"))
    assert len(files) == 1, list(run_dir.rglob("*"))
    records = read_wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    history_keys = {item.key or "/".join(item.nested_key) for r in records if r.HasField("history")
                    for item in r.history.item}
    assert "train/loss_epoch" in history_keys and "val/acc" in history_keys
    # a table and an image are logged as nested keys (their type and file)
    assert any(k.startswith("arch/choice_probs/") for k in history_keys), history_keys
    assert any(k.startswith("arch/choice_probs_heatmap") for k in history_keys), history_keys
    runs = [r.run for r in records if r.HasField("run")]
    assert runs and runs[0].run_group == "wb_test" and runs[0].job_type == "search"
    arts = [r.artifact for r in records if r.HasField("artifact")]
    arch_arts = [a for a in arts if a.type == "architecture"]
    assert len(arch_arts) == 1, kinds
    import json

    meta = json.loads(arch_arts[0].metadata)
    assert meta["space"] == "mbv2_tiny" and meta["latency_ms_predicted"] > 0 and 0 <= meta["val_acc"] <= 1
    paths = {e.path for e in arch_arts[0].manifest.contents}
    assert {"arch.yaml", "model.safetensors", "report.json"} <= paths
    # nothing outside the run folder
    assert not (Path.cwd() / "wandb").exists() or (Path.cwd() / "wandb").stat().st_mtime < files[0].stat().st_mtime - 3600
