"""``python tests/kill_in_write.py N fit ARGS...``: ``jpeglm fit ARGS`` killed inside its N-th checkpoint write, as
``kill -9``, a time limit or a lost node can stop a run, then ``jpeglm fit ARGS --ckpt_path last``.

The killed fit runs in a child forked before anything ran (the imports, the slow part on 2 CPU cores, are paid
once); it SIGKILLs itself inside the write. This process then prints ``killed inside checkpoint write N`` and
runs the resuming fit itself (with ``MASTER_PORT`` set to ``RESUME_PORT`` when that is given: the killed ranks'
port may still be held). Start one such process per rank.

Lightning's writers are replaced in this process only (test code: Lightning-private names are allowed here):

* a single file (``TorchCheckpointIO`` -> ``_atomic_save``): the N-th write puts the first half of the file's
  bytes at the path it was given, then kills the process;
* an FSDP2 sharded directory (``ModelParallelStrategy`` -> ``_distributed_checkpoint_save``): the N-th write
  writes every rank's shards and the DCP metadata, then kills each rank before Lightning writes ``meta.pt``
  (the loop state). Every rank counts its own writes, so all ranks die in the same checkpoint.

Earlier writes run unchanged. Whatever ``jpeglm fit`` does with the path (write it in place, or somewhere
temporary and rename it) decides what the half-written checkpoint can break.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import lightning.fabric.plugins.io.torch_io as torch_io
import lightning.pytorch.strategies.model_parallel as model_parallel
import torch

from jpeglm.cli import main


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(kill_at: int) -> None:
    """Replace Lightning's two checkpoint writers with ones that kill the process in write ``kill_at`` (from 1)."""
    calls = {"file": 0, "shards": 0}
    write_file, write_shards = torch_io._atomic_save, model_parallel._distributed_checkpoint_save

    def file_write(checkpoint: dict, path) -> None:
        calls["file"] += 1
        if calls["file"] < kill_at:
            return write_file(checkpoint, path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        die()

    def shards_write(state: dict, path) -> None:
        calls["shards"] += 1
        write_shards(state, path)
        if calls["shards"] >= kill_at:
            die()

    torch_io._atomic_save = file_write
    model_parallel._distributed_checkpoint_save = shards_write


def kill_then_resume(kill_at: int, args: list[str]) -> int:
    """Fork a child that runs ``jpeglm ARGS`` and dies in write ``kill_at``; then resume it here (exit code)."""
    child = os.fork()
    if child == 0:
        install(kill_at)
        code = main(args)
        print(f"the fit ended (exit code {code}) before checkpoint write {kill_at}", flush=True)
        os._exit(3)
    _, status = os.waitpid(child, 0)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        print(f"the killed fit exited with status {status}", flush=True)
        return 3
    print(f"killed inside checkpoint write {kill_at}", flush=True)
    if "RESUME_PORT" in os.environ:
        os.environ["MASTER_PORT"] = os.environ["RESUME_PORT"]
    return main([*args, "--ckpt_path", "last"])


if __name__ == "__main__":
    sys.exit(kill_then_resume(int(sys.argv[1]), sys.argv[2:]))
