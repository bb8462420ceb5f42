"""Concept erasure for text-to-image diffusion models, as closed-form edits and pure JAX objectives.

Closed form on the cross-attention K/V projections (one ridge kernel, `ridge.py`):
  uce.py (UCE), rece.py (RECE), trce.py (TRCE stage 1, `eot_mapping`), mace.py (MACE CFR and LoRA fusion).
Fine-tuning objectives, `loss(trainable, frozen, batch, rng) -> (loss, aux)` built by `make_loss(model, ...)`:
  esd.py (ESD), spm.py (SPM adapters, latent anchoring, Facilitated Transport), trce.py (stage 2),
  doco.py (DoCo: discriminator, gradient surgery, a two-optimiser step), all_but_one.py, ablation.py.
Shared: common.py (encodings, model calls, partial sampling), adapters.py (LoRA merge),
finetune.py (the fine-tuning loop on the trainer's step: progress, resumable orbax checkpoints).
Running and judging: job.py (one run's pipeline, prompts, encodings, sampling), methods.py (each method as
`run(job) -> Result`), run.py (`jaxdiff erase`: outputs, grid, report), evaluate.py (probe-based erasure,
preservation and attack figures on the shapes world), attacks.py (RECE regenerating embedding, soft prompt).

Each method's defaults, quirk options and the exact formula implemented are in its module docstring; the
configs are configs/erase/<method>.py.
"""

# method -> (module, kind, default trainable selector)
METHODS = {
    "uce": ("jaxdiff.erase.uce", "closed_form", None),
    "rece": ("jaxdiff.erase.rece", "closed_form", None),
    "trce": ("jaxdiff.erase.trce", "closed_form+finetune", "trce"),
    "mace": ("jaxdiff.erase.mace", "closed_form", None),
    "esd": ("jaxdiff.erase.esd", "finetune", "esd-x"),
    "spm": ("jaxdiff.erase.spm", "adapter", "transformers"),
    "doco": ("jaxdiff.erase.doco", "finetune", "cross-attn-kv"),
    "all_but_one": ("jaxdiff.erase.all_but_one", "finetune", "xattn"),
    "ablation": ("jaxdiff.erase.ablation", "finetune", "cross-attn-kv"),
}
