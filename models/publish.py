"""Publish trained weights: write ``models/<name>.json`` with the checkpoint's sha256.

    python -m models.publish varnet_mni152

The inference engine (:mod:`inline.inference.registry`) refuses weights whose sha256 does
not match this sidecar, so a checkpoint changed after publication never reaches an image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def publish(name: str, weights: str | None = None) -> Path:
    """Hash ``weights`` (default ``weights/<name>.pt``) and write the sidecar; returns its path."""
    rel = weights or f"weights/{name}.pt"
    path = HERE / rel
    blob = path.read_bytes()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    params = sum(v.numel() for v in ckpt["state_dict"].values())
    sidecar = HERE / f"{name}.json"
    sidecar.write_text(json.dumps({
        "weights": rel,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "parameters": int(params),
        "config": ckpt["config"],
        "training": {k: v for k, v in ckpt["meta"].items() if k != "history"},
        "history": ckpt["meta"].get("history", []),
    }, indent=2) + "\n")
    return sidecar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--weights", help="path relative to models/ (default weights/NAME.pt)")
    args = ap.parse_args()
    print(publish(args.name, args.weights))


if __name__ == "__main__":
    main()
