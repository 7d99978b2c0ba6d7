"""Runs the CLI with a fault injected at a chosen moment (used by test_resume.py).

    python crash_runner.py FAULT -- spp-extract arguments...

FAULT is one of:
  kill-in-commit:N    SIGKILL inside the N-th shard commit, after its data is written but
                      before the rename (N counts from 1)
  kill-after-commit:N SIGKILL right after the N-th shard commit
  kill-in-assemble    SIGKILL while the final view is written, before its rename
  kill-in-put:N       SIGKILL inside the N-th vector write
  enospc-in-put:N     the N-th vector write fails with ENOSPC (disk full)
  slow:SECONDS        every decode sleeps this long (to signal a run mid-way)
  slow-build:SECONDS  loading the model takes this much longer (a race with another run)
  slow-read:SECONDS   every block read from an spp-extract file sleeps this long first (merge,
                      reduce, neighbours), after touching $SPP_TEST_MARKER
  rank=N/FAULT        FAULT in torchrun rank N only
  none

With SPP_TEST_EXIT_DIR set, each process writes its exit status to that folder, in a file
named rank<RANK> (torchrun does not report the statuses of ranks it was told to stop).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

from spp_extract import images, shards, storage
from spp_extract.cli import main


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _count_then(n: int, action, original):  # noqa: ANN001, ANN202
    calls = [0]

    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls[0] += 1
        if calls[0] == n:
            return action(original, *args, **kwargs)
        return original(*args, **kwargs)

    return wrapped


def install(fault: str) -> None:
    name, _, arg = fault.partition(":")
    if name == "kill-in-commit":
        original_replace = os.replace

        def replace_then_maybe_kill(count=[0]):  # noqa: B006, ANN001, ANN202
            def replace(src, dst):  # noqa: ANN001, ANN202
                if str(src).endswith(".h5.tmp") and ".shards" in str(src):
                    count[0] += 1
                    if count[0] == int(arg):
                        _kill()
                return original_replace(src, dst)

            return replace

        os.replace = replace_then_maybe_kill()
    elif name == "kill-after-commit":

        def after(original, self):  # noqa: ANN001, ANN202
            result = original(self)
            _kill()
            return result

        shards.ShardWriter.commit = _count_then(int(arg), after, shards.ShardWriter.commit)
    elif name == "kill-in-assemble":
        original_finish = storage.finish_atomic

        def finish(tmp, path):  # noqa: ANN001, ANN202
            _kill()
            original_finish(tmp, path)

        storage.finish_atomic = finish
    elif name in ("kill-in-put", "enospc-in-put"):

        class _Full:
            def __setitem__(self, _key, _value):  # noqa: ANN001, ANN204
                raise OSError(errno.ENOSPC, "No space left on device")

        def fault_put(original, shard, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if name == "kill-in-put":
                _kill()
            real, shard._features = shard._features, _Full()
            try:
                return original(shard, *args, **kwargs)
            finally:
                shard._features = real

        shards.ShardWriter.put = _count_then(int(arg), fault_put, shards.ShardWriter.put)
    elif name == "slow":
        original_decode = images.decode

        def slow_decode(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            time.sleep(float(arg))
            return original_decode(*args, **kwargs)

        images.decode = slow_decode
    elif name == "slow-build":
        from spp_extract import pipeline

        original_build = pipeline.build_trunk

        def slow_build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            time.sleep(float(arg))
            return original_build(*args, **kwargs)

        pipeline.build_trunk = slow_build
    elif name == "slow-read":
        from spp_extract import outputs

        original_read = outputs.OutputFile.read

        def slow_read(self, start, stop):  # noqa: ANN001, ANN202
            if marker := os.environ.get("SPP_TEST_MARKER"):
                open(marker, "w").close()
            time.sleep(float(arg))
            return original_read(self, start, stop)

        outputs.OutputFile.read = slow_read
    elif name == "build-fails-on-rank":
        from spp_extract import ConfigError, pipeline

        original = pipeline.build_trunk

        def build_or_fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if os.environ.get("RANK") == arg:
                raise ConfigError("weights file 'w.pt' does not exist on this machine")
            return original(*args, **kwargs)

        pipeline.build_trunk = build_or_fail
    elif name != "none":
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault = sys.argv[1]
    if fault.startswith("rank="):  # rank=N/FAULT: only that torchrun rank gets the fault
        rank, _, fault = fault.removeprefix("rank=").partition("/")
        if os.environ.get("RANK", "0") != rank:
            fault = "none"
    assert sys.argv[2] == "--"
    sys.argv = ["spp-extract", *sys.argv[3:]]
    install(fault)
    try:
        main()
    except SystemExit as exc:  # click ends every run, good or bad, with sys.exit
        if exit_dir := os.environ.get("SPP_TEST_EXIT_DIR"):
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
            path = os.path.join(exit_dir, f"rank{os.environ.get('RANK', '0')}")
            with open(path, "w") as f:
                f.write(str(code))
        raise
