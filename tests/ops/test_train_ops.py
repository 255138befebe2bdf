"""Training ops: the references are torch's semantics; the Triton kernels match the references.

References run in this process. Kernel jobs run the Triton interpreter on CPU tensors in one
child process (fixture `run_interpreted`, see conftest.py). Tolerances, and why:

- Activation packing: exact. The kernels round to bfloat16 in integer arithmetic on the float32
  bits, so the interpreter's truncating bfloat16 cast never runs, and bitwise checks hold here
  and on the GPU alike; NaN payloads are unspecified (torch's CPU cast writes 0xFFFF, the kernel
  0x7FC0), so NaN is checked as NaN. int8 values and scales are exact too: both sides divide
  correctly rounded and round half to even, so even exact ties agree.
- AdamW: the moments are bitwise equal. The weights are within 1 float32 ulp, because torch's
  vectorised CPU `sqrt` is not correctly rounded (off by one ulp for about a fifth of inputs
  on this AVX2 build) while the kernel's `sqrt_rn` is; with a correctly rounded `sqrt`
  substituted into the reference, every buffer is bitwise equal. These bitwise claims rest on
  torch's CPU kernels fusing lerp's and addcmul's last multiply-add (explicit FMA in lerp, FMA
  contraction in addcmul on this build).
- The AdamW reference equals `torch.optim.AdamW(foreach=False)` bitwise: it calls the same ops.
"""

import dataclasses
import logging
import math

import pytest
import torch

import memtool.ops as ops
from memtool.errors import MemtoolError
from memtool.ops import (
    KernelBackend,
    adamw_step,
    pack_activation,
    train_backend_used,
    unpack_activation,
)
from memtool.ops.reference_train import (
    Packed,
    adamw_step_reference,
    pack_activation_reference,
    unpack_activation_reference,
)

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def randn(*shape, seed, dtype=torch.float32):
    """Rows of varied magnitude, so per-row scales differ."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(*shape[:-1], 1, generator=gen) * 4 + 0.01 if shape else 1.0
    return (torch.randn(shape, generator=gen) * magnitude).to(dtype)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between float32 tensors in units in the last place (order of bits)."""

    def ordered(t):
        bits = t.contiguous().view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def bf16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def special_floats() -> torch.Tensor:
    """float32 bit patterns over the whole range (subnormals included, NaN excluded), exact
    bfloat16 rounding ties of both parities, and the edges: ±0, ±inf, near the largest bf16."""
    gen = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**31), 2**31, (3000,), generator=gen, dtype=torch.int64)
    values = bits.to(torch.int32).view(torch.float32)
    values = values[~values.isnan()]
    kept = torch.randint(0, 0x7F00, (300,), generator=gen, dtype=torch.int32)
    ties = ((kept << 16) | 0x8000).view(torch.float32)  # exactly halfway between two bf16
    edges = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.3895e38, 3.4e38, -3.4e38])
    return torch.cat([values, ties, -ties, edges, torch.tensor([1e-45, 1e-40, -1e-39])])


# --- activation packing: the reference ----------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1000,), (3, 5, 64)], ids=["1d", "3d"])
def test_bf16_pack_is_torch_round_to_nearest_even(dtype, shape):
    x = randn(*shape, seed=1, dtype=dtype)
    packed = pack_activation_reference(x, "bf16")
    assert packed.fmt == "bf16" and packed.scales is None
    assert packed.shape == x.shape and packed.dtype == dtype
    assert torch.equal(bf16_bits(packed.data), bf16_bits(x.to(torch.bfloat16)))
    assert packed.data.data_ptr() != x.data_ptr()  # bfloat16 in: a copy, never an alias
    assert packed.nbytes == 2 * x.numel()
    restored = unpack_activation_reference(packed)
    assert restored.dtype == dtype and torch.equal(restored, x.to(torch.bfloat16).to(dtype))


