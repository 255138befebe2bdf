"""The trainer against plain single-process AdamW: same loss curve for every ZeRO stage, with and
without optimizer offload, in one process and in two (gloo); exact resume; the export loads."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from memtool.errors import MemtoolError
from memtool.train import loop
from memtool.train.activations import ActivationConfig
from memtool.train.config import OptimConfig, TrainConfig
from memtool.train.data import BatchSchedule, load_token_file
from memtool.train.loop import causal_lm_loss, train

STEPS = 20
# fp32 throughout: the only differences from the plain loop are summation orders (sharded norms,
# all-reduced gradients, fused vs foreach AdamW), a few ulps per step.
RTOL = 1e-5
WORKER = Path(__file__).with_name("dist_worker.py")


def _config(**changes) -> TrainConfig:
    values = dict(data="", steps=STEPS, batch_size=4, seq_len=32, seed=0)
    values.update(changes)
    optim = values.pop("optim", OptimConfig(lr=3e-3, weight_decay=0.01, max_grad_norm=0.5))
    return TrainConfig(**values, optim=optim)


def plain_adamw(config_json: Path, tokens: Path, config: TrainConfig):
    """The specification: one process, one batch per step, torch.optim.AdamW."""
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(config_json.parent), dtype=torch.float32
    )
    model.train()
    windows = load_token_file(tokens, config.seq_len)
    schedule = BatchSchedule(windows, config.batch_size, config.seed)
    o = config.optim
    adamw = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )
    losses = []
    for step in range(config.steps):
        loss = causal_lm_loss(model, schedule.batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        adamw.step()
        adamw.zero_grad()
        losses.append(loss.item())
    return losses, model


@pytest.fixture(scope="module")
def plain(tiny_run):
    config_json, tokens = tiny_run
    return plain_adamw(config_json, tokens, _config(data=str(tokens)))


def _train(tiny_run, tmp_path, activations=None, **changes):
    config_json, tokens = tiny_run
    config = _config(data=str(tokens), **changes)
    return train(
        config,
        tmp_path / "out",
        from_config=config_json,
        activations=activations,
        device="cpu",
        export_dtype="float32",
        show_progress=False,
    )


# MEMO: half the tokens' activations swapped to host memory, the other half recomputed
MEMO = {"recompute": "tokens", "swap": True, "swap_fraction": 0.5}


def test_training_learns(plain):
    losses, _ = plain
    assert losses[-1] < losses[0] - 0.3  # the fixture data is learnable; a broken loop is not


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("offload", [False, True])
def test_one_process_equals_plain_adamw(tiny_run, tmp_path, plain, zero, offload):
    result = _train(tiny_run, tmp_path, zero=zero, offload_optimizer=offload)
    torch.testing.assert_close(result.losses, plain[0], rtol=RTOL, atol=0)
    assert result.steps == STEPS and result.tokens == STEPS * 4 * 32


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_activation_swapping_equals_plain_adamw(tiny_run, tmp_path, plain, zero):
    result = _train(
        tiny_run, tmp_path, ActivationConfig(**MEMO), zero=zero, offload_optimizer=zero % 2 == 1
    )
    torch.testing.assert_close(result.losses, plain[0], rtol=RTOL, atol=0)
    memory = result.ranks[0]
    assert 0 < memory["activation_bytes_peak"] < memory["host_activation_bytes_peak"]
    n_layers = json.loads(tiny_run[0].read_text())["num_hidden_layers"]
    assert memory["activation_swap_fractions"] == [0.5] * n_layers  # one alpha per layer


@pytest.mark.parametrize("zero", [1, 2])
def test_many_buckets_equal_plain_adamw(tiny_run, tmp_path, plain, zero, monkeypatch):
    monkeypatch.setattr("memtool.train.zero.BUCKET_NUMEL", 20_000)  # ~6 buckets, not 1
    result = _train(tiny_run, tmp_path, zero=zero, offload_optimizer=zero == 2)
    torch.testing.assert_close(result.losses, plain[0], rtol=RTOL, atol=0)


def test_grad_accumulation_equals_plain(tiny_run, tmp_path, plain):
    result = _train(tiny_run, tmp_path, zero=2, grad_accum=2)
    torch.testing.assert_close(result.losses, plain[0], rtol=RTOL, atol=0)


def test_export_holds_the_trained_weights_and_loads(tiny_run, tmp_path, plain):
    result = _train(tiny_run, tmp_path, zero=1)
    exported = load_file(str(result.model_dir / "model.safetensors"))
    expected = dict(plain[1].named_parameters())
    assert "lm_head.weight" not in exported  # tied: written once, re-tied on load
    for name, value in exported.items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=1e-4, atol=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    torch.testing.assert_close(loaded.lm_head.weight, expected["model.embed_tokens.weight"])
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_benchmark_runs_write_nothing(tiny_run, tmp_path, plain):
    config_json, tokens = tiny_run
    config = _config(data=str(tokens), steps=2, save_every=1)
    result = train(config, tmp_path / "out", from_config=config_json, device="cpu",
                   show_progress=False, write_outputs=False)  # fmt: skip
    torch.testing.assert_close(result.losses, plain[0][:2], rtol=RTOL, atol=0)
    assert (result.checkpoint, result.model_dir) == (None, None)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bf16_compute_keeps_fp32_masters(tiny_run, tmp_path, plain):
    result = _train(tiny_run, tmp_path, zero=0, compute_dtype="bfloat16")
    # bf16 forward: the same curve within bf16 noise, and it still learns
    torch.testing.assert_close(result.losses, plain[0], rtol=0.05, atol=0)
    memory = result.ranks[0]
    n_params = memory["param_bytes"] // 2  # bf16 compute weights
    assert memory["optimizer_state_bytes"] == 12 * n_params  # fp32 master + two moments


def test_offload_keeps_under_30_percent_on_device(tiny_run, tmp_path):
    plain_run = _train(tiny_run, tmp_path / "a", steps=1).ranks[0]
    offload = _train(
        tiny_run, tmp_path / "b", steps=1, offload_optimizer=True, compute_dtype="bfloat16"
    ).ranks[0]

    def device(m):
        return m["param_bytes"] + m["grad_bytes"] + m["optimizer_state_bytes"]

    assert device(offload) <= 0.30 * device(plain_run)
    assert offload["host_optimizer_state_bytes"] > 0


def test_resume_equals_uninterrupted_run(tiny_run, tmp_path, plain):
    config_json, tokens = tiny_run
    config = _config(data=str(tokens), zero=2, save_every=5, steps=10)
    first = train(config, tmp_path / "a", from_config=config_json, show_progress=False)
    resumed_config = _config(data=str(tokens), zero=2, steps=STEPS)
    resumed = train(
        resumed_config,
        tmp_path / "b",
        from_config=config_json,
        resume=first.output,
        device="cpu",
        show_progress=False,
    )
    assert resumed.losses[:10] == first.losses
    torch.testing.assert_close(resumed.losses, plain[0], rtol=RTOL, atol=0)
    # and bit for bit what one uninterrupted run gives
    whole = train(resumed_config, tmp_path / "c", from_config=config_json, show_progress=False)
    assert resumed.losses == whole.losses


def test_interrupt_writes_a_resumable_checkpoint(tiny_run, tmp_path, plain):
    config_json, tokens = tiny_run

    def ctrl_c(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    config = _config(data=str(tokens), zero=3)
    stopped = train(
        config, tmp_path / "a", from_config=config_json, show_progress=False, on_step=ctrl_c
    )
    assert stopped.interrupted and stopped.steps == 3 and stopped.model_dir is None
    assert stopped.checkpoint.name == "step-000003"
    resumed = train(
        config, tmp_path / "a", from_config=config_json, resume=tmp_path / "a", show_progress=False
    )
    torch.testing.assert_close(resumed.losses, plain[0], rtol=RTOL, atol=0)


def test_damaged_or_mismatched_checkpoint_is_refused(tiny_run, tmp_path):
    config_json, tokens = tiny_run
    first = train(
        _config(data=str(tokens), steps=2), tmp_path / "a", from_config=config_json,
        show_progress=False,
    )  # fmt: skip
    with pytest.raises(MemtoolError, match="written with --zero 0"):
        train(
            _config(data=str(tokens), steps=4, zero=1), tmp_path / "b", from_config=config_json,
            resume=first.checkpoint, show_progress=False,
        )  # fmt: skip
    shard = next(first.checkpoint.glob("rank-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(MemtoolError, match="checksum"):
        train(
            _config(data=str(tokens), steps=4), tmp_path / "c", from_config=config_json,
            resume=first.checkpoint, show_progress=False,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"zero": 4}, "unknown --zero 4"),
        ({"batch_size": 3, "grad_accum": 2}, "does not split"),
        ({"batch_size": 1024}, "fewer than one batch"),
        ({"seq_len": 1}, "--seq-len must be at least 2"),
        ({"optim": OptimConfig(max_grad_norm=-1.0)}, "--max-grad-norm must be a positive"),
        ({"optim": OptimConfig(lr=float("nan"))}, "--lr must be a positive number"),
        ({"optim": OptimConfig(weight_decay=-1.0)}, "--weight-decay must be 0 or more"),
        ({"optim": OptimConfig(warmup_steps=-5)}, "--warmup-steps must be 0 or more"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_run, tmp_path, changes, message):
    with pytest.raises(MemtoolError, match=message):
        _train(tiny_run, tmp_path, **changes)


def _two_ranks(spec: dict, folder: Path, interpret: bool = False) -> subprocess.CompletedProcess:
    """Run `spec`'s jobs in one 2-rank torchrun launch of dist_worker.py (`interpret`: under
    TRITON_INTERPRET=1, where ZeRO 0-2 step with memtool's fused kernel, as on a GPU)."""
    (folder / "jobs.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(folder / "jobs.json")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def _two_rank_jobs(tiny_run, folder: Path, jobs: list[dict], interpret: bool = False) -> list[dict]:
    """Rank 0's results of `jobs` (changes to the base config) run on 2 ranks."""
    config_json, tokens = tiny_run
    spec = {
        "config_json": str(config_json),
        "tokens": str(tokens),
        "output": str(folder),
        "base": _config(data=str(tokens)).to_dict(),
        "jobs": jobs,
    }
    done = _two_ranks(spec, folder, interpret)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "results.json").read_text())


