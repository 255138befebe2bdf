"""The CLI contract: --json on stdout, exit codes 0/1/2, one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from memtool.cli.app import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_help_lists_working_commands():
    result = _run("--help")
    assert result.exit_code == 0
    assert "measure" in result.stdout and "info" in result.stdout


def test_python_dash_m_works():
    done = subprocess.run(
        [sys.executable, "-m", "memtool", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "measure" in done.stdout


def test_measure_json(tiny_llama_dir, text_file):
    result = _run(
        "measure",
        tiny_llama_dir,
        "--data",
        text_file,
        "--seq-len",
        32,
        "--max-windows",
        2,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)  # stdout holds exactly one JSON object
    assert payload["windows"] == 2 and payload["seq_len"] == 32
    assert payload["thresholds"] == {"passed": True, "failures": []}


def test_measure_human_table(tiny_llama_dir, text_file):
    result = _run(
        "measure", tiny_llama_dir, "--data", text_file, "--seq-len", 32, "--max-windows", 1
    )
    assert result.exit_code == 0, result.stderr
    assert "perplexity" in result.stdout and "GPTQ-lineage" in result.stdout


def test_threshold_breach_exits_1(tiny_llama_dir, text_file):
    result = _run(
        "measure",
        tiny_llama_dir,
        "--data",
        text_file,
        "--seq-len",
        32,
        "--max-windows",
        1,
        "--max-perplexity",
        1.0,
        "--max-weight-bytes",
        "1KB",
        "--json",
    )
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert not payload["thresholds"]["passed"] and len(payload["thresholds"]["failures"]) == 2
    assert "max-perplexity" in result.stderr


@pytest.fixture
def bad_folders(tmp_path, tiny_llama_dir):
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"x" * 16)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    return {
        "no_config": no_config,
        "corrupt": corrupt,
        "empty": empty,
        "short": short,
        "missing": tmp_path / "missing",
    }


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing-model", "not found"),
        ("no-config", "config.json is missing"),
        ("corrupt", "corrupt safetensors"),
        ("empty-text", "empty"),
        ("short-text", "window"),
        ("unknown-data", "data"),
        ("seq-len-too-long", "context"),
        ("zero-windows", "--max-windows must be a positive"),
        ("negative-seq-len", "--seq-len must be a positive"),
        ("bad-size", "malformed size '12XB'"),
        ("bad-dtype", "unknown dtype"),
    ],
)
def test_bad_input_exit_2_one_line(case, match, bad_folders, tiny_llama_dir, text_file):
    model, data, extra = tiny_llama_dir, text_file, []
    if case == "missing-model":
        model = bad_folders["missing"]
    elif case == "no-config":
        model = bad_folders["no_config"]
    elif case == "corrupt":
        model = bad_folders["corrupt"]
    elif case == "empty-text":
        data = bad_folders["empty"]
    elif case == "short-text":
        data = bad_folders["short"]
    elif case == "unknown-data":
        data = "no-such-dataset"
    elif case == "seq-len-too-long":
        extra = ["--seq-len", 4096]
    elif case == "zero-windows":
        extra = ["--max-windows", 0]
    elif case == "negative-seq-len":
        extra = ["--seq-len", -1]
    elif case == "bad-size":
        extra = ["--max-weight-bytes", "12XB"]
    elif case == "bad-dtype":
        extra = ["--dtype", "float8"]
    result = _run("measure", model, "--data", data, "--seq-len", 32, *extra)
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:") and match in lines[0]
    assert "Traceback" not in result.stderr


def test_info_json():
    result = _run("info", "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["packages"]["torch"].startswith("2.")
    assert info["kernel_backends"]["reference"]["usable"] is True
    assert "smollm2-135m" in info["builtin_models"]
    assert info["cache"]["home"]


def test_compress_recipe_gate_exits_1(tiny_llama_dir, text_file, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'model = "{tiny_llama_dir}"\noutput = "{tmp_path / "out"}"\n'
        '[compress]\nmethod = "rtn"\nbits = 4\ngroup_size = 32\n'
        f'[measure]\ndata = "{text_file}"\nmax_windows = 1\nseq_len = 32\nmax_perplexity = 1.0\n'
    )
    result = _run("compress", "--recipe", recipe, "--json")
    assert result.exit_code == 1, result.stderr
    assert json.loads(result.stdout)["compress"]["method"] == "rtn"
    # options beside a recipe would be ignored: refused before anything is written
    other = tmp_path / "other"
    result = _run("compress", "--recipe", recipe, "-o", other, "--method", "gptq", "--bits", 3)
    assert result.exit_code == 2 and not other.exists()
    assert "--method, --bits would be ignored" in _error_lines(result)[0]


def test_compress_cli_writes_and_measure_reads(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "q"
    result = _run(
        "compress",
        tiny_llama_dir,
        "--method",
        "gptq",
        "--bits",
        3,
        "--group-size",
        32,
        "--calib",
        text_file,
        "--calib-samples",
        4,
        "--seq-len",
        32,
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    settings = json.loads(result.stdout)["settings"]
    # At 3 bits GPTQ calibrates true-sequentially unless told --one-pass; the output says so.
    assert settings["bits"] == 3 and settings["true_sequential"] is True
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["true_sequential"] is True
    again = _run("compress", tiny_llama_dir, "--method", "rtn", "-o", out)
    assert again.exit_code == 2 and "already exists" in again.stderr
    measured = _run(
        "measure", out, "--data", text_file, "--seq-len", 32, "--max-windows", 1, "--json"
    )
    assert measured.exit_code == 0, measured.stderr
    assert 3 < json.loads(measured.stdout)["bits_per_weight_linear"] < 5


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--method", "magic"], "unknown method"),
        (["--method", "gptq", "--bits", 5], "--bits 5"),
        (["--method", "nf4", "--bits", 3], "4-bit"),
        (["--method", "gptq", "--group-size", 0], "--group-size 0"),
        (["--method", "gptq", "--calib-samples", 0], "--calib-samples"),
        (["--method", "bitstack", "--rank", 100], "--rank 100 does not fit"),
        (["--method", "bitstack", "--niter", 0], "--niter 0"),
        (["--method", "bitstack", "--order", "random"], "--order 'random'"),
        (["--method", "bitstack", "--stats-dtype", "fp8"], "--stats-dtype 'fp8'"),
        (["--method", "bitstack", "--score-samples", 0], "--feedback needs the input Hessians"),
        (["--method", "bitstack", "--damp-percent", 0], "--damp-percent 0"),
        (["--method", "bitstack", "--output-weighting", -1], "--output-weighting -1.0 must be"),
        (["--method", "bitstack", "--output-weighting", "nan"], "--output-weighting nan must be"),
        (
            ["--method", "bitstack", "--score-samples", 0, "--no-feedback"],
            "--output-weighting needs the output gradients",
        ),
        (
            ["--method", "bitstack", "--score-calib", "wiki", "--score-samples", 0],
            "--score-calib needs score windows",
        ),
        (["--method", "bitstack", "--score-calib", "/no/such/text"], "/no/such/text"),
        (["--method", "gptq", "--stats-dtype", "fp8"], "--stats-dtype 'fp8'"),
    ],
)
def test_compress_bad_input(tiny_llama_dir, tmp_path, args, match):
    result = _run("compress", tiny_llama_dir, "-o", tmp_path / "never", *args)
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and match in lines[0], lines
    assert not (tmp_path / "never").exists()


def test_info_reports_every_kernel_backend():
    info = json.loads(_run("info", "--json").stdout)
    assert set(info["kernel_backends"]) == {"reference", "triton", "cpu"}
    assert all(
        isinstance(b["usable"], bool) and b["note"] for b in info["kernel_backends"].values()
    )


def test_bitstack_cli_compresses_and_measures_budgets(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "stack"
    result = _run(
        "compress",
        tiny_llama_dir,
        "--method",
        "bitstack",
        "--niter",
        3,
        "--calib",
        text_file,
        "--calib-samples",
        4,
        "--score-samples",
        2,
        "--seq-len",
        32,
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    details = json.loads(result.stdout)["details"]
    low, high = details["min_bytes"], details["max_bytes"]
    common = ["--data", text_file, "--seq-len", 32, "--max-windows", 1]
    one = _run("measure", out, *common, "--budget", low, "--json")
    assert one.exit_code == 0, one.stderr
    assert json.loads(one.stdout)["weight_bytes"] == low
    plot = tmp_path / "curve.png"
    sweep = _run("measure", out, *common, "--budgets", f"{low},{high}", "--plot", plot)
    assert sweep.exit_code == 0, sweep.stderr
    # The title wraps at the console's width wherever a long temporary path puts the break.
    assert "2 budgets" in " ".join(sweep.stdout.split())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gate = _run("measure", out, *common, "--budgets", f"{low},{high}", "--max-weight-bytes", low)
    assert gate.exit_code == 1
    for args, match in (
        (["--budget", low - 1], "below this stack's minimum"),
        (["--budget", "1TB"], "above the full stack"),
        (["--budget", low, "--budgets", high], "not both"),
        (["--plot", tmp_path / "x.png"], "--plot draws a --budgets sweep"),
    ):
        bad = _run("measure", out, *common, *args)
        assert bad.exit_code == 2 and match in _error_lines(bad)[0], bad.stderr
    assert not (tmp_path / "x.png").exists()
    not_stack = _run("measure", tiny_llama_dir, *common, "--budget", "1MB")
    assert not_stack.exit_code == 2 and "applies to BitStack stacks" in not_stack.stderr


@pytest.mark.parametrize(
    ("flags", "feedback", "damp", "weighting", "rows"),
    [
        ([], True, 0.3, False, 1.0),
        (
            [
                "--no-feedback",
                "--damp-percent",
                0.2,
                "--token-weighting",
                "--output-weighting",
                0.5,
            ],
            False,
            0.2,
            True,
            0.5,
        ),
    ],
)
def test_bitstack_cli_feedback_flags_reach_the_stack(
    tiny_llama_dir, text_file, tmp_path, flags, feedback, damp, weighting, rows
):
    out = tmp_path / "stack"
    calib = ["--calib", text_file, "--calib-samples", 4, "--seq-len", 32]
    result = _run(
        "compress", tiny_llama_dir, "--method", "bitstack", "--niter", 2, *calib, *flags, "-o", out
    )
    assert result.exit_code == 0, result.stderr
    settings = json.loads((out / "bitstack.json").read_text())["settings"]
    assert (settings["feedback"], settings["damp_percent"]) == (feedback, damp)
    assert settings["token_weighting"] is weighting
    assert settings["output_weighting"] == rows
    assert settings["score_samples"] == 4  # the default 16, capped at the calibration windows


def test_bitstack_cli_score_calib_draws_the_score_windows_from_its_data(
    tiny_llama_dir, text_file, held_out_text_file, tmp_path
):
    out = tmp_path / "stack"
    calib = ["--calib", text_file, "--calib-samples", 2, "--seq-len", 32]
    score = ["--score-calib", held_out_text_file, "--score-samples", 3]
    result = _run(
        "compress", tiny_llama_dir, "--method", "bitstack", "--niter", 2, *calib, *score, "-o", out
    )
    assert result.exit_code == 0, result.stderr
    assert "score windows: " in result.stdout and "3 windows x 32 tokens" in result.stdout
    meta = json.loads((out / "bitstack.json").read_text())
    # More score windows than calibration windows: they are not calibration windows.
    assert meta["settings"]["score_data"] == str(held_out_text_file)
    assert meta["score_calibration"]["n_windows"] == 3
    assert meta["calibration"]["n_windows"] == 2


def test_compress_shows_warnings_in_human_output(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    import memtool.compress.bitstack_scaling as scaling

    monkeypatch.setattr(scaling, "check_supported", _refuse_architecture)
    result = _run(
        "compress",
        tiny_llama_dir,
        "--method",
        "bitstack",
        "--niter",
        2,
        "--calib",
        text_file,
        "--calib-samples",
        4,
        "--score-samples",
        1,
        "--seq-len",
        32,
        "-o",
        tmp_path / "s",
    )
    assert result.exit_code == 0, result.stderr
    assert "warning: no known scaling groups" in result.stderr


def _refuse_architecture(model):
    from memtool.errors import MemtoolError

    raise MemtoolError("unknown")


def test_train_cli_fine_tunes_and_measure_reads_the_export(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "run"
    result = _run(
        "train", tiny_llama_dir, "--data", text_file, "--seq-len", 32, "--batch-size", 2,
        "--steps", 3, "--zero", 2, "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])  # the last line is the JSON
    assert payload["steps"] == 3 and payload["tokens"] == 3 * 2 * 32
    assert payload["tokens_per_s"] > 0 and len(payload["losses"]) == 3
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
        assert payload["ranks"][0][key] > 0
    assert (out / "checkpoints" / "step-000003" / "trainer.json").is_file()
    measured = _run("measure", out / "model", "--data", text_file, "--seq-len", 32, "--json")
    assert measured.exit_code == 0, measured.stderr
    assert json.loads(measured.stdout)["perplexity"] > 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--zero", "5"], "unknown --zero 5"),
        (["--batch-size", "3", "--grad-accum", "2"], "does not split"),
        (["--recompute", "half"], "unknown --recompute"),
        (["--swap-fraction", "0.5"], "applies with --swap-activations"),
        (["--resume", "{tmp}"], "no checkpoint in"),
        (["--activation-budget", "1KB"], "below the minimum"),
        (["--zero", "3", "--optimizer-bits", "8"], "8-bit optimizer states apply to --zero 0, 1"),
        (["--from-config", "{tmp}"], "not both"),
        (["--device", "foo"], "unknown --device 'foo'"),
        (
            ["--swap-activations", "--swap-fraction", "0.5", "--recompute", "full"],
            "needs --recompute tokens",
        ),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be a positive number"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
    ],
)
def test_train_bad_input_exit_2_one_line(tiny_llama_dir, text_file, tmp_path, args, match):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = _run("train", tiny_llama_dir, "--data", text_file, "--seq-len", 32, "-o",
                  tmp_path / "out", *args)  # fmt: skip
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and match in lines[0], result.stderr


def test_errors_keep_their_square_brackets(tiny_llama_dir, tmp_path):
    # rich reads `[tokens]` as markup and would print "of shape  or " without the escape.
    floats = tmp_path / "floats.safetensors"
    save_file({"input_ids": torch.rand(64)}, str(floats))
    result = _run("train", tiny_llama_dir, "--data", floats, "--seq-len", 8, "-o", tmp_path / "o")
    assert result.exit_code == 2
    assert "[tokens]" in _error_lines(result)[0], result.stderr


def test_train_ctrl_c_leaves_a_resumable_checkpoint(tiny_llama_dir, text_file, tmp_path):
    """A real SIGINT to a running `memtool train`: exit 130, a checkpoint, and a resume."""
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "memtool", "train", str(tiny_llama_dir), "--data",
            str(text_file), "--seq-len", "32", "--batch-size", "2", "-o", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [*args, "--steps", "100000", "--save-every", "1"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (out / "checkpoints").is_dir():  # training runs once step 1 is saved
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "resume with --resume" in stderr
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert saved and not (out / "model").exists()  # stopped early: no export
    assert not list((out / "checkpoints").glob(".tmp-*"))  # nothing half-written
    steps_done = int(saved[-1].name.split("-")[1])
    resumed = subprocess.run(
        [*args, "--steps", str(steps_done + 1), "--resume", str(out), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == steps_done + 1


def test_train_under_accelerate_launch_runs_two_ranks(tiny_llama_dir, text_file, tmp_path):
    """`accelerate launch` (torchrun underneath) gives the same command line two gloo ranks."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed beside this python")
    done = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "memtool", "train",
         str(tiny_llama_dir), "--data", str(text_file), "--seq-len", "32", "--batch-size", "2",
         "--steps", "2", "--zero", "1", "-o", str(tmp_path / "run"), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 prints, rank 1 stays quiet
    payload = json.loads(lines[0])
    assert payload["world_size"] == 2 and len(payload["ranks"]) == 2