def test_bf16_pack_rounds_ties_to_even():
    x = special_floats()
    assert torch.equal(
        bf16_bits(pack_activation_reference(x, "bf16").data), bf16_bits(x.to(torch.bfloat16))
    )
    # 1 + 2**-8 is halfway between 1 and 1 + 2**-7: ties go to the even mantissa (1).
    tie = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8])
    packed = pack_activation_reference(tie, "bf16")
    assert packed.data.tolist() == [1.0, 1 + 2**-6]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1000,), (4, 300), (3, 5, 64)], ids=["1d", "2d", "3d"])
def test_int8_round_trip_error_is_at_most_half_a_step(dtype, shape):
    x = randn(*shape, seed=2, dtype=dtype)
    packed = pack_activation_reference(x, "int8")
    assert packed.data.dtype == torch.int8 and packed.data.shape == x.shape
    assert packed.scales.dtype == torch.float32 and packed.scales.shape == x.shape[:-1]
    absmax = x.float().abs().amax(dim=-1)
    assert torch.equal(packed.scales, absmax / torch.tensor(127.0))
    assert int(packed.data.abs().amax()) == 127  # each row's largest value maps to ±127
    assert packed.nbytes == x.numel() + 4 * packed.scales.numel()

    restored = unpack_activation_reference(packed)
    assert restored.dtype == dtype and restored.shape == x.shape
    error = (restored.float() - x.float()).abs()
    # Half a step, plus float32 rounding of x / scale and q * scale (127 * 2**-24 steps each),
    # plus, for 16-bit originals, the rounding of the result back to their dtype.
    bound = packed.scales.unsqueeze(-1) * (0.5 + 2e-5)
    bound = bound + x.float().abs() * torch.finfo(dtype).eps / 2
    assert bool((error <= bound).all()), float((error - bound).max())


def test_int8_rounds_half_to_even_and_clamps():
    # absmax 127 gives scale 1: values are their own quantised values, halves are ties.
    row = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0]
    packed = pack_activation_reference(torch.tensor([row]), "int8")
    assert packed.scales.tolist() == [1.0]
    assert packed.data.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -127]]


def test_int8_zero_rows_and_empty_shapes():
    x = randn(4, 16, seed=3)
    x[1] = 0
    packed = pack_activation_reference(x, "int8")
    assert packed.scales[1] == 1.0 and not packed.data[1].any()
    assert torch.equal(unpack_activation_reference(packed)[1], torch.zeros(16))
    for shape in [(0, 8), (3, 0), ()]:
        x = randn(*shape, seed=4)
        packed = pack_activation_reference(x, "int8")
        assert packed.scales.shape == x.shape[:-1]
        restored = unpack_activation_reference(packed)
        assert restored.shape == x.shape
        if shape == ():  # a scalar is one row of one element: its own absmax
            assert torch.allclose(restored, x, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_non_contiguous_input_packs_as_its_contiguous_copy(fmt):
    base = randn(6, 40, 12, seed=5)
    x = base.transpose(0, 2)[:, ::3]  # [12, 14, 6], neither contiguous nor dense
    assert not x.is_contiguous()
    packed = pack_activation_reference(x, fmt)
    expected = pack_activation_reference(x.contiguous(), fmt)
    assert packed.data.is_contiguous() and torch.equal(packed.data, expected.data)
    if fmt == "int8":
        assert torch.equal(packed.scales, expected.scales)


def test_packing_refuses_what_it_cannot_pack():
    with pytest.raises(MemtoolError, match="unknown activation format 'fp8'"):
        pack_activation_reference(torch.zeros(4), "fp8")
    with pytest.raises(MemtoolError, match="only float32/float16/bfloat16"):
        pack_activation_reference(torch.zeros(4, dtype=torch.int32), "int8")
    packed = pack_activation_reference(torch.ones(2, 4), "int8")
    with pytest.raises(MemtoolError, match="scales must be"):
        unpack_activation_reference(dataclasses.replace(packed, scales=torch.ones(3)))
    with pytest.raises(MemtoolError, match="int8 data must be"):
        unpack_activation_reference(dataclasses.replace(packed, data=packed.data.float()))


# --- AdamW: the reference -----------------------------------------------------------------------


def adamw_state(numel: int, seed: int, fresh: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if fresh:
        exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)
    else:  # a state some steps in: signed first moment, positive second moment
        exp_avg = torch.randn(numel, generator=gen) * 0.1
        exp_avg_sq = torch.rand(numel, generator=gen) * 0.01
    return {
        "param_fp32": torch.randn(numel, generator=gen),
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
    }


def clone_state(state: dict) -> dict:
    return {name: t.clone() for name, t in state.items()}


def torch_adamw_steps(param: torch.Tensor, grads: list[torch.Tensor], **hyper) -> torch.Tensor:
    weight = torch.nn.Parameter(param.clone())
    optimizer = torch.optim.AdamW(
        [weight],
        lr=hyper["lr"],
        betas=(hyper["beta1"], hyper["beta2"]),
        eps=hyper["eps"],
        weight_decay=hyper["weight_decay"],
        foreach=False,
        fused=False,
    )
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    state = optimizer.state[weight]
    return weight.detach(), state["exp_avg"], state["exp_avg_sq"]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(257,), (17, 33)], ids=["flat", "2d"])