def test_two_processes_with_the_fused_step_equal_plain_adamw(tiny_run, tmp_path, plain):
    """The GPU path's optimizer step (the 1/world factor and the clipping coefficient folded
    into the kernel's multiplier) on 2 gloo ranks, in Triton's interpreter."""
    steps = 6
    jobs = [{"zero": zero, "steps": steps} for zero in (0, 1, 2)]
    results = _two_rank_jobs(tiny_run, tmp_path, jobs, interpret=True)
    for job, result in zip(jobs, results, strict=True):
        torch.testing.assert_close(result["losses"], plain[0][:steps], rtol=RTOL, atol=0,
                                   msg=str(job))  # fmt: skip


def test_two_processes_equal_plain_adamw(tiny_run, tmp_path, plain):
    """Every stage, offload on and off, on 2 gloo ranks (one torchrun launch runs them all)."""
    jobs = [
        {"zero": zero, "offload_optimizer": offload}
        for zero in (0, 1, 2, 3)
        for offload in (False, True)
    ]
    jobs += [{"zero": zero, "activations": MEMO} for zero in (0, 3)]
    results = _two_rank_jobs(tiny_run, tmp_path, jobs)
    assert len(results) == len(jobs)
    for job, result in zip(jobs, results, strict=True):
        assert result["world_size"] == 2
        torch.testing.assert_close(result["losses"], plain[0], rtol=RTOL, atol=0, msg=str(job))
    one_rank = _train(tiny_run, tmp_path / "one", zero=3, steps=1).ranks[0]
    zero3 = results[jobs.index({"zero": 3, "offload_optimizer": False})]["ranks"]
    assert all(r["activation_bytes_peak"] > 0 for r in results[-1]["ranks"])  # swapping ran

    def held(m):
        return m["param_bytes"] + m["grad_bytes"] + m["optimizer_state_bytes"]

    for rank in zero3:  # ZeRO-3 on 2 ranks: about half of one rank's bytes each
        assert abs(held(rank) / held(one_rank) - 0.5) < 0.02


