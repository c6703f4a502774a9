import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)`` -> path of a tiny random checkpoint, built once per session."""
    from tiny_models import make_checkpoint

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_checkpoint(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get

def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (pyproject.toml's markers) skip on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


# Tiny models: one intra-op thread is fastest, and far faster on a busy machine.
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def client(server):
    """The ``openai`` client of the module's ``server`` fixture (the serving tests)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
