"""The digits-t2i recipe: data -> tokenizer -> VAE -> UNet + text encoder -> StableDiffusionPipeline directory."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from training.digits_t2i import data, nets
from training.digits_t2i._compat import SPLIT_SEED, Logger, env_summary, heldout_split, n_params, train_split
from training.digits_t2i.train import FULL, QUICK, TextToImage, train_unet, train_vae

NAME = "digits-t2i"
REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.digits_t2i", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny nets, a few steps (a CI smoke run, < 1 minute)")
    p.add_argument(
        "--out", type=Path, default=None, help="output directory (default zoo/digits-t2i; quick: a temp dir)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: cores are shared)")
    p.add_argument("--unet-steps", type=int, default=None, help="override the UNet / text-encoder steps")
    p.add_argument("--vae-steps", type=int, default=None, help="override the VAE steps")
    p.add_argument("--eval-only", action="store_true", help="skip training: evaluate the pipeline in --out")
    p.add_argument("--no-eval", action="store_true", help="train and save only")
    return p.parse_args(argv)


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        out = args.out
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix=f"{NAME}-quick-"))
    else:
        out = REPO / "zoo" / NAME
    out.mkdir(parents=True, exist_ok=True)
    return out


@torch.no_grad()
def _vae_report(vae, x16: torch.Tensor) -> dict:
    """Reconstruction of the held-out digits through the posterior mean: MSE at 16x16 and at the classifier's 8x8."""
    rec = vae.decode(vae.encode(x16).latent_dist.mean).sample.clamp(-1, 1)
    return {
        "heldout_mse_16": float(((rec - x16) ** 2).mean()),
        "heldout_mse_8": float(((data.to_classifier(rec) - data.to_classifier(x16)) ** 2).mean()),
    }


def train(args: argparse.Namespace, out: Path, log: Logger) -> dict:
    from diffusers import StableDiffusionPipeline

    budget = QUICK if args.quick else FULL
    if args.unet_steps or args.vae_steps:
        from dataclasses import replace

        budget = replace(
            budget, unet_steps=args.unet_steps or budget.unet_steps, vae_steps=args.vae_steps or budget.vae_steps
        )
    x8, y = train_split()
    x16 = data.upsample(x8)
    thr = data.attribute_thresholds(x8, y)
    codes = data.measure(x8, y, thr)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = data.build_tokenizer(Path(tmp))
        vocab_files = {n: (Path(tmp) / n).read_text() for n in ("vocab.json", "merges.txt")}

    vae = nets.build_vae(args.quick)
    log(f"AutoencoderKL {n_params(vae):,} params")
    vae, vae_info = train_vae(vae, x16, budget, args.seed, log)
    with torch.no_grad():
        mu = torch.cat([vae.encode(x16[i : i + 256]).latent_dist.mean for i in range(0, len(x16), 256)])
    scale = float(1.0 / mu.std())
    vae.register_to_config(scaling_factor=scale)
    vae_info.update(
        _vae_report(vae, data.upsample(heldout_split()[0])), latent_mean=float(mu.mean()), scaling_factor=scale
    )
    log(f"vae: {vae_info['heldout_mse_16']:.5f} held-out MSE, scaling_factor {scale:.4f}")

    bank = data.CaptionBank(tokenizer, y, codes, budget.p_empty)
    model = TextToImage(nets.build_unet(args.quick), nets.build_text_encoder(tokenizer, args.quick))
    log(f"UNet2DConditionModel {n_params(model.unet):,} params, CLIPTextModel {n_params(model.text_encoder):,}")
    abar = nets.build_scheduler().alphas_cumprod.float()

    def save(m: TextToImage, step: int | None = None) -> None:
        StableDiffusionPipeline(
            vae=vae.eval(),
            text_encoder=m.text_encoder.eval(),
            tokenizer=tokenizer,
            unet=m.unet.eval(),
            scheduler=nets.build_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(out, safe_serialization=True)
        for n, text in vocab_files.items():  # the slow-tokenizer files, beside tokenizer.json
            (out / "tokenizer" / n).write_text(text)
        if step is not None:
            log(f"checkpoint: EMA weights of step {step} saved to {out}")

    model, unet_info = train_unet(model, mu * scale, bank, abar, budget, args.seed, log, save=save)
    save(model)
    info = {
        "seed": args.seed,
        "split_seed": SPLIT_SEED,
        "quick": args.quick,
        "env": env_summary(),
        "params": {
            "vae": n_params(vae),
            "text_encoder": n_params(model.text_encoder),
            "unet": n_params(model.unet),
        },
        "attribute_thresholds": thr,
        "train_attribute_counts": {
            "bold": int((codes["thickness"] == 1).sum()),
            "thin": int((codes["thickness"] == -1).sum()),
            "slanted_left": int((codes["lean"] == -1).sum()),
            "slanted_right": int((codes["lean"] == 1).sum()),
            "captions_per_image": sum(len(t) for t in bank.texts) / len(bank.texts),
        },
        "example_captions": bank.texts[0],
        **vae_info,
        **unet_info,
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out = _out_dir(args)
    log = Logger()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    log(f"{NAME}: writing to {out}; {env_summary()}")
    if not args.eval_only:
        train(args, out, log)
        log(f"saved the pipeline to {out}")
    if not args.no_eval:
        from training.digits_t2i import evaluate  # imported late: evaluation only needs the saved directory
        from training.digits_t2i.card import write_card

        metrics = evaluate.run(out, quick=args.quick, log=log)
        if not args.quick:  # the quick run only checks that the directory generates
            write_card(out, json.loads((out / "train_info.json").read_text()), metrics)
    log(f"done -> {out}")
    return out
