"""Training throughput (images per second, same batch) of the real training step, per variant.

Runs :func:`promptseg.train.step_losses` (forward, presence on every known pair, mask decoder on
positives, backward, AdamW step) on real batches from the training bank, for each variant in
one process so the numbers compare:

    python bench/train_throughput.py --steps 12 --warmup 3 --json results/bench/train_throughput.json

Variants: ``small`` (CBAM at every level, the previous default) and ``default`` (CBAM at the two
coarsest levels), each in NCHW and channels_last, plus bf16 autocast where the CPU has native
bf16 and ``torch.compile`` (falls back to eager when it fails).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _variants(bf16: bool, compile_: bool) -> list[dict]:
    rows = [
        {"name": "small NCHW", "preset": "small", "channels_last": False},
        {"name": "small channels_last", "preset": "small", "channels_last": True},
        {"name": "default NCHW", "preset": "default", "channels_last": False},
        {"name": "default channels_last", "preset": "default", "channels_last": True},
    ]
    if bf16:
        rows.append(
            {
                "name": "default channels_last bf16",
                "preset": "default",
                "channels_last": True,
                "bf16": True,
            }
        )
    if compile_:
        rows.append(
            {
                "name": "default channels_last compile",
                "preset": "default",
                "channels_last": True,
                "compile": True,
            }
        )
    return rows


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX) on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure(variant: dict, steps: int, warmup: int, batch: int, bank, embeddings, vocab) -> dict:
    from promptseg.losses import build_loss
    from promptseg.model.unet import PromptSegModel, preset_config
    from promptseg.train import TargetSampler, TrainConfig, make_batch, step_losses

    cfg = TrainConfig(preset=variant["preset"], batch=batch, progress=False)
    torch.manual_seed(0)
    model = PromptSegModel(preset_config(variant["preset"]), 384)
    fmt = torch.channels_last if variant.get("channels_last") else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = build_loss("dice_bce_pos")
    sampler = TargetSampler(bank, cfg.uniform_fraction)
    fn = step_losses
    note = ""
    if variant.get("compile"):
        try:
            fn = torch.compile(step_losses, dynamic=True)
        except Exception as exc:  # noqa: BLE001
            note = f"compile failed: {exc}"
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        b = make_batch(bank, sampler, cfg, embeddings, vocab, i)
        b.images = b.images.contiguous(memory_format=fmt)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(variant.get("bf16"))):
                loss, _ = fn(model, b, loss_fn, 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported
            return {**variant, "error": " ".join(str(exc).split())[:200]}
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        **variant,
        "median_step_s": med,
        "images_per_s": batch / med,
        "steps": steps,
        **({"note": note} if note else {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from promptseg.data.bank import build_bank
    from promptseg.model.text import DEFAULT_ENCODER, TextEncoder
    from promptseg.preprocess import Preprocessing
    from promptseg.prompts import PromptVocabulary

    vocab = PromptVocabulary()
    enc = TextEncoder(DEFAULT_ENCODER)
    embeddings = enc.embed_unique(list(vocab.all_prompts()))
    bank = build_bank(
        Path(args.data_root), ["brain-tumor", "chaos-mr"], "tune", Preprocessing(128), False
    )
    rows = []
    for variant in _variants(cpu_has_bf16(), args.compile):
        row = measure(variant, args.steps, args.warmup, args.batch, bank, embeddings, vocab)
        rows.append(row)
        rate = f"{row['images_per_s']:.1f} images/s" if "images_per_s" in row else row["error"]
        print(f"{row['name']:32s} {rate}", flush=True)
    base = rows[0].get("images_per_s")
    for row in rows:
        if base and "images_per_s" in row:
            row["speedup_vs_first"] = row["images_per_s"] / base
    report = {
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
