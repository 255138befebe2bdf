"""AWQ GEMM packing: the published word layout, bit-exact round trips, the runtime module."""

import pytest
import torch

from memtool.errors import MemtoolError
from memtool.formats.awq_linear import AWQLinear
from memtool.formats.awq_pack import dequantize_awq, pack_awq, pack_awq_cols, unpack_awq


def test_golden_words_follow_autoawq_packing_formula():
    # AutoAWQ WQLinear_GEMM.from_linear: qweight[:, c] |= q[:, 8c + order[i]] << 4i with
    # order = [0, 2, 4, 6, 1, 3, 5, 7]; worked out by hand, nibbles from the lowest:
    # row 0 codes 1..8 -> nibbles 1,3,5,7,2,4,6,8 -> 0x86427531;
    # row 1 puts 15 in column 0 (nibble 0), row 2 in column 1 (nibble 4), row 3 in column 7.
    codes = torch.zeros(4, 16, dtype=torch.int32)
    codes[0, :8] = torch.arange(1, 9)
    codes[1, 0] = 15
    codes[2, 1] = 15
    codes[3, 7] = 15
    codes[0, 8:] = torch.arange(1, 9)  # the second word of a row packs the same way
    expected = torch.tensor(
        [
            [-2042464975, -2042464975],  # 0x86427531 as int32
            [15, 0],  # 0x0000000F
            [983040, 0],  # 0x000F0000
            [-268435456, 0],  # 0xF0000000
        ],
        dtype=torch.int32,
    )
    assert torch.equal(pack_awq_cols(codes), expected)


def _random_layer(in_features=256, out_features=96, group_size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_groups = in_features // group_size
    q = torch.randint(0, 16, (in_features, out_features), generator=gen)
    zeros = torch.randint(0, 16, (n_groups, out_features), generator=gen)  # 0 is storable
    scales = (torch.rand(n_groups, out_features, generator=gen) * 0.05 + 1e-3).half()
    return q, zeros, scales


def test_round_trip_is_bit_exact():
    q, zeros, scales = _random_layer()
    packed = pack_awq(q, zeros, scales)
    assert packed["qweight"].shape == (256, 12) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (4, 12) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].shape == (4, 96) and packed["scales"].dtype == torch.float16
    q2, zeros2, scales2 = unpack_awq(packed)
    assert torch.equal(q2, q.int()) and torch.equal(zeros2, zeros.int())
    assert torch.equal(scales2, scales)


def test_dequantize_is_the_group_formula():
    q, zeros, scales = _random_layer(group_size=32)
    weight = dequantize_awq(**pack_awq(q, zeros, scales))
    groups = torch.arange(256) // 32
    expected = scales.float()[groups] * (q - zeros[groups]).float()
    assert torch.equal(weight, expected)


def test_awq_linear_computes_x_w_plus_b():
    q, zeros, scales = _random_layer()
    bias = torch.randn(96)
    module = AWQLinear.from_tensors({**pack_awq(q, zeros, scales), "bias": bias})
    x = torch.randn(2, 3, 256)
    weight = dequantize_awq(module.qweight, module.qzeros, module.scales)
    torch.testing.assert_close(module(x), x @ weight + bias)
    assert module.logical_weight_count() == 256 * 96 + 96
    # 4 bits per weight, plus float16 scales and packed zeros per group, plus the bias.
    assert module.weight_storage_bytes() == 256 * 96 // 2 + 4 * 96 * 2 + 4 * 96 // 2 + 96 * 4


@pytest.mark.parametrize(
    ("q", "zeros", "match"),
    [
        (torch.zeros(64, 12, dtype=torch.int32), torch.zeros(2, 12, dtype=torch.int32), "8"),
        (torch.full((64, 16), 16), torch.zeros(2, 16, dtype=torch.int32), r"\[0, 15\]"),
        (torch.zeros(64, 16, dtype=torch.int32), torch.zeros(3, 16, dtype=torch.int32), "equal"),
    ],
    ids=["out-not-multiple-of-8", "code-out-of-range", "ragged-groups"],
)
def test_refuses_what_the_layout_cannot_hold(q, zeros, match):
    with pytest.raises(MemtoolError, match=match):
        pack_awq(q, zeros, torch.ones(zeros.shape))
