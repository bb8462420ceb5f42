"""Concept erasure for text-to-image diffusion models, as closed-form edits and pure JAX objectives.

Closed form on the cross-attention K/V projections (one ridge kernel, `ridge.py`):
  uce.py (UCE), rece.py (RECE), trce.py (TRCE stage 1, `eot_mapping`),
  mace.py (MACE: CFR, a per-concept LoRA on the attention-map loss, closed-form fusion).
Fine-tuning objectives, `loss(trainable, frozen, batch, rng) -> (loss, aux)` built by `make_loss(model, ...)`:
  esd.py (ESD), spm.py (SPM adapters, latent anchoring, Facilitated Transport), trce.py (stage 2),
  doco.py (DoCo: discriminator, gradient surgery, a two-optimiser step), all_but_one.py, ablation.py.
Shared: common.py (encodings, model calls, partial sampling), jaxdiff/lora.py (LoRA merge),
finetune.py (the fine-tuning loop on the trainer's step: progress, resumable orbax checkpoints; the methods
call `train_selected` / `train_unet` with batches drawn by `pick`).
Each method is one module with `METHOD = registry.MethodInfo(...)` (kind, default selector, anchor, display order)
and `run(job) -> Result`; registry.py finds them (`registry.methods()`, `registry.get(name)`), so adding a method is
its module and its config, configs/erase/<method>.py. Running and judging: job.py (one run's pipeline, prompts,
encodings, sampling, anchor images), run.py (`jaxdiff erase`: outputs, grid, report), evaluate.py (probe-based
erasure, preservation and attack figures on the shapes world), attacks.py (RECE regenerating embedding, soft prompt).

Each method's defaults, quirk options and the exact formula implemented are in its module docstring.
"""
