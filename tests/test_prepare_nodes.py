"""`jpeglm prepare` across nodes: each node writes its share of the parts into one output, the last one merges.

Nodes run one after the other here (in this process or a killed subprocess); tests/test_slurm.py runs the same
as a 2-task SLURM array (recipes/slurm/prepare.sbatch), the tasks at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_prepare import all_samples, small_photos, write_images

from jpeglm.errors import UserError
from jpeglm.prepare import node_share, prepare, summary
from jpeglm.shards import read_dataset

PART_SIZE = 4


@pytest.fixture(scope="module")
def corpus(photos, tmp_path_factory) -> Path:
    """40 small photos: 10 parts of 4, so each of 2 nodes writes 5."""
    root = tmp_path_factory.mktemp("nodes_corpus")
    write_images(root, small_photos(photos, 40, size=64))
    return root


@pytest.fixture(scope="module")
def one_node(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """The same job on one node, tokenizer trained here: what every multi-node run must equal."""
    out = tmp_path_factory.mktemp("one_node") / "data"
    report = prepare("jpeg", [corpus], out, val_fraction=0.2, num_workers=1, part_size=PART_SIZE, progress=False)
    return out, report


def run(corpus: Path, out: Path, node: int, num_nodes: int = 2) -> dict:
    kwargs = {"val_fraction": 0.2, "num_workers": 1, "part_size": PART_SIZE, "progress": False}
    return prepare("jpeg", [corpus], out, num_nodes=num_nodes, node_rank=node, **kwargs)


def test_two_nodes_write_what_one_node_writes(corpus, one_node, tmp_path):
    out = tmp_path / "data"
    first = run(corpus, out, node=1)  # trains the tokenizer and publishes it; node 0 then uses that one
    assert first["complete"] is False, first
    assert first["parts_missing"] == 5, first
    assert "node 1 of 2" in summary(first)
    assert "5 parts of other nodes to go" in summary(first)
    with pytest.raises(UserError, match="unfinished"):
        read_dataset(out)  # not a dataset until the last share is merged
    report = run(corpus, out, node=0)

    assert all_samples(out) == all_samples(one_node[0])  # same samples, same order, same tokenizer
    meta, alone = (json.loads((d / "dataset.json").read_text()) for d in (out, one_node[0]))
    assert meta.pop("version") != alone.pop("version")  # each writing of a dataset is a version of its own
    assert meta == alone
    assert (out / "tokenizer" / "tokenizer.json").read_text() == (
        one_node[0] / "tokenizer" / "tokenizer.json"
    ).read_text()
    assert not (out / ".prepare").exists()
    nodes = {n["node"]: n for n in report["nodes"]}
    assert sorted(nodes) == [0, 1]
    assert all(n["parts"] == 5 and n["num_nodes"] == 2 for n in nodes.values())
    assert sum(n["items_written"] for n in nodes.values()) == report["items_written"] == 40
    assert [n["items_processed_this_run"] for n in (nodes[0], nodes[1])] == [20, 20]
    assert json.loads((out / "prepare_report.json").read_text())["nodes"] == report["nodes"]
    assert run(corpus, out, node=1)["items_written"] == 40  # a finished dataset: any node's re-run does nothing


def kill_inside(key: str, corpus: Path, out: Path, node: int, num_nodes: int, at: str = "start") -> None:
    """Run node ``node``'s prepare in a subprocess that SIGKILLs itself as it starts writing ``key`` (a glob of
    output keys; ``at="start"``), or (``at="rename"``, ``key`` a glob of local paths) once the file's bytes are
    written under their temporary name, before the rename that puts them in place."""
    code = f"""
import fnmatch, os, signal, sys, types
import jpeglm.prepare as p, jpeglm.storage as storage
store_json = p._store_json
def dying(store, key, data):
    if {at!r} == "start" and fnmatch.fnmatch(key, {key!r}):
        os.kill(os.getpid(), signal.SIGKILL)
    store_json(store, key, data)