def test_resume_on_another_number_of_ranks(tiny_run, tmp_path, plain):
    """Checkpoints of 2 ranks resume on 1 and of 1 rank on 2, for every stage: the rest of
    the run matches plain AdamW as an uninterrupted run does (the shards are cut anew)."""
    config_json, tokens = tiny_run
    half = STEPS // 2
    one_rank = {}
    for zero in (0, 2, 3):  # written by one process, resumed by two below
        first = _train(tiny_run, tmp_path / f"one-{zero}", zero=zero, steps=half)
        one_rank[zero] = str(first.checkpoint)
    jobs = [{"zero": zero, "steps": half} for zero in (1, 2, 3)]
    jobs += [{"zero": zero, "resume": path} for zero, path in one_rank.items()]
    results = _two_rank_jobs(tiny_run, tmp_path, jobs)
    for job, result in zip(jobs, results, strict=True):
        expected = plain[0] if "resume" in job else plain[0][:half]
        torch.testing.assert_close(result["losses"], expected, rtol=RTOL, atol=0, msg=str(job))
    for index, zero in enumerate((1, 2, 3)):  # written by two processes, resumed by one
        resumed = train(
            _config(data=str(tokens), zero=zero),
            tmp_path / f"resumed-{zero}",
            from_config=config_json,
            resume=Path(results[index]["checkpoint"]),
            show_progress=False,
        )
        torch.testing.assert_close(resumed.losses, plain[0], rtol=RTOL, atol=0, msg=str(zero))