def test_measure_density_against_a_ladder_profile(tiny_llama_dir, text_file, tmp_path):
    profile = tmp_path / "ladder.json"
    # Losses around a random tiny model's (ln 400 = 6.0 nats), falling with size.
    points = [{"params": n, "loss": 2.0 + 40.0 * n**-0.15} for n in (1e4, 1e5, 1e6, 1e7)]
    profile.write_text(json.dumps({"kind": "ladder", "points": points}))
    args = ["measure", tiny_llama_dir, "--data", text_file, "--seq-len", 32, "--max-windows", 4]
    result = _run(*args, "--density-profile", profile, "--time-ratio", 0.5, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["density_profile"] == str(profile)
    rho = payload["capacity_density"]
    low, high = payload["capacity_density_interval"]
    assert 0 < low <= rho <= high
    assert payload["effective_params_bound"] in ("", ">", "<")
    assert payload["inference_time_ratio"] == 0.5 and payload["inference_time_density"] > 0
    assert isinstance(payload["density_flags"], list)
    breach = _run(*args, "--density-profile", profile, "--min-density", 1e9)
    assert breach.exit_code == 1 and "below --min-density" in breach.stderr
    assert _run(*args, "--min-density", 0.1).exit_code == 2
    # A comparison gives every row N_hat, density and N_hat's change vs the base (here itself).
    pair_args = ["measure", tiny_llama_dir, tiny_llama_dir, *args[2:], "--density-profile", profile]
    pair = _run(*pair_args, "--json")
    assert pair.exit_code == 0, pair.stderr
    rows = json.loads(pair.stdout)["rows"]
    assert [r["effective_params"] for r in rows] == [payload["effective_params"]] * 2
    assert rows[1]["capacity_density"] == pytest.approx(rho)
    assert rows[1]["effective_params_change_pct"] == pytest.approx(0.0)
    assert rows[1]["effective_params_ratio"] == pytest.approx(1.0)
    # the base against itself: exactly 1, not a bound (nor "?" where its N_hat is one)
    assert (rows[0]["effective_params_ratio"], rows[0]["effective_params_change_bound"]) == (1, "")
    table = _run(*pair_args, "--summary", tmp_path / "s.md", "--min-density", 1e9)
    assert table.exit_code == 1 and "below --min-density" in table.stderr
    assert "N̂" in table.stdout and "N̂ vs base" in (tmp_path / "s.md").read_text()
    profile.write_text(json.dumps({"kind": "ladder", "points": points[:1]}))
    bad = _run(*args, "--density-profile", profile)
    assert bad.exit_code == 2 and "at least two" in bad.stderr


def test_build_a_ladder_profile_then_measure_against_it(
    tiny_llama_dir, tiny_opt_dir, text_file, tmp_path, monkeypatch
):
    profile = tmp_path / "ladder.json"
    common = ["--data", text_file, "--seq-len", 32, "--max-windows", 3]
    build = ["measure", tiny_llama_dir, tiny_opt_dir, *common, "--build-profile", "ladder"]
    # Two random tiny models: the larger is not the better one, so no ladder can be made.
    refused = _run(*build, "--output", profile)
    assert refused.exit_code == 2 and "loss must fall as params grow" in refused.stderr
    assert not profile.exists()
    # Stand-ins whose loss does fall with size: the profile carries points and protocol.
    from memtool import measurement

    real_measure = measurement.measure

    def measured(source, config):
        report = real_measure(source, config)
        report.nll_mean = 100.0 / report.params_non_embedding**0.2
        return report

    monkeypatch.setattr(measurement, "measure", measured)
    built = _run(*build, "--output", profile, "--json")
    monkeypatch.setattr(measurement, "measure", real_measure)
    assert built.exit_code == 0, built.stderr
    data = json.loads(profile.read_text())
    assert data["kind"] == "ladder" and len(data["points"]) == 2
    assert data["protocol"]["seq_len"] == 32 and data["protocol"]["windows"] == 3
    assert len(data["protocol"]["tokenizer"]) == 64
    used = _run("measure", tiny_llama_dir, *common, "--density-profile", profile, "--json")
    assert used.exit_code == 0, used.stderr
    assert json.loads(used.stdout)["capacity_density"] is not None
    # Another protocol is flagged; another tokenizer is refused.
    other = _run("measure", tiny_llama_dir, "--data", text_file, "--seq-len", 16,
                 "--max-windows", 3, "--density-profile", profile, "--json")  # fmt: skip
    assert any("protocol differs" in f for f in json.loads(other.stdout)["density_flags"])
    data["protocol"]["tokenizer"] = "0" * 64
    profile.write_text(json.dumps(data))
    refused = _run("measure", tiny_llama_dir, *common, "--density-profile", profile)
    assert refused.exit_code == 2 and "tokenizer" in refused.stderr
    for args, words in (
        (["--build-profile", "ladder"], "--output"),
        (["--build-profile", "densing", "--output", tmp_path / "x.json"], "'ladder'"),
        (["--output", tmp_path / "x.json"], "applies to --build-profile"),
    ):
        bad = _run("measure", tiny_llama_dir, tiny_opt_dir, *common, *args)
        assert bad.exit_code == 2 and words in bad.stderr, bad.stderr
    one = _run("measure", tiny_llama_dir, *common, "--build-profile", "ladder", "-o", profile)
    assert one.exit_code == 2 and "at least two" in one.stderr


def test_json_is_strict_and_library_messages_one_line():
    from memtool.cli.common import _strict_json, one_line

    payload = {"loss": float("nan"), "values": [float("inf"), 1.5], "name": "x"}
    assert _strict_json(payload) == {"loss": None, "values": [None, 1.5], "name": "x"}
    # transformers' config validation: the first line alone only announces the rest
    text = "Class validation error for validator 'validate_architecture':\n  heads must divide\n"
    assert (
        one_line(text) == "Class validation error for validator 'validate_architecture': "
        "heads must divide"
    )
    assert len(one_line("x" * 1000)) == 400


def test_help_texts_print_what_they_say():
    # rich reads "[eval]" as markup, and click does not %-format option help
    result = runner.invoke(app, ["measure", "--help"], env={"COLUMNS": "400"})
    assert "memtool[eval]" in result.stdout and "90% bootstrap" in result.stdout