def test_adamw_reference_equals_torch_adamw_bitwise(shape, weight_decay):
    hyper = {**HYPER, "weight_decay": weight_decay}
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(shape, generator=gen) for _ in range(5)]
    state = {k: t.reshape(shape) for k, t in adamw_state(math.prod(shape), 7).items()}
    expected = torch_adamw_steps(state["param_fp32"], grads, **hyper)
    lowp = torch.empty(shape, dtype=torch.bfloat16)
    for step, grad in enumerate(grads, start=1):
        adamw_step_reference(**state, grad=grad, step=step, out_lowp=lowp, **hyper)
    actual = (state["param_fp32"], state["exp_avg"], state["exp_avg_sq"])
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)
    assert torch.equal(bf16_bits(lowp), bf16_bits(state["param_fp32"].to(torch.bfloat16)))


def test_adamw_unscale_and_clip_equal_a_prescaled_gradient():
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(300, generator=gen) for _ in range(5)]
    # A power-of-two loss scale and clip coefficient: unscaling is exact, so the result is
    # AdamW on the true gradient, bit for bit.
    state = adamw_state(300, 9)
    expected = torch_adamw_steps(state["param_fp32"], [g * 0.5 for g in grads], **HYPER)
    for step, grad in enumerate(grads, start=1):
        scaled = grad * 2.0**12
        adamw_step_reference(
            **state, grad=scaled, step=step, grad_scale=2.0**12, clip_coef=0.5, **HYPER
        )
    assert torch.equal(state["param_fp32"], expected[0])
    # Any coefficient: the gradient is multiplied by float32(clip_coef / grad_scale).
    state = adamw_state(300, 9)
    expected = torch_adamw_steps(state["param_fp32"], [g * (0.37 / 3.0) for g in grads], **HYPER)
    for step, grad in enumerate(grads, start=1):
        adamw_step_reference(**state, grad=grad, step=step, grad_scale=3.0, clip_coef=0.37, **HYPER)
    assert torch.equal(state["param_fp32"], expected[0])


def test_adamw_clip_coef_may_be_a_device_tensor():
    # float32(0.37) / 1024 is exact, so the tensor path (divided in float32) and the float path
    # (divided in float64, then rounded) multiply by the same float32 value: the same bits.
    gen = torch.Generator().manual_seed(14)
    grad = torch.randn(300, generator=gen)
    as_float, as_tensor = adamw_state(300, 15), adamw_state(300, 15)
    adamw_step_reference(**as_float, grad=grad, step=3, grad_scale=1024.0, clip_coef=0.37, **HYPER)
    adamw_step_reference(
        **as_tensor, grad=grad, step=3, grad_scale=1024.0, clip_coef=torch.tensor(0.37), **HYPER
    )
    for name, value in as_float.items():
        assert torch.equal(as_tensor[name], value), name
    for bad, message in (
        (torch.tensor([0.5, 0.5]), "2 torch.float32"),
        (torch.tensor(0.5, dtype=torch.float64), "1 torch.float64"),
    ):
        with pytest.raises(MemtoolError, match=f"one float32 element on cpu, not {message}"):
            adamw_step(**adamw_state(8, 1), grad=torch.zeros(8), step=1, clip_coef=bad, **HYPER)


