"""Train the toy dual encoder contrastively on whole-scene captions (CLIP's symmetric loss).

    OMP_NUM_THREADS=2 python -m retclip.toyworld.train \
        --out src/retclip/data/toy/toy_dual_encoder.safetensors

The command, seed, data settings, thread count and final loss are recorded in the JSON beside
the weights. The defaults (12 000 scenes, 1 400 steps of 128) finish in under five minutes on two
CPU cores; with two threads the result may differ from run to run in the last bits.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from retclip.backbones.toy_model import ToyDualEncoder, save_checkpoint, tokenize
from retclip.toyworld.world import COLOUR_WORD_RATE, SIZE, STUFF_WORD_RATE, generate_scenes


def train(
    out: Path, *, scenes: int, steps: int, batch_size: int, lr: float, seed: int
) -> dict[str, object]:
    torch.manual_seed(seed)
    started = time.time()
    data = generate_scenes("train", scenes, seed=seed)
    images = torch.from_numpy(np.stack([s.image for s in data])).permute(0, 3, 1, 2).float()
    tokens = tokenize([s.caption for s in data])
    model = ToyDualEncoder()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in tqdm(range(steps), desc="train toy model", unit="step"):
        batch = torch.randint(len(data), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        pixels = torch.where(flip[:, None, None, None], images[batch].flip(-1), images[batch])
        image_emb = F.normalize(model.encode_image(pixels), dim=-1)
        text_emb = F.normalize(model.encode_text(tokens[batch]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T
        # captions repeat (same objects): count every matching caption as a positive
        same = (tokens[batch][:, None] == tokens[batch][None]).all(-1).float()
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss))
    record = {
        "command": "python -m retclip.toyworld.train " + " ".join(sys.argv[1:]),
        "seed": seed,
        "data": {
            "split": "train",
            "scenes": scenes,
            "image_size": SIZE,
            "colour_word_rate": COLOUR_WORD_RATE,
            "stuff_word_rate": STUFF_WORD_RATE,
        },
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "train_seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")},
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_checkpoint(model, out, record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="weights file (.safetensors)")
    parser.add_argument("--scenes", type=int, default=12000)
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    record = train(
        args.out,
        scenes=args.scenes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    print(f"final loss {record['final_loss']} in {record['train_seconds']} s → {args.out}")


if __name__ == "__main__":
    main()
