"""Run several training jobs in one `torchrun` launch (one process group, many runs), writing
rank 0's results as JSON beside the job file. Used by test_train.py."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from memtool.train.config import TrainConfig
from memtool.train.loop import train


def main() -> None:
    jobs_path = Path(sys.argv[1])
    spec = json.loads(jobs_path.read_text())
    dist.init_process_group("gloo")
    results = []
    for index, job in enumerate(spec["jobs"]):
        config = TrainConfig.from_dict({**spec["base"], **job})
        result = train(
            config,
            Path(spec["output"]) / f"job-{index}",
            from_config=Path(spec["config_json"]),
            device="cpu",
            show_progress=False,
        )
        results.append(result.to_dict())
    if dist.get_rank() == 0:
        (jobs_path.parent / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
