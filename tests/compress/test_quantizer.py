import pytest
import torch

from memtool.compress.quantizer import fit_params, rtn_quantize
from memtool.errors import MemtoolError


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_within_half_a_step(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(64, 576)
    q = rtn_quantize(w, bits, 128, sym)
    assert q.codes.shape == (64, 576) and q.scales.shape == (64, 5)  # ragged: 4 x 128 + 64
    assert int(q.codes.max()) <= 2**bits - 1
    step = q.scales[:, q.g_idx.long()]
    err = (q.dequantize() - w).abs()
    # Inside the group's range the error is at most half a step (plus float16 scale rounding).
    assert (err <= step * 0.5 + 1e-6).float().mean() > 0.99
    if sym:
        assert (q.zeros == 2 ** (bits - 1)).all()
    else:
        assert int(q.zeros.min()) >= 1


def test_ragged_last_group_has_its_own_parameters():
    w = torch.randn(4, 576)
    w[:, 512:] *= 100  # only the last (64-column) group is large
    q = rtn_quantize(w, 4, 128, sym=True)
    assert (q.g_idx[512:] == 4).all() and (q.g_idx[:128] == 0).all()
    assert (q.scales[:, 4] > 20 * q.scales[:, :4].max(dim=1).values).all()


def test_per_channel_group():
    q = rtn_quantize(torch.randn(8, 96), 4, -1, sym=False)
    assert q.scales.shape == (8, 1) and q.group_size == 96


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    errors = [(rtn_quantize(w, b, 64, True).dequantize() - w).pow(2).mean() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_scales_are_float16_exact():
    scale, _ = fit_params(torch.randn(16, 128), 4, sym=True)
    assert torch.equal(scale, scale.half().float())


def test_unsupported_bits():
    with pytest.raises(MemtoolError, match="--bits 5"):
        rtn_quantize(torch.randn(4, 32), 5, 32, True)
