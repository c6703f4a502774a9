"""MegaBlocks grouped GEMM backend against the einsum reference (CUDA + megablocks only)."""
import pytest
import torch

from experts import Activation, GroupedExperts, moe_reference
from experts.megablocks_backend import megablocks_available
from parallel import LocalDispatcher, init_single_process

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not megablocks_available(), reason="needs CUDA and the megablocks package")]


def test_megablocks_matches_reference():
    init_single_process()
    torch.manual_seed(0)
    E, D, F, T, K = 8, 128, 256, 33, 2
    ex = GroupedExperts(E, D, F, activation=Activation(), dtype=torch.bfloat16, backend="megablocks").cuda()
    ex.w13.data.normal_(0, 0.05)
    ex.w2.data.normal_(0, 0.05)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, E, (T, K), device="cuda")
    w = torch.rand(T, K, device="cuda")
    disp = LocalDispatcher(E)
    x_RD, counts, meta = disp.dispatch(x, ids, w)
    y = disp.combine(ex(x_RD, counts), meta)
    ref = moe_reference(x, ex.w13, ex.w2, w, ids)
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)
