"""Several `entropy-probe` stage runs in one torchrun (tests/test_distributed.py), so each rank starts the
interpreter and imports the libraries once for all of them (the imports, not the stages, are most of a tiny run).

    python -m torch.distributed.run --nproc_per_node=N -m torchrun_stages '[["sample-e", "--out", ...], ...]'

The process group is the library's own, `distributed.process_group` (init; at the end barrier, then destroy),
entered here once around the runs: each stage's command finds it up and uses it as it is (a group cannot be
initialised twice in one process). Each run is the console script's command (`stages.cli.app`) with those
arguments; the first that exits non-zero ends the process with its code. A run ["--call", "module:function", ARGS]
calls a function of a test module with ARGS instead (the in-memory API under the same process group).
"""

from __future__ import annotations

import importlib
import json
import sys

from entropy_probe import distributed
from stages.cli import app


def main(runs: list[list[str]]) -> None:
    with distributed.process_group("cpu"):
        for args in runs:
            if args[0] == "--call":  # ["--call", "module:function", *arguments]: a test's own code on every rank
                module, function = args[1].split(":")
                getattr(importlib.import_module(module), function)(*args[2:])
                continue
            code = app(args, prog_name="entropy-probe", standalone_mode=False)
            if code:
                sys.exit(code)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