def test_adamw_reference_takes_a_bf16_gradient_as_its_float32_value():
    grad = torch.randn(64, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    state = adamw_state(64, 11)
    expected = torch_adamw_steps(state["param_fp32"], [grad.float()], **HYPER)
    adamw_step_reference(**state, grad=grad, step=1, **HYPER)
    assert torch.equal(state["param_fp32"], expected[0])


def test_adamw_refuses_buffers_that_do_not_fit():
    state = adamw_state(16, 12)
    cases = {
        "grad has 15 elements": {"grad": torch.zeros(15)},
        "must be contiguous": {"grad": torch.zeros(32)[::2]},
        "exp_avg must be float32": {"exp_avg": torch.zeros(16, dtype=torch.float16)},
        "out_lowp must be bfloat16 or float16": {"out_lowp": torch.zeros(16)},
        "step counts from 1": {"step": 0},
    }
    for message, change in cases.items():
        kwargs = {**state, "grad": torch.zeros(16), "step": 1, **HYPER, **change}
        with pytest.raises(MemtoolError, match=message):
            adamw_step(**kwargs, backend="reference")


# --- dispatch on plain CPU ----------------------------------------------------------------------


def test_dispatch_on_plain_cpu_runs_the_reference_and_refuses_the_rest(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "_logged", set())
    x = randn(3, 8, seed=13)
    assert train_backend_used(x.device) is KernelBackend.REFERENCE
    with caplog.at_level(logging.INFO, logger="memtool.ops"):
        packed = pack_activation(x, "int8")
        pack_activation(x, "int8")
    assert [r.getMessage() for r in caplog.records] == [
        "pack_activation runs on the reference backend (cpu tensors)"
    ]
    assert torch.equal(packed.data, pack_activation_reference(x, "int8").data)
    assert torch.equal(unpack_activation(packed), unpack_activation_reference(packed))
    with pytest.raises(MemtoolError, match="triton backend cannot run here"):
        pack_activation(x, "bf16", backend="triton")
    with pytest.raises(MemtoolError, match="cpu backend has no training kernels"):
        adamw_step(**adamw_state(8, 1), grad=torch.zeros(8), step=1, **HYPER, backend="cpu")


# --- Triton kernels under the interpreter -------------------------------------------------------


def pack_job(x: torch.Tensor, fmt: str, backend: str = "triton") -> dict:
    return {"op": "pack_activation", "kwargs": {"x": x, "fmt": fmt}, "backend": backend}


def unpack_job(packed: Packed) -> dict:
    kwargs = {"packed": dataclasses.asdict(packed)}
    return {"op": "unpack_activation", "kwargs": kwargs, "backend": "triton"}


def int8_input(*shape, seed, dtype=torch.float32) -> torch.Tensor:
    """Random rows, one of them zeros and one with exact ties (absmax 127, halves)."""
    x = randn(*shape, seed=seed)
    if len(shape) >= 2 and shape[-1] >= 8 and x.shape[:-1].numel() >= 2:
        rows = x.view(-1, shape[-1])
        rows[0] = 0
        rows[1, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.0])
        rows[1, 8:] = torch.arange(shape[-1] - 8) % 120 - 60.5
    return x.to(dtype)


PACK_CASES = {
    "bf16-specials": (special_floats(), "bf16"),
    "bf16-nan": (torch.tensor([float("nan"), 1.0, -float("nan")]), "bf16"),
    "bf16-from-fp16-3d-strided": (randn(6, 40, 12, seed=20, dtype=torch.float16).mT, "bf16"),
    "bf16-from-bf16": (randn(5, 33, seed=21, dtype=torch.bfloat16), "bf16"),
    **{
        f"int8-{str(dtype)[6:]}-3d": (int8_input(4, 5, 300, seed=22, dtype=dtype), "int8")
        for dtype in FLOATS
    },
    # 4100 columns: three 2048-wide column tiles, the last ragged.
    "int8-long-rows": (int8_input(3, 4100, seed=23), "int8"),
    # 700 rows of 6: 512-row tiles, the second mostly masked.
    "int8-short-rows": (int8_input(700, 6, seed=24), "int8"),
    "int8-1d": (randn(1000, seed=25), "int8"),
    "int8-strided": (int8_input(40, 30, seed=26).T[::2], "int8"),
    "int8-no-rows": (torch.zeros(0, 8), "int8"),
    "int8-no-columns": (torch.zeros(3, 0), "int8"),
    "int8-scalar": (torch.tensor(-2.5), "int8"),
}