def replace(source, target):
    if {at!r} == "rename" and fnmatch.fnmatch(str(target), {key!r}):
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(source, target)
p._store_json = dying
storage.os = types.SimpleNamespace(**{{**vars(os), "replace": replace}})
p.prepare("jpeg", [{str(corpus)!r}], {str(out)!r}, val_fraction=0.2, num_workers=1, part_size={PART_SIZE},
          progress=False, num_nodes={num_nodes}, node_rank={node})
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def test_a_killed_node_redoes_only_its_share(corpus, one_node, tmp_path):
    out = tmp_path / "data"
    run(corpus, out, node=0)
    parts = out / ".prepare" / "parts"
    before = {p.name for p in parts.glob("part-*.json")}
    assert len(before) == 5
    kill_inside("*/part-000005.json", corpus, out, node=1, num_nodes=2)  # parts 1 and 3 written, 5 cut short
    assert {p.name for p in parts.glob("part-*.json")} == {*before, "part-000001.json", "part-000003.json"}
    report = run(corpus, out, node=1)

    assert all_samples(out) == all_samples(one_node[0])
    nodes = {n["node"]: n for n in report["nodes"]}
    assert nodes[0]["items_processed_this_run"] == 20  # node 0's run, not redone
    assert nodes[1]["items_processed_this_run"] == 12  # parts 5, 7 and 9 only
    assert report["items_processed_this_run"] == 32


def test_killed_during_the_final_merge_completes_on_rerun(corpus, one_node, tmp_path):
    out = tmp_path / "data"
    kill_inside("codec_spec.json", corpus, out, node=0, num_nodes=1)  # after the indexes and the report
    assert (out / "train" / "index.json").is_file()
    assert not (out / "dataset.json").exists()
    with pytest.raises(UserError, match="unfinished"):
        read_dataset(out)
    report = run(corpus, out, node=0, num_nodes=1)
    assert report["items_processed_this_run"] == 0  # every part was written: only the merge ran again
    assert all_samples(out) == all_samples(one_node[0])
    assert not (out / ".prepare").exists()


@pytest.mark.parametrize("target", ["*/.prepare/nodes/node-0000.json", "*/prepare_report.json"])
def test_a_file_killed_before_its_rename_leaves_nothing_a_rerun_trips_on(corpus, one_node, tmp_path, target):
    """The whole file under a temporary name, never renamed: a merge must not read it as a record, and the output
    check must not take it for a foreign file."""
    out = tmp_path / "data"
    kill_inside(target, corpus, out, node=0, num_nodes=1, at="rename")
    assert list(out.rglob(".*.tmp")), "the kill left no temporary file: the test tests nothing"
    report = run(corpus, out, node=0, num_nodes=1)
    assert report["items_written"] == 40
    assert [(n["node"], n["items_processed_this_run"]) for n in report["nodes"]] == [(0, 0)]  # the re-run's record
    assert all_samples(out) == all_samples(one_node[0])


def test_node_share_from_arguments_and_slurm(monkeypatch):
    for name in (
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_NTASKS",
        "SLURM_PROCID",
    ):
        monkeypatch.delenv(name, raising=False)
    assert node_share(None, None) == (0, 1)
    assert node_share(4, 3) == (3, 4)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert node_share(None, None) == (5, 8)
    assert node_share(1, None) == (0, 1)  # rank 5 of a training job preparing its own data alone
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")  # an array job wins over its single task's step
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    assert node_share(None, None) == (2, 3)
    assert node_share(1, 0) == (0, 1)  # given arguments win
    for bad in ((2, 2), (0, 0), (2, -1)):
        with pytest.raises(UserError, match="node_rank must be in"):
            node_share(*bad)


def test_a_part_directory_is_removed_only_when_its_writer_is_gone(tmp_path):
    from jpeglm.prepare import _claim_tmp

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = dead.stdout.strip(), os.getppid()
    dirs = {
        "locked": tmp_path / f"tmp-part-000003-{host}-{dead}-a1",  # its writer holds the lock (pid seen elsewhere)
        "unlocked, dead": tmp_path / f"tmp-part-000003-{host}-{dead}-a2",  # killed: lock free, process gone
        "no lock, dead": tmp_path / f"tmp-part-000003-{host}-{dead}-a3",
        "unlocked, live": tmp_path / f"tmp-part-000003-{host}-{live}-a4",  # may be about to lock it
        "another host": tmp_path / f"tmp-part-000003-{host}-ib-{dead}-a5",
        "another part": tmp_path / f"tmp-part-000004-{host}-{dead}-a6",
    }
    for directory in dirs.values():
        directory.mkdir()
    for name in ("locked", "unlocked, dead", "unlocked, live", "another host", "another part"):
        (dirs[name] / ".lock").touch()
    with open(dirs["locked"] / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        mine, lock = _claim_tmp(tmp_path, 3)
        again, second = _claim_tmp(tmp_path, 3)  # this process again, the first still open: no wait, no clash
    assert {name for name, d in dirs.items() if d.exists()} == {
        "locked",
        "unlocked, live",
        "another host",
        "another part",
    }
    assert mine.name.startswith(f"tmp-part-000003-{host}-{os.getpid()}-")
    assert again != mine
    assert mine.is_dir()
    assert again.is_dir()
    lock.close()
    second.close()
