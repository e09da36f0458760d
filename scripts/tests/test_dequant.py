"""Our GGML dequantisers on hand-made blocks with known values, and against gguf.quants."""
import numpy as np
import pytest

import convert_gguf_llama as c


def f16_bytes(x):
    return np.array([x], np.float16).view(np.uint8)


def test_q8_0_known_block():
    q = np.arange(-16, 16, dtype=np.int8)  # 32 values
    block = np.concatenate([f16_bytes(0.5), q.view(np.uint8)])
    assert block.size == 34
    out = c.dequantize_q8_0(block)
    np.testing.assert_array_equal(out, np.arange(-16, 16, dtype=np.float32) * 0.5)


def test_q8_0_extremes_and_two_blocks():
    q1 = np.full(32, -128, np.int8)
    q2 = np.full(32, 127, np.int8)
    raw = np.concatenate([f16_bytes(2.0), q1.view(np.uint8), f16_bytes(-0.25), q2.view(np.uint8)])
    out = c.dequantize(raw, c.GGML_Q8_0, 64)
    np.testing.assert_array_equal(out[:32], -256.0)
    np.testing.assert_array_equal(out[32:], -31.75)


def test_q4_1_known_block():
    # byte j holds element j in its low nibble and element j+16 in its high nibble
    lo = np.arange(16, dtype=np.uint8)  # elements 0..15 -> 0..15
    hi = (15 - np.arange(16)).astype(np.uint8)  # elements 16..31 -> 15..0
    qs = lo | (hi << 4)
    block = np.concatenate([f16_bytes(0.25), f16_bytes(-1.0), qs])
    assert block.size == 20
    out = c.dequantize_q4_1(block)
    expect = np.concatenate([np.arange(16) * 0.25 - 1.0, (15 - np.arange(16)) * 0.25 - 1.0]).astype(np.float32)
    np.testing.assert_array_equal(out, expect)


def test_q4_1_single_nibble_positions():
    qs = np.zeros(16, np.uint8)
    qs[3] = 0x70  # element 3 -> 0, element 19 -> 7
    qs[5] = 0x0A  # element 5 -> 10, element 21 -> 0
    block = np.concatenate([f16_bytes(1.0), f16_bytes(0.5), qs])
    out = c.dequantize_q4_1(block)
    expect = np.full(32, 0.5, np.float32)
    expect[19] = 7.5
    expect[5] = 10.5
    np.testing.assert_array_equal(out, expect)


def test_q4_0_known_block():
    qs = (np.arange(16, dtype=np.uint8)) | (np.full(16, 8, np.uint8) << 4)
    block = np.concatenate([f16_bytes(2.0), qs])
    out = c.dequantize_q4_0(block)
    expect = np.concatenate([(np.arange(16) - 8) * 2.0, np.zeros(16)]).astype(np.float32)
    np.testing.assert_array_equal(out, expect)


def test_float_types():
    x = np.array([1.5, -2.0, 3.25, 0.0], np.float32)
    np.testing.assert_array_equal(c.dequantize(x, c.GGML_F32, 4), x)
    np.testing.assert_array_equal(c.dequantize(x.astype(np.float16).view(np.uint8), c.GGML_F16, 4), x)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(c.dequantize(bf16.view(np.uint8), c.GGML_BF16, 4), x)


def test_wrong_sizes_raise():
    with pytest.raises(ValueError):
        c.dequantize_q4_1(np.zeros(21, np.uint8))
    with pytest.raises(ValueError):
        c.dequantize(np.zeros(34, np.uint8), c.GGML_Q8_0, 64)
    with pytest.raises(NotImplementedError):
        c.dequantize(np.zeros(34, np.uint8), 12, 256)  # Q4_K


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_0"])
def test_matches_gguf_reference(qtype):
    from gguf import GGMLQuantizationType, quants

    t = getattr(GGMLQuantizationType, qtype)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 96)).astype(np.float32)
    raw = quants.quantize(data, t)  # [6, bytes per row]
    ref = quants.dequantize(raw, t).astype(np.float32)
    ours = c.dequantize(raw, int(t), data.size).reshape(data.shape)
    np.testing.assert_array_equal(ours, ref)
    # and the quantisation error is what the format allows
    assert np.max(np.abs(ours - data)) < (0.05 if qtype == "Q8_0" else 0.6)
