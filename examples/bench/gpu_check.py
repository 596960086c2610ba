"""The CUDA path in one script: device placement, AMP (fp16 with GradScaler, bf16), penalties and
projection on the GPU, then the overhead benchmark on the GPU.

    python -m examples.bench.gpu_check [--steps 20]

Exits non-zero on the first failed check. On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

import relax_plugins as rp
from examples.bench import overhead


def check_model(spec: overhead.Spec, device: torch.device) -> list[str]:
    lines = []
    model = rp.relax(spec.build().to(device))
    rp.set_theta(model, 0.5)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == "cuda", f"{name} stayed on {t.device}"
    inputs, target = spec.batch(device)
    for dtype in (torch.float16, torch.bfloat16):
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        with torch.autocast("cuda", dtype=dtype):
            loss = spec.loss(model(*inputs).float(), target) + rp.penalty(model).float()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        grads = [p.grad for _, m in rp.relaxed_modules(model) for p in m.term.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), f"non-finite relaxation grads under {dtype}"
        lines.append(f"{spec.name}: autocast {dtype} step ok, loss {float(loss):.4f}")
    projected = rp.project(model, merge=True)
    assert not any(True for _ in rp.relaxed_modules(projected))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 0
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), "torch", torch.__version__)
    for make in overhead.SPECS.values():
        for line in check_model(make(), device):
            print(line)
    overhead.main(["--device", "cuda", "--steps", str(args.steps), "--out", "results/overhead_cuda"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
