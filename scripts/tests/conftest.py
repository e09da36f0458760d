"""Shared fixtures for the asset/converter tests.

Unit tests build their inputs (quant blocks, tiny ONNX graphs, tiny GGUF files, TREC lines) by
hand. Integration tests read the real cache made by scripts/setup.sh; they are skipped, with the
reason printed, only when that cache is absent.
"""
import os
import sys

import pytest

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_root() -> str:
    import assets

    return assets.default_cache()


@pytest.fixture(scope="session")
def cache():
    """The real cache; skips the test when scripts/setup.sh has not been run."""
    import assets

    root = cache_root()
    missing = [o.path for o in assets.OUTPUTS if assets.stamp_problem(root, o)]
    if missing:
        msg = f"HeteroTune cache incomplete at {root} (missing {', '.join(missing)}): run scripts/setup.sh"
        if os.environ.get("HETEROTUNE_REQUIRE_CACHE") == "1":
            pytest.fail(msg + " [HETEROTUNE_REQUIRE_CACHE=1]")
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def wheel_path():
    """Path of a verified source wheel in the cache, or skip."""
    import assets

    def get(name):
        w = assets.WHEELS[name]
        for cand in assets._wheel_candidates(os.path.join(cache_root(), "wheels"), w):
            return cand
        msg = f"wheel {w.spec} not in {cache_root()}/wheels: run scripts/setup.sh"
        if os.environ.get("HETEROTUNE_REQUIRE_CACHE") == "1":
            pytest.fail(msg + " [HETEROTUNE_REQUIRE_CACHE=1]")
        pytest.skip(msg)

    return get
