"""The demo's GRPO run on two processes (torchrun, DDP with gloo on CPU), twice: without and with
`EntropyProbeCallback` (every step, with the forecast, saving its samples). For tests/test_callback.py:

    python -m torch.distributed.run --nproc_per_node=2 tests/callback_ddp.py OUT RUN_JSON

OUT/plain/run and OUT/probed/run hold the trainer's checkpoints (rank 0 saves them); OUT/rankR/ holds each
process's prompts, base model (rank 0's is the adapters' base) and the callback's logged history (history.json).
Every process builds the same warm base (`demo.warm_base` is deterministic), so no file is shared before training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(out: Path, run: dict) -> None:
    from entropy_probe.demo import _quiet_libraries, save_base, train_grpo, warm_base
    from entropy_probe.files import write_text
    from entropy_probe.integrations.trl import EntropyProbeCallback
    from entropy_probe.params import DemoParams, Params

    _quiet_libraries()
    rank = int(os.environ["RANK"])
    own, demo = out / f"rank{rank}", DemoParams(**run)
    params = Params()
    params.batch_config.dataset_name = str(own / "prompts.jsonl")
    params.batch_config.B_E, params.batch_config.B_U = 32, 4
    callbacks = []

    def attach(trainer):
        callbacks.append(EntropyProbeCallback(trainer, 1, params, save_dir=out / "probe", seed=7, forecast_draws=4))
        trainer.add_callback(callbacks[0])

    for name, on_trainer in (("plain", None), ("probed", attach)):
        records, tokenizer, model, _ = warm_base(demo)
        if on_trainer is None:
            write_text(own / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            save_base(model, tokenizer, own / "base")
        train_grpo(model, tokenizer, records, demo, out / name / "run", str(out / "rank0" / "base"), on_trainer)
    write_text(own / "history.json", json.dumps(callbacks[0].history))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
