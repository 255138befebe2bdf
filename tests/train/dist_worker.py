"""Run several training jobs in one `torchrun` launch (one process group, many runs), writing
rank 0's results as JSON beside the job file. Used by test_train.py.

A job may name a checkpoint to `"resume"` from. A spec with `"die": {"rank": R, "step": S}`
kills rank R right after step S instead (a crashed rank); the survivors write the error they
raised to `error-RANK.txt`.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from memtool.errors import MemtoolError
from memtool.train.activations import ActivationConfig
from memtool.train.config import TrainConfig
from memtool.train.loop import train


def main() -> None:
    jobs_path = Path(sys.argv[1])
    spec = json.loads(jobs_path.read_text())
    dist.init_process_group("gloo")
    die = spec.get("die")
    rank = dist.get_rank()

    def on_step(step: int, loss: float) -> None:
        if die and rank == die["rank"] and step == die["step"]:
            os._exit(3)

    results = []
    for index, job in enumerate(spec["jobs"]):
        job = dict(job)
        activations = job.pop("activations", None)
        resume = job.pop("resume", None)
        config = TrainConfig.from_dict({**spec["base"], **job})
        try:
            result = train(
                config,
                Path(spec["output"]) / f"job-{index}",
                from_config=Path(spec["config_json"]),
                device="cpu",
                show_progress=False,
                on_step=on_step,
                resume=Path(resume) if resume else None,
                activations=ActivationConfig(**activations) if activations else None,
            )
        except MemtoolError as exc:
            (jobs_path.parent / f"error-{rank}.txt").write_text(str(exc))
            sys.exit(2)
        results.append(result.to_dict())
    if dist.get_rank() == 0:
        (jobs_path.parent / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