def test_a_dying_rank_stops_the_others_and_keeps_the_last_checkpoint(tiny_run, tmp_path):
    config_json, tokens = tiny_run
    spec = {
        "config_json": str(config_json),
        "tokens": str(tokens),
        "output": str(tmp_path),
        "base": _config(data=str(tokens), save_every=2).to_dict(),
        "jobs": [{"zero": 2}],
        "die": {"rank": 1, "step": 3},
    }
    done = _two_ranks(spec, tmp_path)
    assert done.returncode != 0
    message = (tmp_path / "error-0.txt").read_text()
    assert "lost contact with the other ranks" in message and "step-000002" in message
    from memtool.train.checkpoint import read_state

    state = read_state(tmp_path / "job-0" / "checkpoints" / "step-000002")
    assert state["step"] == 2 and len(state["crc32"]) == 2
    assert not (tmp_path / "job-0" / "checkpoints" / "step-000004").exists()


def test_8bit_optimizer_states_learn_resume_exactly_and_take_a_quarter(
    tiny_run, tmp_path, plain, monkeypatch
):
    # several buckets: bitsandbytes shares one quantization map between them (saved once each)
    monkeypatch.setattr("memtool.train.zero.BUCKET_NUMEL", 20_000)
    config_json, tokens = tiny_run
    eight = _config(data=str(tokens), zero=1, optimizer_bits=8, offload_optimizer=True)
    whole = train(eight, tmp_path / "a", from_config=config_json, show_progress=False)
    # bitsandbytes' block-wise 8-bit moments: close to the fp32 curve, not equal
    torch.testing.assert_close(whole.losses, plain[0], rtol=0.02, atol=0)
    full = _train(tiny_run, tmp_path / "b", zero=1, offload_optimizer=True).ranks[0]
    states = whole.ranks[0]["host_optimizer_state_bytes"] - full["host_optimizer_state_bytes"] / 3
    moments32 = full["host_optimizer_state_bytes"] * 2 / 3  # master + 2 moments -> 2 moments
    assert states < 0.3 * moments32  # 1 byte per moment (+ block scales) instead of 4
    half = train(
        TrainConfig.from_dict({**eight.to_dict(), "steps": 10}), tmp_path / "c",
        from_config=config_json, show_progress=False,
    )  # fmt: skip
    resumed = train(
        eight, tmp_path / "d", from_config=config_json, resume=half.output, show_progress=False
    )
    assert resumed.losses == whole.losses
    # Block-wise quantized moments cannot be cut for another number of ranks: said, not tried.
    state_file = half.checkpoint / "trainer.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2, "crc32": state["crc32"] * 2}))
    with pytest.raises(MemtoolError, match="8-bit optimizer states, which cannot be re-cut"):
        train(eight, tmp_path / "e", from_config=config_json, resume=half.checkpoint,
              show_progress=False)  # fmt: skip


