"""producer.export on a run written as the executor writes it (local folder, real Redis), each
export loaded with its real reader: pyarrow and pandas, datasets (parquet, imagefolder) and
webdataset. The same exports from a real worker run on S3: tests/integration/test_manifest_export.py."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

pytest.importorskip("pyarrow")
pytest.importorskip("PIL")

import pyarrow.parquet as pq  # noqa: E402

from producer.errors import ExportError  # noqa: E402
from producer.export import (  # noqa: E402
    DONE_FILE,
    FORMATS,
    IMAGEFOLDER_COLUMNS,
    RECORD_FILE,
    export,
    hf_features,
    imagefolder_record,
    parquet_schema,
)
from producer.export_target import resolve_target  # noqa: E402
from producer.state import RunStore  # noqa: E402
from producer.storage import LocalStorage  # noqa: E402
from tests.manifest_helpers import make_jobs, store_outputs  # noqa: E402

RUN = "export-run"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def written(redis_server: str, tmp_path_factory):
    url = f"{redis_server}/3"
    redis.Redis.from_url(url).flushdb()
    store = RunStore.from_url(url)
    storage = LocalStorage(tmp_path_factory.mktemp("export") / "out")
    jobs = make_jobs(RUN, 7)
    store_outputs(storage, store, jobs, part_rows=3)
    yield SimpleNamespace(store=store, storage=storage, jobs=jobs)
    store.close()


def run_export(written, fmt: str, to: Path, **options) -> object:
    target = resolve_target(to, fmt, run_id=RUN, storage=written.storage, prefix="", endpoint_url=None)
    return export(written.store, written.storage, "", RUN, fmt, target, threads=3, **options)


# --- pure parts ------------------------------------------------------------------------------


def test_features_metadata_is_what_datasets_reads() -> None:
    datasets = pytest.importorskip("datasets")
    schema = parquet_schema()
    assert json.loads(schema.metadata[b"huggingface"]) == hf_features(schema)
    features = datasets.Features.from_arrow_schema(schema)
    assert isinstance(features["image"], datasets.Image)
    assert features["prompt"] == datasets.Value("string") and features["seed"] == datasets.Value("int64")
    assert features["width"] == datasets.Value("int32") and features["deepcache"] == datasets.Value("bool")
    ours = hf_features(schema)["info"]["features"]
    theirs = datasets.Features({name: features[name] for name in ours}).to_dict()
    assert {name: value["_type"] for name, value in theirs.items()} == {n: v["_type"] for n, v in ours.items()}


def test_imagefolder_record_never_null() -> None:
    row = {
        "job_id": "00000001-0123456789ab",
        "index": 1,
        "prompt": "p",
        "negative_prompt": None,
        "seed": 3,
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance": 7,
        "scheduler": "ddim",
        "format": "png",
        "model_id": "m",
        "deepcache": False,
        "cache_interval": 1,
        "cache_branch": None,
        "batch_id": "b",
        "batch_size": 1,
        "key": "r/images/00000001-0123456789ab.png",
    }
    record = imagefolder_record(row, "00000001-0123456789ab.png")
    assert tuple(record) == IMAGEFOLDER_COLUMNS and None not in record.values()
    assert (record["negative_prompt"], record["cache_branch"], record["guidance"]) == ("", 0, 7.0)
    assert (record["template"], record["variables"]) == ("", "{}")
    assert isinstance(record["guidance"], float)
    templated = imagefolder_record({**row, "template": "a {b|c}", "variables": '{"v1":"b"}'}, "x.png")
    assert (templated["template"], templated["variables"]) == ("a {b|c}", '{"v1":"b"}')


def test_targets(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    beside = resolve_target(None, "parquet", run_id=RUN, storage=storage, prefix="p", endpoint_url=None)
    assert (beside.storage, beside.prefix) == (storage, f"p/{RUN}/exports/parquet")
    folder = resolve_target(tmp_path / "x", "parquet", run_id=RUN, storage=storage, prefix="", endpoint_url=None)
    assert folder.url == str(tmp_path / "x")
    for bad in ("s3://", "gs://bucket/x"):
        with pytest.raises(ExportError, match="--to"):
            resolve_target(bad, "parquet", run_id=RUN, storage=storage, prefix="", endpoint_url=None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        resolve_target(tmp_path / "file", "parquet", run_id=RUN, storage=storage, prefix="", endpoint_url=None)


# --- the exports, read back ------------------------------------------------------------------


def test_parquet_export_reads_with_pyarrow_pandas_and_datasets(written, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    result = run_export(written, "parquet", tmp_path / "pq", shard_size=3)
    files = sorted((tmp_path / "pq").glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert (result.rows, result.shards) == (7, 3)
    frame = pq.ParquetDataset([str(f) for f in files]).read().to_pandas()
    assert list(frame["job_id"]) == [job.job_id for job in written.jobs]
    assert list(frame["prompt"]) == [job.prompt for job in written.jobs]
    assert frame["image"][0]["bytes"].startswith(b"\x89PNG") and frame["image"][0]["path"].endswith(".png")
    loaded = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", cache_dir=str(tmp_path / "hf")
    )
    assert isinstance(loaded.features["image"], datasets.Image) and len(loaded) == 7
    for record, job in zip(loaded, written.jobs, strict=True):
        assert record["image"].size == (job.width, job.height)
        assert (record["prompt"], record["seed"], record["steps"]) == (job.prompt, job.seed, job.steps)
        assert record["negative_prompt"] == job.negative_prompt


def test_imagefolder_export_loads_with_recipe_columns(written, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    run_export(written, "imagefolder", tmp_path / "if", shard_size=3)
    folders = sorted(p.name for p in (tmp_path / "if").iterdir() if p.is_dir())
    assert folders == ["00000", "00001", "00002"] and (tmp_path / "if" / RECORD_FILE).is_file()
    assert all((tmp_path / "if" / folder / "metadata.jsonl").is_file() for folder in folders)
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "if"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert set(IMAGEFOLDER_COLUMNS) - {"file_name"} | {"image"} == set(loaded.column_names)
    assert len(loaded) == 7
    by_id = {job.job_id: job for job in written.jobs}
    for record in loaded:
        job = by_id[record["job_id"]]
        assert record["image"].size == (job.width, job.height) == (record["width"], record["height"])
        assert (record["prompt"], record["seed"], record["steps"], record["guidance"]) == (
            job.prompt,
            job.seed,
            job.steps,
            job.guidance,
        )
        assert record["negative_prompt"] == (job.negative_prompt or "")
        assert record["cache_interval"] == (job.cache_interval or 3) and record["scheduler"] == "ddim"
        assert record["deepcache"] is (record["cache_interval"] > 1)


def test_webdataset_export_reads_with_webdataset(written, tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    run_export(written, "webdataset", tmp_path / "wds", shard_size=4)
    names = sorted(p.name for p in (tmp_path / "wds").iterdir() if p.name != RECORD_FILE)
    assert names == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "00001.parquet",
        "00001.tar",
        "00001_stats.json",
    ]
    with tarfile.open(tmp_path / "wds" / "00000.tar") as tar:
        first = tar.getnames()[:3]
    job = written.jobs[0]
    assert first == [f"{job.job_id}.png", f"{job.job_id}.json", f"{job.job_id}.txt"]
    urls = [str(tmp_path / "wds" / f"{shard:05d}.tar") for shard in range(2)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "json", "txt"))
    assert [key for key, *_ in samples] == [job.job_id for job in written.jobs]
    for (_, image, meta, text), job in zip(samples, written.jobs, strict=True):
        assert image.size == (job.width, job.height)
        assert text == job.prompt == meta["prompt"] and meta["seed"] == job.seed and "sidecar" not in meta
    shard = pq.read_table(tmp_path / "wds" / "00001.parquet").to_pandas()
    assert list(shard["job_id"]) == [job.job_id for job in written.jobs[4:]]
    stats = json.loads((tmp_path / "wds" / "00001_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 3


def test_a_webdataset_shard_reads_as_img2dataset_users_read_theirs(written, tmp_path: Path) -> None:
    """img2dataset's layout: the parquet's ``key`` is the tar's sample key (join on it), ``status``
    says success, ``caption`` is the text, and each sample's ``.json`` is its row; the image's
    object key is ``image_key``."""
    wds = pytest.importorskip("webdataset")
    pd = pytest.importorskip("pandas")
    run_export(written, "webdataset", tmp_path / "wds", shard_size=4)
    rows = pq.read_table(tmp_path / "wds" / "00000.parquet").to_pandas()
    assert list(rows.columns[:4]) == ["key", "status", "error_message", "caption"] and "image_key" in rows
    ok = rows[rows["status"] == "success"].set_index("key")
    samples = wds.WebDataset(str(tmp_path / "wds" / "00000.tar"), shardshuffle=False).decode("pil")
    joined = [(sample, ok.loc[sample["__key__"]]) for sample in samples]
    assert len(joined) == len(ok) == 4
    for sample, row in joined:
        assert sample["txt"] == row["caption"] == row["prompt"] and sample["png"].size == (row["width"], row["height"])
        assert sample["json"]["key"] == sample["__key__"] and sample["json"]["status"] == "success"
        assert row["image_key"].endswith(f"{sample['__key__']}.png") and pd.isna(row["error_message"])


def test_a_target_in_use_is_refused_unless_overwrite(written, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "old.txt").write_text("keep")
    with pytest.raises(ExportError, match="not empty"):
        run_export(written, "webdataset", tmp_path / "t")
    assert (tmp_path / "t" / "old.txt").exists()
    result = run_export(written, "webdataset", tmp_path / "t", overwrite=True)
    assert result.shards == 1 and sorted(p.name for p in (tmp_path / "t").iterdir())[0] == "00000.parquet"
    assert not (tmp_path / "t" / "old.txt").exists()
    with pytest.raises(ExportError, match="format"):
        run_export(written, "tfrecord", tmp_path / "u")
    with pytest.raises(ExportError, match="shard size"):
        run_export(written, "parquet", tmp_path / "u", shard_size=0)


def test_cli_help_needs_no_export_extra() -> None:
    """``deepqueue export --help`` and the formats it offers, without pyarrow (or torch, boto3)."""
    code = (
        "import sys\n"
        "for name in ('pyarrow', 'torch', 'boto3'): sys.modules[name] = None\n"
        "from click.testing import CliRunner\n"
        "import producer.cli as cli, producer.cli_outputs as outputs\n"
        "for args in (['export', '--help'], ['manifest', '--help']):\n"
        "    result = CliRunner().invoke(cli.cli, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "print(','.join(outputs.EXPORT_FORMATS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert tuple(out.stdout.strip().split(",")) == FORMATS


def test_the_readme_loading_example_runs(written, tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("webdataset")
    readme = (REPO / "README.md").read_text()
    code = readme.split("### Manifest, stats and exports", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    for fmt, name in (("parquet", "pq"), ("imagefolder", "if"), ("webdataset", "wds")):
        run_export(written, fmt, tmp_path / "export" / name, shard_size=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["frame"]) == len(scope["pq_ds"]) == len(scope["if_ds"]) == 7
    assert scope["prompt"] == written.jobs[-1].prompt  # the loop's last sample


class KilledAt(BaseException):
    """The export's process dying (a BaseException, like the KeyboardInterrupt or SystemExit of a kill)."""


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_killed_half_way_resumes_at_its_last_complete_shard(written, tmp_path: Path, fmt: str) -> None:
    """The kill is injected where a shard's file is published (a test of where it stops, not of
    signals): the third shard dies between its files, or before its last one. The resumed export
    keeps the two complete shards, writes the rest again, and ends as an export in one go does."""
    folder, whole = tmp_path / "resumed", tmp_path / "whole"
    target = resolve_target(folder, fmt, run_id=RUN, storage=written.storage, prefix="", endpoint_url=None)
    publish, dying = target.put_file, DONE_FILE[fmt].format(shard=2)

    def put_file(name: str, path: Path, content_type: str) -> None:
        if name == dying or (fmt == "webdataset" and name == "00002.parquet"):
            raise KilledAt(name)
        publish(name, path, content_type)

    target.put_file = put_file  # type: ignore[method-assign]
    with pytest.raises(KilledAt):
        export(written.store, written.storage, "", RUN, fmt, target, shard_size=2, threads=2)
    with pytest.raises(ExportError, match="not empty"):
        run_export(written, fmt, folder, shard_size=2)
    with pytest.raises(ExportError, match="no unfinished export"):
        run_export(written, fmt, folder, shard_size=3, resume=True)  # another export: not mixed in
    resumed = run_export(written, fmt, folder, shard_size=2, resume=True)
    assert (resumed.kept_shards, resumed.shards, resumed.rows) == (2, 4, 3)  # 7 images: 2 + 2 | 2 + 1
    run_export(written, fmt, whole, shard_size=2)
    files = {path.relative_to(folder) for path in folder.rglob("*") if path.is_file()}
    assert files == {path.relative_to(whole) for path in whole.rglob("*") if path.is_file()}
    assert not [path for path in folder.rglob(".part-*")]  # no half-written file left visible
    assert run_export(written, fmt, folder, shard_size=2, resume=True).rows == 0  # finished: nothing to do
