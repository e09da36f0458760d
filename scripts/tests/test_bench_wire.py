"""scripts/bench_wire.py: the safetensors reader, the parts of a client artifact and the int8 sizes."""
import json
import struct

import pytest

import bench_wire


def safetensors(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A safetensors file of zero-filled tensors (name -> (dtype, shape))."""
    size = {"BF16": 2, "F32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = size[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(offset)


def test_parts_and_int8_sizes_of_a_client_artifact():
    data = safetensors({
        "shared.slot0.gate.weight": ("BF16", [4, 8]),
        "family.layer1.down.weight": ("BF16", [8, 32]),
        "bridge.head.weight": ("BF16", [6, 16]),
        "pool.probs": ("BF16", [10, 6]),
    })
    sizes = bench_wire.Sizes()
    bench_wire.measure(data, len, sizes)
    assert sizes.artifacts == 1 and sizes.file == len(data) == sizes.file_zstd
    assert dict(sizes.parts) == {"own": 2 * (32 + 256), "bridge": 2 * 96, "pool": 2 * 60}
    # int8: one byte a value and a 4-byte scale per tensor; the pool stays as it is
    assert dict(sizes.parts_int8) == {"own": 32 + 4 + 256 + 4, "bridge": 96 + 4, "pool": 120}
    table = bench_wire.table({"m": sizes}, 3)
    assert "| m | 1 |" in table and "(1.00×)" in table


def test_a_damaged_file_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="runs past the file"):
        bench_wire.read_safetensors(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="8-byte"):
        bench_wire.read_safetensors(b"abc")


def test_rounds_before_the_first_wanted_are_left_out(tmp_path):
    for r in (1, 2):
        d = tmp_path / f"round-{r:04d}" / "clients" / "edge"
        d.mkdir(parents=True)
        data = safetensors({"head.weight": ("F32", [2, 2])})
        (d / "data-abc.safetensors").write_bytes(data)
        (d / "manifest.json").write_text(json.dumps({"family": "tiny-bert.ab12", "artifact": {"sha256": "abc"}}))
    got = list(bench_wire.client_artifacts(tmp_path, 2))
    assert [m for m, _ in got] == ["tiny-bert"]