def test_from_config_takes_a_config_file_of_any_name(tiny_run, tmp_path):
    config_json, tokens = tiny_run
    named = tmp_path / "ladder-step.json"  # a recipe keeps several configs in one folder
    shutil.copy(config_json, named)
    config = _config(data=str(tokens), steps=1)
    result = train(config, tmp_path / "a", from_config=named, show_progress=False)
    assert result.steps == 1 and (result.model_dir / "config.json").is_file()
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    for bad in (tmp_path / "notes.json", tmp_path / "missing.json", tmp_path):
        with pytest.raises(MemtoolError, match="--from-config"):
            train(config, tmp_path / "b", from_config=bad, show_progress=False)


def test_a_module_passed_in_trains_like_its_config(tiny_run, tmp_path, plain):
    """The Python API takes a built model (benchmarks build one and copy it per run)."""
    config_json, tokens = tiny_run
    torch.manual_seed(0)  # the seed `from_config` runs build with: the same initial weights
    module = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_json.parent))
    config = _config(data=str(tokens), zero=2)
    result = train(config, tmp_path / "a", model=module, device="cpu", show_progress=False,
                   export_dtype="float32")  # fmt: skip
    torch.testing.assert_close(result.losses, plain[0], rtol=RTOL, atol=0)
    # trained in place, and exported without a tokenizer
    torch.testing.assert_close(module.lm_head.weight, plain[1].lm_head.weight, rtol=1e-4, atol=1e-5)
    assert json.loads((result.checkpoint / "trainer.json").read_text())["source"] == (
        "<LlamaForCausalLM module>"
    )
    assert not (result.model_dir / "tokenizer.json").exists()


def test_a_module_passed_in_is_refused_where_it_cannot_apply(tiny_run, tmp_path, text_file):
    config_json, tokens = tiny_run
    module = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_json.parent))
    config = _config(data=str(tokens), steps=1)
    with pytest.raises(MemtoolError, match="not both"):
        train(config, tmp_path / "a", model=module, from_config=config_json, show_progress=False)
    with pytest.raises(MemtoolError, match="is not a transformers causal LM"):
        train(config, tmp_path / "b", model=torch.nn.Linear(2, 2), show_progress=False)
    with pytest.raises(MemtoolError, match="text data needs a tokenizer"):
        text = _config(data=str(text_file), steps=1)
        train(text, tmp_path / "c", model=module, show_progress=False)


def test_resume_refuses_what_would_not_continue_the_run(tiny_run, tmp_path):
    config_json, tokens = tiny_run
    first = train(_config(data=str(tokens), steps=2), tmp_path / "a", from_config=config_json,
                  show_progress=False)  # fmt: skip
    other_model = write_tiny(tmp_path / "three-layers", layers=3)
    cases = [
        ({"seq_len": 16}, config_json, "written with --seq-len 32"),
        ({"seed": 1}, config_json, "written with --seed 0"),
        ({"optim": OptimConfig(lr=1e-3)}, config_json, "written with --lr 0.003"),
        ({}, other_model, "written for another model"),
        ({"steps": 1}, config_json, "--steps 1 is before checkpoint"),
    ]
    for changes, model, message in cases:
        config = _config(data=str(tokens), **{"steps": 4, **changes})
        with pytest.raises(MemtoolError, match=message):
            train(config, tmp_path / "b", from_config=model, resume=first.checkpoint,
                  show_progress=False)  # fmt: skip
    # As many steps as the checkpoint's: nothing left to train, the export is written.
    again = train(_config(data=str(tokens), steps=2), tmp_path / "c", from_config=config_json,
                  resume=first.checkpoint, show_progress=False)  # fmt: skip
    assert again.losses == first.losses and (again.model_dir / "model.safetensors").is_file()