UNPACK_CASES = {
    **{
        f"int8-to-{str(dtype)[6:]}": pack_activation_reference(
            int8_input(7, 130, seed=30, dtype=dtype), "int8"
        )
        for dtype in FLOATS
    },
    **{
        f"bf16-to-{str(dtype)[6:]}": pack_activation_reference(
            randn(3, 3000, seed=31, dtype=dtype), "bf16"
        )
        for dtype in FLOATS
    },
    "bf16-specials-to-float32": pack_activation_reference(special_floats(), "bf16"),
    "int8-long-rows": pack_activation_reference(int8_input(2, 4100, seed=32), "int8"),
}


def adamw_job(
    numel: int,
    seed: int,
    step: int = 1,
    fresh: bool = True,
    grad_dtype: torch.dtype = torch.float32,
    lowp: torch.dtype | None = None,
    backend: str = "triton",
    **hyper,
) -> dict:
    gen = torch.Generator().manual_seed(seed + 1000)
    kwargs = {
        **adamw_state(numel, seed, fresh),
        "grad": (torch.randn(numel, generator=gen) * hyper.get("grad_scale", 1.0)).to(grad_dtype),
        "step": step,
        "out_lowp": torch.zeros(numel, dtype=lowp) if lowp is not None else None,
        **{**HYPER, **hyper},
    }
    return {"op": "adamw_step", "kwargs": kwargs, "backend": backend}


# 2500 elements: three 1024-element blocks, the last ragged.
ADAMW_CASES = {
    "first-step": {"numel": 2500, "seed": 40, "weight_decay": 0.0},
    "warm-state-bf16-copy": {
        "numel": 2500,
        "seed": 41,
        "step": 7,
        "fresh": False,
        "lowp": torch.bfloat16,
    },
    "scaled-clipped-fp16-copy": {
        "numel": 1500,
        "seed": 42,
        "step": 1000,
        "fresh": False,
        "grad_scale": 1024.0,
        "clip_coef": 0.37,
        "lowp": torch.float16,
        "weight_decay": 0.1,
    },
    # The trainer's clipping: the coefficient computed on the device, read by the kernel there.
    "clip-coef-tensor": {
        "numel": 1500,
        "seed": 47,
        "step": 4,
        "fresh": False,
        "grad_scale": 2.0,
        "clip_coef": torch.tensor(0.37),
        "grad_dtype": torch.bfloat16,
        "lowp": torch.bfloat16,
    },
    "bf16-grad": {"numel": 1100, "seed": 43, "step": 3, "grad_dtype": torch.bfloat16},
    "fp16-grad": {"numel": 1100, "seed": 44, "step": 3, "grad_dtype": torch.float16},
    # beta1 = 0.3: lerp weight 0.7, torch's other branch (anchored at the gradient).
    "low-beta1": {"numel": 900, "seed": 45, "step": 2, "fresh": False, "beta1": 0.3},
    "auto": {"numel": 700, "seed": 46, "step": 5, "fresh": False, "backend": "auto"},
}


@pytest.fixture(scope="module")
def kernel_results(run_interpreted):
    """All kernel jobs of this module, run in one interpreter process (about 10 s)."""
    jobs = {f"pack/{k}": pack_job(x, fmt) for k, (x, fmt) in PACK_CASES.items()}
    jobs["pack/auto"] = pack_job(randn(4, 50, seed=50), "int8", backend="auto")
    jobs["pack/auto-bf16"] = pack_job(randn(4, 50, seed=51), "bf16", backend="auto")
    jobs["pack/cpu"] = pack_job(randn(4, 50, seed=50), "int8", backend="cpu")
    jobs.update({f"unpack/{k}": unpack_job(p) for k, p in UNPACK_CASES.items()})
    jobs.update({f"adamw/{k}": adamw_job(**case) for k, case in ADAMW_CASES.items()})
    results = run_interpreted(list(jobs.values()))
    return {
        case_id: (job, result) for (case_id, job), result in zip(jobs.items(), results, strict=True)
    }


