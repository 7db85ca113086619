"""Train the E2E-VarNet (:mod:`models.varnet`) on MNI152-simulated multi-coil k-space.

    python -m models.train_varnet --minutes 45 --out models/weights/varnet_mni152.pt

Runs on the CPU at small scale (batch 1, 8 virtual coils, mostly 128 x 128 slices with some
256 x 256) and on a GPU when one is there (``--device cuda``). The data are simulated per
step from a bank of noise-free slices (:mod:`models.data`): random slice, flips/transpose,
global phase, SNR 15..80, R in :data:`ACCELERATIONS` with the equispaced pattern shifted at
random, 24/256 ACS lines. The loss is fastMRI's: ``1 - SSIM`` (7 x 7 window) plus L1, on RSS
images divided by the input scale. Adam, learning rate warm-up then cosine decay over the
time budget. Checkpoints are written every ``--checkpoint-minutes`` (atomic replace) with the
configuration and the validation NRMSE at R=8 on held-out slices.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from models.data import acs_lines_for, input_scale, make_bank, make_sample
from models.varnet import VarNet

log = logging.getLogger("train_varnet")

ACCELERATIONS = (4, 5, 6, 8, 10, 12)


def ssim_loss(output: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor, win: int = 7) -> torch.Tensor:
    """``1 - SSIM`` of ``(batch, y, x)`` images (Wang et al. 2004; fastMRI's uniform window)."""
    k1, k2 = 0.01, 0.03
    x, y = output.unsqueeze(1), target.unsqueeze(1)
    kernel = torch.ones(1, 1, win, win, dtype=x.dtype, device=x.device) / win ** 2
    n = win ** 2
    cov = n / (n - 1)
    ux, uy = F.conv2d(x, kernel), F.conv2d(y, kernel)
    uxx, uyy, uxy = F.conv2d(x * x, kernel), F.conv2d(y * y, kernel), F.conv2d(x * y, kernel)
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return 1 - s.mean()


def to_tensors(sample, device: str):
    """Scaled network inputs and target for one :class:`models.data.Sample`."""
    scale = input_scale(sample.kspace, sample.acs)
    k = torch.from_numpy(sample.kspace / scale).unsqueeze(0).to(device)
    mask = torch.from_numpy(sample.sampled.astype(np.float32)).view(1, 1, -1, 1).to(device)
    acs = torch.from_numpy(sample.acs.astype(np.float32)).view(1, 1, -1, 1).to(device)
    target = torch.from_numpy(sample.target / scale).unsqueeze(0).to(device)
    return k, mask, acs, target


def nrmse(output: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(output - target) / np.linalg.norm(target))


def validate(net: VarNet, bank, device: str, acceleration: int = 8) -> float:
    rng = np.random.default_rng(1234)
    errors = []
    net.eval()
    with torch.inference_mode():
        for i in range(len(bank)):
            sample = make_sample(bank, i, acceleration, rng, snr=40.0, augment=False)
            k, mask, acs, target = to_tensors(sample, device)
            out = net.image(k, mask, acs)
            errors.append(nrmse(out[0].cpu().numpy(), target[0].cpu().numpy()))
    net.train()
    return float(np.mean(errors))


def save(net: VarNet, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"config": net.config, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "meta": meta}, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=45.0, help="training time budget [min]")
    ap.add_argument("--out", type=Path, default=Path("models/weights/varnet_mni152.pt"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cascades", type=int, default=8)
    ap.add_argument("--chans", type=int, default=8)
    ap.add_argument("--pools", type=int, default=3)
    ap.add_argument("--sens-chans", type=int, default=0)
    ap.add_argument("--p256", type=float, default=0.25, help="fraction of steps on 256 x 256 slices")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, help="start from this checkpoint (fine-tuning)")
    ap.add_argument("--vary-acs", type=float, default=0.0,
                    help="fraction of steps with a random ACS width, 6..20 %% of the matrix (scanners differ)")
    ap.add_argument("--warmup-steps", type=int, default=200)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    banks = {128: make_bank(128, split="train", slices=40, seeds=(0, 1))}
    if args.p256 > 0:
        banks[256] = make_bank(256, split="train", slices=30, seeds=(2,))
    val = make_bank(128, split="test", slices=40, seeds=(9,), contrasts=("t1w",))
    log.info("banks: %s slices, validation %d, %.0f s", {m: len(b) for m, b in banks.items()}, len(val), time.perf_counter() - t0)

    net = VarNet(args.cascades, args.chans, args.pools, args.sens_chans)
    history = []
    if args.init is not None:
        ckpt = torch.load(args.init, map_location="cpu", weights_only=True)
        net = VarNet(**ckpt["config"])
        net.load_state_dict(ckpt["state_dict"])
        history = [*ckpt["meta"].get("history", []), {k: v for k, v in ckpt["meta"].items() if k != "history"}]
    net = net.to(args.device)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    budget = args.minutes * 60
    start = time.perf_counter()
    last_ckpt = start
    step, losses = 0, []
    meta = {"steps": 0, "accelerations": ACCELERATIONS, "acs_lines": {m: acs_lines_for(m) for m in banks},
            "vary_acs": args.vary_acs, "lr": args.lr, "history": history}
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = max(lr, 1e-6)
        matrix = 256 if (256 in banks and rng.random() < args.p256) else 128
        bank = banks[matrix]
        acs_lines = None
        if rng.random() < args.vary_acs:
            acs_lines = 2 * int(rng.integers(round(0.03 * matrix), round(0.10 * matrix) + 1))
        sample = make_sample(bank, int(rng.integers(len(bank))), int(rng.choice(ACCELERATIONS)), rng, acs_lines=acs_lines)
        k, mask, acs, target = to_tensors(sample, args.device)
        out = net.image(k, mask, acs)
        data_range = target.amax(dim=(1, 2)).view(-1, 1, 1, 1)
        loss = ssim_loss(out, target, data_range) + F.l1_loss(out, target) / data_range.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log.info("step %d  %.1f min  lr %.2e  loss %.4f", step, elapsed / 60, lr, float(np.mean(losses[-100:])))
        if time.perf_counter() - last_ckpt >= args.checkpoint_minutes * 60:
            meta.update(steps=step, minutes=elapsed / 60, val_nrmse_r8=validate(net, val, args.device))
            log.info("checkpoint: validation NRMSE at R=8 %.4f", meta["val_nrmse_r8"])
            save(net, args.out, meta)
            last_ckpt = time.perf_counter()
    meta.update(steps=step, minutes=(time.perf_counter() - start) / 60, val_nrmse_r8=validate(net, val, args.device),
                device=args.device, torch=str(torch.__version__))
    save(net, args.out, meta)
    log.info("done: %s", json.dumps(meta))


if __name__ == "__main__":
    main()
