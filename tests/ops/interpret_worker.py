"""Child process for kernel tests: runs ops under the Triton interpreter (see conftest.py).

Usage: python interpret_worker.py JOBS.pt RESULTS.pt
"""

import os
import sys

# Before anything imports triton: triton reads this once, at its own import.
os.environ["TRITON_INTERPRET"] = "1"

import torch

from memtool.errors import MemtoolError
from memtool.ops import backend_used, bitstack_linear, gptq_linear

OPS = {"gptq_linear": gptq_linear, "bitstack_linear": bitstack_linear}


def main(jobs_path: str, results_path: str) -> None:
    results = []
    for job in torch.load(jobs_path):
        kwargs = job["kwargs"]
        op = OPS[job.get("op", "gptq_linear")]
        try:
            chosen = backend_used(kwargs["x"].device, job["backend"], kwargs["x"].dtype)
            out = op(**kwargs, backend=job["backend"])
        except MemtoolError as error:
            results.append({"error": str(error)})
        else:
            results.append({"out": out, "backend": chosen.value})
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
