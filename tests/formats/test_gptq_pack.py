"""GPTQ packing: bit-exact round trips, the published word layout, and clear refusals."""

import pytest
import torch

from memtool.errors import MemtoolError
from memtool.formats.gptq_pack import (
    pack_along_cols,
    pack_along_rows,
    pack_gptq,
    unpack_along_rows,
    unpack_gptq,
)
from memtool.formats.synthetic import random_gptq_layer

BITS = (2, 3, 4, 8)


def random_layer(bits: int, in_features: int, out_features: int, group_size: int, sym: bool):
    gen = torch.Generator().manual_seed(bits * 1000 + in_features + sym)
    layer = random_gptq_layer(
        bits, in_features, out_features, group_size, gen, sym=sym, scale_range=0.05
    )
    return layer.q, layer.zeros, layer.scales, layer.g_idx


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_is_bit_exact_with_ragged_groups(bits, sym):
    # 576 = 4 full groups of 128 and a last group of 64.
    q, zeros, scales, g_idx = random_layer(bits, 576, 96, 128, sym)
    packed = pack_gptq(q, zeros, scales, g_idx, bits)

    assert packed["qweight"].shape == (576 * bits // 32, 96)
    assert packed["qzeros"].shape == (5, 96 * bits // 32)
    assert packed["qweight"].dtype == packed["qzeros"].dtype == torch.int32
    assert packed["scales"].dtype == torch.float16 and packed["g_idx"].dtype == torch.int32

    q2, zeros2, scales2, g_idx2 = unpack_gptq(packed, bits, 576, 96)
    assert torch.equal(q2, q.int())
    assert torch.equal(zeros2, zeros.int())
    assert torch.equal(scales2, scales.half())
    assert torch.equal(g_idx2, g_idx.int())


@pytest.mark.parametrize("bits", BITS)
def test_packing_is_a_little_endian_bit_stream(bits):
    # An independent oracle, one bit at a time: bit b of value k is stream bit k * bits + b,
    # and stream bit s is bit s % 32 of word s // 32.
    values = torch.randint(0, 1 << bits, (64, 3), generator=torch.Generator().manual_seed(bits))
    expected = torch.zeros(64 * bits // 32, 3, dtype=torch.int64)
    for k in range(64):
        for col in range(3):
            for b in range(bits):
                if (int(values[k, col]) >> b) & 1:
                    s = k * bits + b
                    expected[s // 32, col] |= 1 << (s % 32)
    expected = torch.where(expected >= 2**31, expected - 2**32, expected).int()
    assert torch.equal(pack_along_rows(values, bits), expected)
    assert torch.equal(pack_along_cols(values.t(), bits), expected.t())


# Expected words computed with AutoGPTQ's `QuantLinear.pack`
# (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py) for the codes i % 2**bits, i = 0..31.
GOLDEN_WORDS = {
    # Eight nibbles per word, value j at bits 4j; codes 0..15 fill two words, twice.
    4: [0x76543210, 0xFEDCBA98 - 2**32, 0x76543210, 0xFEDCBA98 - 2**32],
    # 10-1-10-1-10: value 10 (=2) puts its low bits at 30..31 of word 0, its high bit at bit 0
    # of word 1; value 21 (=5) puts its low bit at 31 of word 1, its high bits at 0..1 of word 2.
    3: [0x88FAC688 - 2**32, 0xC688FAC6 - 2**32, 0xFAC688FA - 2**32],
}


@pytest.mark.parametrize("bits", sorted(GOLDEN_WORDS))
def test_golden_words_match_published_gptq_layout(bits):
    codes = torch.arange(32) % (1 << bits)
    words = torch.tensor(GOLDEN_WORDS[bits], dtype=torch.int32)
    q = codes[:, None].expand(32, 32)  # every output column holds the same 32 codes
    zeros = (codes + 1)[None, :]  # one group; stored zero - 1 = the same codes along out
    packed = pack_gptq(q, zeros, torch.ones(1, 32), torch.zeros(32, dtype=torch.int32), bits)

    assert torch.equal(packed["qweight"], words[:, None].expand(-1, 32))
    assert torch.equal(packed["qzeros"], words[None, :])


def test_symmetric_4bit_zero_is_stored_as_seven():
    q = torch.zeros(32, 32, dtype=torch.int32)
    zeros = torch.full((1, 32), 8)
    packed = pack_gptq(q, zeros, torch.ones(1, 32), torch.zeros(32, dtype=torch.int32), 4)
    assert torch.equal(packed["qzeros"], torch.full((1, 4), 0x77777777, dtype=torch.int32))


def test_arbitrary_g_idx_is_kept_as_given():
    q, zeros, scales, g_idx = random_layer(4, 64, 32, 16, sym=False)
    shuffled = g_idx[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    packed = pack_gptq(q, zeros, scales, shuffled, 4)
    assert torch.equal(unpack_gptq(packed, 4, 64, 32)[3], shuffled.int())


def _args(in_features=64, out_features=32, bits=4, n_groups=1):
    return (
        torch.zeros(in_features, out_features, dtype=torch.int32),
        torch.ones(n_groups, out_features, dtype=torch.int32),
        torch.ones(n_groups, out_features),
        torch.zeros(in_features, dtype=torch.int32),
        bits,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (_args(in_features=48), "in_features=48 is not a positive multiple of 32"),
        (_args(out_features=40), "out_features=40 is not a positive multiple of 32"),
        (_args(bits=5), "bits=5 is not supported"),
    ],
)
def test_layout_limits_are_refused_by_name(args, message):
    with pytest.raises(MemtoolError, match=message):
        pack_gptq(*args)


def test_out_of_range_values_are_refused():
    q, zeros, scales, g_idx, _ = _args()
    with pytest.raises(MemtoolError, match="zero point of 0 cannot be stored"):
        pack_gptq(q, zeros - 1, scales, g_idx, 4)
    with pytest.raises(MemtoolError, match=r"codes must lie in \[0, 15\]"):
        pack_gptq(q + 16, zeros, scales, g_idx, 4)
    with pytest.raises(MemtoolError, match="g_idx values"):
        pack_gptq(q, zeros, scales, g_idx + 1, 4)


def test_unpack_refuses_tensors_that_do_not_fit():
    packed = pack_gptq(*_args())
    with pytest.raises(MemtoolError, match="qweight must be"):
        unpack_gptq(packed, 4, 96, 32)
    with pytest.raises(MemtoolError, match="missing"):
        unpack_gptq({"qweight": packed["qweight"]}, 4, 64, 32)
    with pytest.raises(MemtoolError, match="cannot unpack"):
        unpack_along_rows(packed["qweight"], 3, 64)
