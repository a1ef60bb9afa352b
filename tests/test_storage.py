"""jpeglm.storage: the local and S3 stores (against a live S3 server, tests/s3_server.py), their one-line errors,
the local cache of remote things, and generate/evaluate reading images from s3:// URLs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jpeglm.errors import UserError
from jpeglm.storage import (
    LocalStore,
    S3Options,
    S3Store,
    fetch_dir,
    fetch_inputs,
    litdata_storage_options,
    open_store,
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".png"})


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private JPEGLM_CACHE for the test."""
    monkeypatch.setenv("JPEGLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_server):
    if request.param == "local":
        return open_store(tmp_path / "store")
    return open_store(s3_server.bucket("ops") + f"/{request.node.name}", s3_server.options)


def test_store_operations(store, tmp_path):
    assert isinstance(store, LocalStore if store.url.startswith("/") else S3Store)
    assert store.list() == []
    assert not store.exists("a")
    store.write_text("a/one.json", '{"x": 1}')
    store.write_bytes("a/b/two.bin", b"\x00\x01")
    store.write_bytes("a.txt", b"top")  # a sibling that shares the prefix "a" but is not under "a/"
    (tmp_path / "local.bin").write_bytes(b"put")
    store.put_file(tmp_path / "local.bin", "c/three.bin")
    assert not (tmp_path / "local.bin").exists()  # consumed, as LocalStore's move does
    assert store.list() == ["a.txt", "a/b/two.bin", "a/one.json", "c/three.bin"]
    assert store.list("a") == ["a/b/two.bin", "a/one.json"]
    assert store.list("a/one.json") == ["a/one.json"]
    assert store.exists("a")
    assert store.exists("a/b")
    assert store.exists("a/one.json")
    assert not store.exists("a/on")
    assert store.read_text("a/one.json") == '{"x": 1}'
    assert store.read_bytes("a/b/two.bin") == b"\x00\x01"
    store.write_bytes("a/one.json", b"new")  # overwritten whole
    assert store.read_bytes("a/one.json") == b"new"
    store.get_file("c/three.bin", tmp_path / "got" / "three.bin")
    assert (tmp_path / "got" / "three.bin").read_bytes() == b"put"
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing")
    store.delete("a")
    assert store.list() == ["a.txt", "c/three.bin"]
    store.delete("nothing/here")
    assert store.child("c/three.bin") == f"{store.url}/c/three.bin"


def test_s3_list_follows_every_page(s3_server):
    store = open_store(s3_server.bucket("pages") + "/p", s3_server.options)
    store.page_size = 2  # five objects: three listing requests
    for i in range(5):
        store.write_bytes(f"many/{i}", b"x")
    assert store.list("many") == [f"many/{i}" for i in range(5)]
    store.delete("many")
    assert store.list() == []


def test_options_come_from_the_environment_and_recipes_win(s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    store = open_store(s3_server.bucket("env") + "/x")  # no options: the environment reaches the server
    store.write_bytes("k", b"v")
    assert store.read_bytes("k") == b"v"
    given = S3Options(endpoint_url="http://127.0.0.1:9", region="eu-west-3")
    assert given.resolved() == S3Options(
        "http://127.0.0.1:9", "eu-west-3", s3_server.access_key_id, s3_server.secret_access_key
    )
    assert litdata_storage_options(s3_server.options) == {
        "endpoint_url": s3_server.endpoint,
        "region_name": "us-east-1",
        "aws_access_key_id": s3_server.access_key_id,
        "aws_secret_access_key": s3_server.secret_access_key,
    }


def _one_line_error(call, *words: str) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def test_wrong_credentials_missing_bucket_and_unreachable_endpoint_are_one_line_errors(s3_server):
    s3_server.bucket("errs")
    wrong = S3Options(s3_server.endpoint, "us-east-1", s3_server.access_key_id, "not-the-secret")
    _one_line_error(
        lambda: open_store("s3://errs/p", wrong).list(), "s3://errs/p", "access denied", "AWS_ACCESS_KEY_ID"
    )
    _one_line_error(
        lambda: open_store("s3://errs/p", wrong).read_bytes("dataset.json"), "s3://errs/p/dataset.json", "access denied"
    )
    _one_line_error(
        lambda: open_store("s3://no-such-bucket/p", s3_server.options).read_bytes("k"),
        "s3://no-such-bucket/p/k",
        "bucket 'no-such-bucket' does not exist",
    )
    _one_line_error(lambda: open_store("s3://no-such-bucket/p", s3_server.options).list(), "does not exist")
    down = S3Options("http://127.0.0.1:9", "us-east-1", "k", "s")
    start = time.monotonic()
    _one_line_error(lambda: open_store("s3://b/p", down).list(), "s3://b/p", "cannot reach endpoint http://127.0.0.1:9")
    assert time.monotonic() - start < 15  # short retries: the error comes in seconds
    from jpeglm.shards import read_dataset

    _one_line_error(lambda: read_dataset("s3://errs/p", wrong), "s3://errs/p", "access denied")
    _one_line_error(lambda: read_dataset("s3://errs/none", s3_server.options), "s3://errs/none", "no dataset.json")


def test_fetch_dir_is_all_or_nothing(s3_server, tmp_path):
    store = open_store(s3_server.bucket("fetch") + "/d", s3_server.options)
    store.write_bytes("x/a", b"a")
    store.write_bytes("b", b"b")
    with pytest.raises(FileNotFoundError):
        fetch_dir(store, ["x/a", "gone"], tmp_path / "t")
    assert list(tmp_path.iterdir()) == []  # no target, no temporary directory left
    target = fetch_dir(store, ["x/a", "b"], tmp_path / "t", extra={"note.json": b"{}"})
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "b",
        "note.json",
        "x/a",
    ]
    store.write_bytes("b", b"changed")
    assert (fetch_dir(store, ["b"], target) / "b").read_bytes() == b"b"  # an existing target is used as it is


def test_fetch_inputs_brings_an_object_or_a_prefix(s3_server, photos, cache):
    url = s3_server.bucket("pics") + "/set"
    store = open_store(url, s3_server.options)
    for photo in photos[:2]:
        store.write_bytes(f"sub/{photo.name}", photo.read_bytes())
    store.write_bytes("notes.md", b"not an image")
    local = fetch_inputs(["/some/local/dir", url, f"{url}/sub/{photos[1].name}"], IMAGE_EXTENSIONS, s3_server.options)
    assert local[0] == "/some/local/dir"
    folder, single = Path(local[1]), Path(local[2])
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == sorted(p.name for p in photos[:2])
    assert single.read_bytes() == photos[1].read_bytes()
    assert cache in folder.parents
    store.delete(f"sub/{photos[0].name}")  # gone from the store: its old copy must not come back as an input
    downloading = folder / "sub" / f".{photos[1].name}.host.7.ab12cd34.tmp.5F3a9B2c"  # another process's, half-way
    downloading.write_bytes(b"partial")
    (again,) = fetch_inputs([url], IMAGE_EXTENSIONS, s3_server.options)
    assert sorted(p.name for p in Path(again).rglob("*") if p.is_file()) == [downloading.name, photos[1].name]
    with pytest.raises(UserError, match="s3://pics/nothing: no object there"):
        fetch_inputs([s3_server.bucket("pics") + "/nothing"], IMAGE_EXTENSIONS, s3_server.options)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny_run import fit_checkpoint

    return fit_checkpoint(tmp_path_factory.mktemp("ckpt"), steps=1)[2]


def test_generate_and_evaluate_read_images_from_s3(s3_server, checkpoint, photos, tmp_path, monkeypatch, cache):
    from jpeglm.evaluate import evaluate
    from jpeglm.generate import generate_samples

    for name, value in s3_server.env.items():  # the commands read the standard AWS environment
        monkeypatch.setenv(name, value)
    url = s3_server.bucket("prompts") + "/photos"
    store = open_store(url)
    for photo in photos[:2]:
        store.write_bytes(photo.name, photo.read_bytes())
    common = {"ratio": 0.5, "num_samples": 2, "max_new_tokens": 6, "constrain": False, "progress": False}
    records = generate_samples(str(checkpoint), str(tmp_path / "gen"), prompt_images=[url], **common)
    assert [Path(r["prompt"]).name for r in records] == [p.name for p in photos[:2]]  # the objects, in order
    assert all(cache in Path(r["prompt"]).parents for r in records)  # read from their local copies
    assert all((tmp_path / "gen" / r["file"]).is_file() for r in records)

    protocol = {"ratios": [0.5], "seeds": 1, "top_k": [40], "top_p": [1.0], "unconditional": False}
    protocol |= {"feature_extractor": "small", "max_new_tokens": 6, "constrain": False, "progress": False}
    (row,) = evaluate(str(checkpoint), [f"{url}/{photos[0].name}", url], str(tmp_path / "eval"), **protocol)
    assert row.images == 3  # the single object, then both under the prefix
