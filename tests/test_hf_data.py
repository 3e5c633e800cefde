"""Training data in Hugging Face formats (datasets folders, the datasets cache by name, parquet, .json,
.jsonl.gz), read with the real ``datasets`` / ``pyarrow``, and ``--report-to tensorboard``."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2lab.training import DataError, prepare_data

ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"document number {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(12)]


def _tokens(paths, tmp_path: Path, tokenizer, name: str, **kw) -> np.ndarray:
    data = prepare_data(paths, tmp_path / f"cache-{name}", tokenizer=tokenizer, val_share=0.0, progress=False,
                        log=lambda m: None, **kw)
    return np.asarray(data.train)


@pytest.fixture()
def reference(tmp_path, tokenizer) -> np.ndarray:
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return _tokens([path], tmp_path, tokenizer, "ref")


def test_datasets_folder_and_dataset_dict(tmp_path, tokenizer, reference):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert np.array_equal(_tokens([tmp_path / "ds"], tmp_path, tokenizer, "ds"), reference)
    DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    assert np.array_equal(_tokens([tmp_path / "dd"], tmp_path, tokenizer, "dd"), reference)
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, id\); choose it with --text-field"):
        _tokens([tmp_path / "ds"], tmp_path, tokenizer, "bad", text_field="body")


def test_parquet_json_and_gzip(tmp_path, tokenizer, reference):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet", row_group_size=5)
    assert np.array_equal(_tokens([tmp_path / "d.parquet"], tmp_path, tokenizer, "pq"), reference)
    (tmp_path / "arr.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    assert np.array_equal(_tokens([tmp_path / "arr.json"], tmp_path, tokenizer, "json"), reference)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in DOCS)
    assert np.array_equal(_tokens([tmp_path / "d.jsonl.gz"], tmp_path, tokenizer, "gz"), reference)
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(tmp_path / "d.parquet", folder / "a.parquet")
    shutil.copy(tmp_path / "d.jsonl.gz", folder / "b.jsonl.gz")
    assert np.array_equal(_tokens([folder], tmp_path, tokenizer, "folder"), np.concatenate([reference, reference]))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: cannot read"):
        _tokens([tmp_path / "bad.jsonl.gz"], tmp_path, tokenizer, "badgz")


def _cache_dataset(cache: Path, repo_id: str, source: Path) -> None:
    """What ``load_dataset(repo_id)`` leaves in the datasets cache, made by datasets' own Json builder."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    builder = Json(cache_dir=str(cache), data_files={"train": str(source)}, dataset_name=name, hash="0" * 16,
                   config_id="default")
    builder.download_and_prepare()
    shutil.move(cache / name, cache / f"{namespace}___{name}")
    assert datasets.config.HF_DATASETS_OFFLINE or os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.slow
def test_dataset_by_name_from_the_offline_cache(tmp_path, tokenizer, reference):
    """``gpt2lab finetune someone/tiny-corpus`` with HF_HUB_OFFLINE=1 reads the locally cached dataset."""
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    home = tmp_path / "hf"
    _cache_dataset(home / "datasets", "someone/tiny-corpus", src)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", HF_HOME=str(home),
               TOKENIZERS_PARALLELISM="false")
    code = ("import numpy as np, sys; from gpt2lab.tokenizer import Tokenizer; "
            "from gpt2lab.training import prepare_data; "
            "d = prepare_data(['someone/tiny-corpus'], sys.argv[1], tokenizer=Tokenizer.gpt2(), val_share=0.0, "
            "progress=False, log=lambda m: None); np.save(sys.argv[2], np.asarray(d.train))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c"), str(tmp_path / "t.npy")], env=env, check=True,
                   timeout=300)
    assert np.array_equal(np.load(tmp_path / "t.npy"), reference)
    proc = subprocess.run([sys.executable, "-m", "gpt2lab", "train", "someone/not-cached", "--config",
                           "n_layer=1,n_head=1,n_embd=8,n_positions=16", "--out", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "someone/not-cached: no such file or folder, and no dataset of that name in the local Hugging Face " \
           "datasets cache" in proc.stderr


@pytest.mark.slow
def test_report_to_tensorboard(tmp_path):
    from datasets import Dataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gpt2lab.training import TrainConfig, train

    Dataset.from_dict({"text": DOCS * 4}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    train(TrainConfig(data=[str(tmp_path / "ds")], out=str(out), config="n_layer=1,n_head=2,n_embd=16,n_positions=32",
                      max_steps=4, batch_size=2, log_every=1, eval_every=2, val_share=0.2, progress=False,
                      plot=False, report_to="tensorboard"))
    runs = out / "runs"
    assert list(runs.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(runs))
    events.Reload()
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/perplexity"} <= set(events.Tags()["scalars"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == \
        [(s, round(v, 5)) for s, v in losses]
    # the model card of the published folder says what was done
    card = (out / "README.md").read_text()
    assert "Trained from scratch" in card and "final validation perplexity" in card and "`ds`" in card
    with pytest.raises(ValueError, match="--report-to must be one of tensorboard or none, got wandb"):
        TrainConfig(data=["x"], out="o", config="gpt2-tiny", report_to="wandb").validate()
