"""Codes held packed in memory: exact round trips, the bytes they take, row slices."""

import pytest
import torch

from memtool.formats.quantized_weight import QuantizedWeight, pack_codes, slot_bits, unpack_codes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 3, 575, 576])
def test_packed_codes_round_trip_exactly(bits, cols):
    codes = torch.randint(0, 2**bits, (7, cols), generator=torch.Generator().manual_seed(cols))
    packed = pack_codes(codes.to(torch.uint8), bits)
    per_byte = 8 // slot_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, -(-cols // per_byte))
    assert torch.equal(unpack_codes(packed, bits, cols), codes.to(torch.uint8))


def test_slots_are_powers_of_two():
    assert [slot_bits(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="9 bits"):
        slot_bits(9)


@pytest.mark.parametrize(("bits", "per_byte"), [(2, 4), (3, 2), (4, 2), (8, 1)])
def test_a_weight_holds_its_codes_packed_and_reads_them_back(bits, per_byte):
    codes = torch.randint(0, 2**bits, (6, 64), generator=torch.Generator().manual_seed(bits))
    scales = torch.rand(6, 2) + 0.5
    zeros = torch.full((6, 2), 2 ** (bits - 1), dtype=torch.int32)
    g_idx = (torch.arange(64) // 32).to(torch.int32)
    weight = QuantizedWeight(codes.float(), scales, zeros, g_idx, bits, 32, True)
    assert weight.packed_codes.nbytes == 6 * 64 // per_byte and weight.shape == (6, 64)
    assert torch.equal(weight.codes, codes.to(torch.uint8))
    want = scales[:, g_idx.long()] * (codes.float() - zeros[:, g_idx.long()].float())
    assert torch.equal(weight.dequantize(), want)
    part = weight.rows(2, 5)
    assert part.shape == (3, 64) and torch.equal(part.codes, weight.codes[2:5])
    assert torch.equal(part.dequantize(), want[2:5]) and part.bits == bits
