"""Which Flax architecture serves a diffusers/transformers config (by `_class_name` or `architectures`)."""

from __future__ import annotations

from jaxdiff.models.model import Architecture


def _all() -> dict[str, Architecture]:
    from jaxdiff.models import clip, clip_vision, controlnet, inception, inception_resnet_v2, inception_v4, unet, vae

    return {
        **unet.ARCHITECTURES,
        **controlnet.ARCHITECTURES,
        **vae.ARCHITECTURES,
        **clip.ARCHITECTURES,
        **clip_vision.ARCHITECTURES,
        **inception.ARCHITECTURES,
        **inception_v4.ARCHITECTURES,
        **inception_resnet_v2.ARCHITECTURES,
    }


def architecture_name(config: dict) -> str | None:
    """The class name a config was saved for, or None when it names none."""
    if config.get("_class_name"):
        return config["_class_name"]
    archs = config.get("architectures") or []
    if archs:
        return archs[0]
    timm_name = config.get("architecture")  # timm's hub config.json: "inception_v4" (".tag" suffixed in some)
    if isinstance(timm_name, str):
        return _BY_TIMM_NAME.get(timm_name.split(".")[0], timm_name)
    return _BY_MODEL_TYPE.get(config.get("model_type"))


# transformers configs that name no `architectures`: their model class by `model_type`.
_BY_MODEL_TYPE = {"clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel", "clip": "CLIPModel"}
# timm configs name their model function (`architecture`): the jaxdiff class serving it.
_BY_TIMM_NAME = {"inception_v4": "InceptionV4", "inception_resnet_v2": "InceptionResnetV2"}


def architecture_for(config: dict) -> Architecture:
    name = architecture_name(config)
    known = _all()
    if name not in known:
        raise ValueError(
            f"unsupported model type {name!r}: jaxdiff supports {', '.join(sorted(known))} "
            "(from `_class_name` in a diffusers config.json or `architectures` in a transformers config.json)"
        )
    return known[name]


def supported() -> list[str]:
    return sorted(_all())
