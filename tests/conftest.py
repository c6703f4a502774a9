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

@pytest.fixture
def one_calls(monkeypatch):
    """``one_calls(plan_cls)`` -> a list that gets, for each one-call half-layer of that plan class
    (``cpu_kernels.GqaToken``, ``MlaToken``, ``MoeToken``, ...) a captured step runs, whether it ran:
    from Python (the plan's call: False where it declined) or from the C loop
    (``cpu_kernels.DecodeStep``: True for each half it ran, one step or each of a multi-step call's).
    ``one_calls(plan_cls, off=True)``
    turns them off instead: every such half takes its op-by-op path."""
    import cpu_kernels
    from cpu_kernels import step

    def hook(plan_cls, off: bool = False) -> list[bool]:
        calls: list[bool] = []
        if off:
            monkeypatch.setattr(plan_cls, "__call__", lambda *a, **k: None)
            monkeypatch.delitem(step.KINDS, plan_cls)
            return calls
        real_plan, real_step = plan_cls.__call__, cpu_kernels.DecodeStep._run
        real_steps = cpu_kernels.DecodeStep.decode_steps

        def plan_call(*a, **k):
            out = real_plan(*a, **k)
            calls.append(out is not None)
            return out

        def step_run(self, start, *a):
            out = real_step(self, start, *a)
            if out is not None:
                calls.extend(True for p in self.plans[start:out[0]] if isinstance(p, plan_cls))
            return out

        def decode_steps(self, *a, **k):
            out = real_steps(self, *a, **k)
            calls.extend(True for _ in out[0] for p in self.plans if isinstance(p, plan_cls))
            return out

        monkeypatch.setattr(plan_cls, "__call__", plan_call)
        monkeypatch.setattr(cpu_kernels.DecodeStep, "_run", step_run)
        monkeypatch.setattr(cpu_kernels.DecodeStep, "decode_steps", decode_steps)
        return calls

    return hook


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
