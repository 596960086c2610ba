"""The hand-written relaxation of ``examples.bench.floor`` computes what the library's relaxed model
computes (else its times would not be the floor of the same method)."""

from __future__ import annotations

import copy

import pytest
import torch

import relax_plugins as rp

pytest.importorskip("e3nn")


@pytest.mark.parametrize("rank", [None, 2])
def test_hand_relaxed_equals_library(rank):
    from examples.bench.floor import hand_relaxed
    from examples.nbody.model import SEGNN

    torch.manual_seed(0)
    base = SEGNN("4x0e + 2x1o", layers=1)
    lib = rp.relax(copy.deepcopy(base), rank=rank, init_std=0.3)
    rp.set_theta(lib, 0.5)
    names = [n for n, m in lib.named_modules() if isinstance(m, rp.RelaxedModule)]
    hand = hand_relaxed(base, names, rank, 0.5)
    with torch.no_grad():  # the library's W (B·A, or dense) into the hand-written model's parameters
        it = iter(hand.hand_w)
        for name in names:
            term = lib.get_submodule(name).term
            if rank is None:
                next(it).copy_(term.weight)
            else:
                next(it).copy_(term.lora_a)
                next(it).copy_(term.lora_b)
    inputs = (torch.randn(3, 5, 3), torch.randn(3, 5, 3), torch.ones(3, 5, 1))
    out_hand, out_lib, out_base = hand(*inputs), lib(*inputs), base(*inputs)
    assert not torch.allclose(out_lib, out_base, atol=1e-4)  # W is not zero: the comparison means something
    torch.testing.assert_close(out_hand, out_lib, rtol=1e-5, atol=1e-5)