def test_output_is_checked_before_any_work(tiny_run, tmp_path):
    config_json, tokens = tiny_run
    config = _config(data=str(tokens), steps=2)
    (tmp_path / "file").write_text("")
    with pytest.raises(MemtoolError, match="is a file, not a folder"):
        train(config, tmp_path / "file", from_config=config_json, show_progress=False)
    first = train(config, tmp_path / "a", from_config=config_json, show_progress=False)
    # A fresh run into a folder holding another run's checkpoints would mix the two up later.
    with pytest.raises(MemtoolError, match="already holds checkpoints of another run"):
        train(config, tmp_path / "a", from_config=config_json, show_progress=False)
    # Resuming an earlier checkpoint into the folder that holds later ones: refused too.
    longer = _config(data=str(tokens), steps=4, save_every=1)
    train(longer, tmp_path / "a", from_config=config_json, resume=first.checkpoint,
          show_progress=False)  # fmt: skip
    with pytest.raises(MemtoolError, match="past step 2 of the run being resumed"):
        train(longer, tmp_path / "a", from_config=config_json, resume=first.checkpoint,
              show_progress=False)  # fmt: skip
    # A killed run's half-written checkpoint is cleared by the next run into the folder.
    leftover = tmp_path / "a" / "checkpoints" / ".tmp-step-000005-x"
    leftover.mkdir()
    longer = _config(data=str(tokens), steps=5)
    train(longer, tmp_path / "a", from_config=config_json, resume=tmp_path / "a",
          show_progress=False)  # fmt: skip
    assert not leftover.exists()


def test_interrupted_writes_leave_the_earlier_state(tiny_run, tmp_path, monkeypatch):
    config_json, tokens = tiny_run
    first = train(_config(data=str(tokens), steps=2), tmp_path / "a", from_config=config_json,
                  show_progress=False)  # fmt: skip
    exported = (first.model_dir / "model.safetensors").read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C during the export: the earlier export stays whole, no temporary folder stays.
    monkeypatch.setattr("memtool.train.export.write_safetensors", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data=str(tokens), steps=3), tmp_path / "a", from_config=config_json,
              resume=tmp_path / "a", show_progress=False)  # fmt: skip
    assert (first.model_dir / "model.safetensors").read_bytes() == exported
    assert not list((tmp_path / "a").glob(".tmp-*"))
    # Ctrl-C (a second one) while a checkpoint is written: no half-written checkpoint.
    monkeypatch.setattr("memtool.train.checkpoint.save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data=str(tokens), steps=4), tmp_path / "a", from_config=config_json,
              resume=tmp_path / "a", show_progress=False)  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000003"]  # no step-000004, no .tmp-step-000004-*


def test_a_diverging_loss_stops_the_run(tiny_run, tmp_path, monkeypatch):
    config_json, tokens = tiny_run
    calls = []

    def diverging(model, input_ids):
        calls.append(1)
        loss = causal_lm_loss(model, input_ids)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "causal_lm_loss", diverging)
    config = _config(data=str(tokens), steps=5, save_every=1)
    with pytest.raises(MemtoolError, match=r"the loss is nan at step 3: training diverged.*"
                       r"step-000002"):  # fmt: skip
        train(config, tmp_path / "a", from_config=config_json, show_progress=False)
    assert not (tmp_path / "a" / "model").exists()


def test_a_damaged_trainer_state_is_named(tiny_run, tmp_path):
    config_json, tokens = tiny_run
    first = train(_config(data=str(tokens), steps=1), tmp_path / "a", from_config=config_json,
                  show_progress=False)  # fmt: skip
    state_file = first.checkpoint / "trainer.json"
    state = json.loads(state_file.read_text())
    for broken, message in (
        ({k: v for k, v in state.items() if k != "config"}, "has no valid 'config'"),
        ({**state, "crc32": []}, "0 checksums for 1 rank"),
        ([state], "is not a memtool training checkpoint"),
    ):
        state_file.write_text(json.dumps(broken))
        with pytest.raises(MemtoolError, match=message):
            train(_config(data=str(tokens), steps=2), tmp_path / "b", from_config=config_json,
                  resume=first.checkpoint, show_progress=False)  # fmt: skip
