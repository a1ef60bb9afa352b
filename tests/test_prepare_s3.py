"""`jpeglm prepare --output s3://bucket/prefix` against a real S3-compatible server (tests/s3_server.py).

The server (``rclone serve s3``) keeps each bucket as a directory under ``s3_server.root``, so what prepare
uploaded can be read back as a local dataset and compared with a local prepare of the same inputs.
"""

from __future__ import annotations

import pytest
from test_prepare import all_samples, small_photos, write_images
from test_prepare_nodes import kill_inside

from jpeglm.errors import UserError
from jpeglm.prepare import prepare
from jpeglm.shards import read_dataset
from jpeglm.storage import open_store

PART_SIZE = 4
ARGS = {"val_fraction": 0.2, "num_workers": 1, "part_size": PART_SIZE, "progress": False}


@pytest.fixture(scope="module")
def corpus(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3_corpus")
    write_images(root, small_photos(photos, 16, size=64))
    return root


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("s3_local") / "data"
    prepare("jpeg", [corpus], out, **ARGS)
    return out


@pytest.fixture
def aws(s3_server, monkeypatch, tmp_path):
    """The AWS environment of the test server, and a fresh work-area cache."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JPEGLM_CACHE", str(tmp_path / "cache"))
    return s3_server


def objects(server, bucket: str, prefix: str) -> list[str]:
    root = server.root / bucket / prefix
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_prepare_to_s3_writes_what_a_local_prepare_writes(aws, corpus, local):
    url = aws.bucket("out") + "/jpeg"
    report = prepare("jpeg", [corpus], url, **ARGS)
    assert report["output"] == url
    assert report["items_written"] == 16
    uploaded = aws.root / "out" / "jpeg"
    assert all_samples(uploaded) == all_samples(local)
    keys = objects(aws, "out", "jpeg")
    assert not [k for k in keys if k.startswith(".prepare/")]  # the work area is gone once complete
    indexed = {f"{split}/{c['filename']}" for split in ("train", "val") for c in _index(uploaded, split)}
    assert {k for k in keys if "/chunk-" in k} == indexed  # every chunk uploaded is indexed, once
    remote = read_dataset(url)  # and it reads back through S3 as a dataset
    assert remote.splits == read_dataset(local).splits
    assert prepare("jpeg", [corpus], url, **ARGS)["items_written"] == 16  # done: a re-run changes nothing


def _index(dataset, split: str) -> list[dict]:
    import json

    path = dataset / split / "index.json"
    return json.loads(path.read_text())["chunks"] if path.is_file() else []


def test_killed_upload_resumes_with_no_duplicate_and_no_gap(aws, corpus, local):
    url = aws.bucket("killed") + "/jpeg"
    kill_inside("*/part-000002.json", corpus, url, node=0, num_nodes=1)  # parts 0 and 1 uploaded
    keys = objects(aws, "killed", "jpeg")
    assert ".prepare/parts/part-000001.json" in keys
    assert "dataset.json" not in keys  # not a dataset until the merge ends
    with pytest.raises(UserError, match="not a complete prepared dataset"):
        read_dataset(url)
    report = prepare("jpeg", [corpus], url, **ARGS)
    assert report["items_processed_this_run"] == 8  # parts 2 and 3 only
    assert all_samples(aws.root / "killed" / "jpeg") == all_samples(local)


def test_a_prefix_holding_something_else_is_refused(aws, corpus):
    url = aws.bucket("taken") + "/jpeg"
    prepare("jpeg", [corpus], url, **ARGS)
    with pytest.raises(UserError, match=f"{url} already holds a different prepared dataset"):
        prepare("jpeg", [corpus], url, **{**ARGS, "val_fraction": 0.5})
    open_store("s3://taken/other").write_text("notes.txt", "not a dataset")
    with pytest.raises(UserError, match="s3://taken/other holds other files"):
        prepare("jpeg", [corpus], "s3://taken/other", **ARGS)


def test_wrong_credentials_name_the_url(aws, corpus, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")
    url = aws.bucket("denied") + "/jpeg"
    with pytest.raises(UserError) as error:
        prepare("jpeg", [corpus], url, **ARGS)
    message = str(error.value)
    assert url in message
    assert "\n" not in message
