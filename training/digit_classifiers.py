"""Train the zoo's two digit classifiers: A (search reward) and B (held-out evaluator, digits-FD features).

    python -m training.digit_classifiers [--quick] [--out DIR]

Writes ``DIR/digit-classifier-a/`` and ``DIR/digit-classifier-b/`` (default DIR: ``zoo/``; with --quick a
temp directory). Both are trained on ``train_split()`` only, independently: different architectures
(:mod:`models.classifiers`), seeds and augmentation draws. Augmentation: random +-1 pixel shifts
(background padding). AdamW, warm-up + cosine LR, label smoothing 0.05.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.classifiers import DigitClassifierA, DigitClassifierB, load_classifier, save_classifier
from training.common import (
    BatchSampler,
    Logger,
    env_summary,
    n_params,
    parse_args,
    read_json,
    resolve_out,
    seed_everything,
    warmup_cosine,
    write_json,
)
from training.digits_data import SPLIT_SEED, heldout_split, train_split

RECIPES = {
    # name: (constructor, seed offset, steps, batch, lr)
    "digit-classifier-a": (DigitClassifierA, 101, 1500, 64, 2e-3),
    "digit-classifier-b": (DigitClassifierB, 202, 1500, 64, 2e-3),
}
QUICK_STEPS = 20


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to +-max_shift pixels in x and y, padding with the background value -1."""
    n = x.shape[0]
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for i in range(n):  # n <= 64 and 8x8 images: a loop is cheap and obviously correct
        out[i] = xp[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def train_one(name: str, seed: int, steps: int, log: Logger) -> tuple[torch.nn.Module, dict]:
    ctor, offset, _, batch, lr = RECIPES[name]
    seed_everything(seed + offset)
    model = ctor()
    xtr, ytr = train_split()
    xte, yte = heldout_split()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = warmup_cosine(opt, warmup=min(100, max(1, steps // 10)), total=steps)
    batches = BatchSampler(xtr, ytr, batch, seed=seed + offset)
    g = torch.Generator().manual_seed(seed + offset + 1)
    t0 = time.time()
    model.train()
    for step in range(1, steps + 1):
        xb, yb = next(batches)
        loss = F.cross_entropy(model(random_shift(xb, g)), yb, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            log(
                f"{name} step {step}/{steps} loss {loss.item():.4f} "
                f"heldout acc {accuracy(model, xte, yte):.4f}"
            )
            model.train()
    secs = time.time() - t0
    model.eval()
    info = {
        "train_steps": steps,
        "train_seconds": round(secs, 1),
        "seed": seed + offset,
        "batch_size": batch,
        "lr": lr,
        "params": n_params(model),
        "train_accuracy": accuracy(model, xtr, ytr),
        "heldout_accuracy": accuracy(model, xte, yte),
        "split_seed": SPLIT_SEED,
    }
    return model, info


CARD = """# {name}

Digit classifier **{role}** of the diffserve digits zoo.

- **Data**: scikit-learn `load_digits` (8x8, 10 classes), scaled to [-1, 1]; trained on the fixed
  stratified 80% split of `training/digits_data.py` (`train_split()`, 1438 images, split seed {split_seed});
  evaluated on the 20% held-out split (359 images), never trained on.
- **Architecture**: `{cls}` in `models/classifiers.py` ({arch_desc}); {params:,} parameters;
  penultimate features: {nfeat}-d (`features(x)`). Input (N, 1, 8, 8) in [-1, 1], output logits (N, 10).
- **Recipe**: `python -m training.digit_classifiers` (trains A and B; `--quick` for a smoke run).
  AdamW lr {lr} (warm-up + cosine), batch {batch_size}, {train_steps} steps, label smoothing 0.05,
  random +-1 px shifts; seed {seed}. Training took {train_seconds} s ({env}).
- **Held-out accuracy**: **{heldout_accuracy:.4f}** (train accuracy {train_accuracy:.4f}).
- **Files**: `config.json` + `model.safetensors`; load with `models.classifiers.load_classifier(dir)`.

{usage}
"""

ROLES = {
    "digit-classifier-a": (
        "A (reward model)",
        "VGG-style: two 3x3 convs, max-pool, 3x3 conv, max-pool, fc128, fc10; ReLU",
        "Use: the reward that test-time search optimises (e.g. log p_A(class | x)). Do not report search "
        "gains measured with A as quality: evaluate with classifier B.",
    ),
    "digit-classifier-b": (
        "B (held-out evaluator)",
        "four 3x3 conv + GroupNorm + GELU blocks, avg-pool, global average pool, fc64, fc10",
        "Use: evaluation only. Its 64-d penultimate features define the digits Frechet distance "
        "(`training/digits_fd.py`) and its predictions the class accuracy of class-conditional samples. "
        "Never use it as a search reward or training signal.",
    ),
}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args("digit-classifiers", "Train digit classifiers A and B.", argv)
    if args.out is None and not args.quick:
        from training.common import ZOO

        args.out = ZOO
    root = resolve_out(args, "digit-classifiers")
    log = Logger()
    seed_everything(args.seed, args.threads)
    log(f"writing to {root}; {env_summary()}")
    for name in RECIPES:
        out = root / name
        if args.eval_only:
            model = load_classifier(out)
            info = read_json(out / "train_info.json")
            xte, yte = heldout_split()
            info["heldout_accuracy"] = accuracy(model, xte, yte)
        else:
            steps = args.steps or (QUICK_STEPS if args.quick else RECIPES[name][2])
            model, info = train_one(name, args.seed, steps, log)
            save_classifier(model, out, extra={"heldout_accuracy": round(info["heldout_accuracy"], 4)})
        info["env"] = env_summary()
        write_json(out / "train_info.json", info)
        role, arch_desc, usage = ROLES[name]
        (out / "README.md").write_text(
            CARD.format(
                name=name,
                role=role,
                cls=type(model).__name__,
                arch_desc=arch_desc,
                nfeat=model.num_features,
                usage=usage,
                **info,
            )
        )
        log(f"{name}: held-out accuracy {info['heldout_accuracy']:.4f} ({info['params']} params) -> {out}")
    return root


if __name__ == "__main__":
    main()