def assert_same_floats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equal, except that any NaN matches any NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    bits = torch.int16 if actual.element_size() == 2 else torch.int32
    assert torch.equal(actual[~nan].view(bits), expected[~nan].view(bits))


def test_auto_leaves_bf16_packing_to_torch(kernel_results):
    # One rounding cast, which torch's own kernel ran faster than Triton's on an H200.
    job, result = kernel_results["pack/auto-bf16"]
    assert result.get("backend") == "reference", result
    expected = pack_activation_reference(**job["kwargs"])
    assert_same_floats(Packed(**result["out"]).data, expected.data)


@pytest.mark.parametrize("case_id", [*PACK_CASES, "auto"])
def test_triton_pack_matches_reference_exactly(kernel_results, case_id):
    job, result = kernel_results[f"pack/{case_id}"]
    assert result.get("backend") == "triton", result
    expected = pack_activation_reference(**job["kwargs"])
    packed = Packed(**result["out"])
    assert (packed.fmt, packed.shape, packed.dtype) == (
        expected.fmt,
        expected.shape,
        expected.dtype,
    )
    assert packed.data.is_contiguous()
    if expected.fmt == "bf16":
        assert packed.scales is None
        assert_same_floats(packed.data, expected.data)
    else:
        assert torch.equal(packed.data, expected.data)
        assert torch.equal(packed.scales, expected.scales)
    assert packed.nbytes == expected.nbytes


@pytest.mark.parametrize("case_id", UNPACK_CASES)
def test_triton_unpack_matches_reference_exactly(kernel_results, case_id):
    _, result = kernel_results[f"unpack/{case_id}"]
    assert result.get("backend") == "triton", result
    assert_same_floats(result["out"], unpack_activation_reference(UNPACK_CASES[case_id]))


def test_triton_cpu_backend_is_refused(kernel_results):
    assert "cpu backend has no training kernels" in kernel_results["pack/cpu"][1]["error"]


def reference_adamw(kwargs: dict) -> dict[str, torch.Tensor]:
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    adamw_step_reference(**kwargs)
    names = ("param_fp32", "exp_avg", "exp_avg_sq", "out_lowp")
    return {name: kwargs[name] for name in names if kwargs[name] is not None}


@pytest.mark.parametrize("case_id", ADAMW_CASES)
def test_triton_adamw_matches_reference(kernel_results, case_id):
    job, result = kernel_results[f"adamw/{case_id}"]
    assert result.get("backend") == "triton", result
    out, expected = result["out"], reference_adamw(job["kwargs"])
    assert torch.equal(out["exp_avg"], expected["exp_avg"])
    assert torch.equal(out["exp_avg_sq"], expected["exp_avg_sq"])
    assert ulp_distance(out["param_fp32"], expected["param_fp32"]) <= 1  # torch's CPU sqrt
    if "out_lowp" in out:  # the copy is the kernel's own weights, rounded to nearest even
        assert_same_floats(out["out_lowp"], out["param_fp32"].to(out["out_lowp"].dtype))


@pytest.mark.parametrize("case_id", ADAMW_CASES)
def test_triton_adamw_is_the_reference_with_a_correctly_rounded_sqrt(
    kernel_results, case_id, monkeypatch
):
    # sqrt of a float32 in float64, rounded once to float32, is the correctly rounded sqrt.
    torch_sqrt = torch.Tensor.sqrt
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda t: torch_sqrt(t.double()).float())
    job, result = kernel_results[f"adamw/{case_id}"]
    expected = reference_adamw(job["kwargs"])
    assert set(result["out"]) == set(expected)
    for name, tensor in expected.items():
        assert_same_floats(result["out"][name], tensor)
