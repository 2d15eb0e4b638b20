"""The teacher run's files: atomic JSON, resumable checkpoints (model, optimizer, scheduler, RNG, step), the
final safetensors export and the JSON-lines run log. Every write goes to a temporary name first and is renamed
into place, so a run stopped at any moment leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def atomic_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def rng_state() -> dict[str, object]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, train_seconds: float,
                    fingerprint: str, args: argparse.Namespace) -> float:
    t0 = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step,
                "train_seconds": train_seconds, "mix_fingerprint": fingerprint,
                "args": vars(args)}, tmp)
    os.replace(tmp, path)
    return time.time() - t0


def save_final(out: Path, model: nn.Module, teacher_dir: Path, info: dict) -> Path:
    from safetensors.torch import save_file

    final = out / "final"
    tmp = out / "final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    model.encoder.config.to_json_file(str(tmp / "config.json"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (teacher_dir / name).exists():
            shutil.copy2(teacher_dir / name, tmp / name)
    atomic_json(tmp / "teacher.json", info)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


class Log:
    def __init__(self, path: Path):
        self.handle = path.open("a", encoding="utf-8")

    def __call__(self, **record) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | record
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
