"""digits-t2i: a latent text-to-image model of our own, in the Stable Diffusion pipeline layout.

    python -m training.digits_t2i [--quick] [--out DIR] [--eval-only]

Data: scikit-learn's 8x8 digits (the 80% training split of ``digits_data``; the held-out 20% is never trained
on), upsampled to 16x16 by pixel repetition; captions from the label plus attributes measured on each image
(ink mass -> "thin" / "bold", slant -> "slanted left" / "slanted right") in four phrasings ("a bold seven",
"the digit 7, bold, slanted right", "bold 7", "seven"), 10% empty for classifier-free guidance
(:mod:`.data`). Components (:mod:`.nets`): a word-level ``CLIPTokenizer`` generated from the caption vocabulary,
a 2-layer ``CLIPTextModel``, an ``AutoencoderKL`` 16x16x1 -> 8x8x4, a ``UNet2DConditionModel`` with
cross-attention, a ``DPMSolverMultistepScheduler`` on DDPM's linear betas. Training (:mod:`.train`): the VAE
(MSE + small KL), then the UNet and the text encoder jointly through the eps loss. Saved with
``StableDiffusionPipeline.save_pretrained(safe_serialization=True)``; evaluated through diffusers'
``StableDiffusionPipeline`` with classifier B and digits-FD (:mod:`.evaluate`).
"""
