"""clip-retrieval's model names -> the ``ModelInfo`` vlsearch records, so text queries encode right.

clip-retrieval (through ``all_clip``) spells models three ways, all accepted here:

* ``open_clip:ViT-B-32/laion2b_s34b_b79k`` -> open_clip ``ViT-B-32`` with tag ``laion2b_s34b_b79k``;
* ``open_clip:ViT-B-32`` -> the tag ``all_clip`` picks: the last one open_clip lists for the model;
* ``ViT-B/32``, ``RN50``, ``ViT-L/14@336px`` (OpenAI CLIP) -> ``ViT-B-32``, ``RN50``, ``ViT-L-14-336``, tag ``openai``.

vlsearch's own spelling (``ViT-B-32`` with ``pretrained=...``, ``vlsearch-small``) is taken as it is.
The dimension comes from the model's config in open_clip's registry (no weights are loaded); a
model the registry does not know is recorded with the vectors' dimension and a warning (its text
queries then need a model of that name to be available).
"""

from __future__ import annotations

import logging

import open_clip

from vlsearch.core.errors import ImportFolderError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.models.factory import available_models, default_pretrained
from vlsearch.models.hf_text import model_config

log = logging.getLogger(__name__)

OPEN_CLIP_PREFIX = "open_clip:"


def normalise_model(spec: str, pretrained: str | None = None) -> tuple[str, str | None]:
    """``(open_clip name, pretrained tag)`` for a clip-retrieval or vlsearch model spelling."""
    spec = spec.strip()
    if spec.startswith(OPEN_CLIP_PREFIX):
        name, _, tag = spec[len(OPEN_CLIP_PREFIX):].partition("/")
        if not tag and pretrained is None:
            tag = dict(open_clip.list_pretrained()).get(name, "")  # all_clip's choice: the last listed tag
        return name, pretrained or tag or None
    if "/" in spec or spec.startswith("RN"):  # OpenAI CLIP's names
        name = spec.replace("/", "-").replace("@336px", "-336")
        if name in available_models() and "openai" in open_clip.list_pretrained_tags_by_model(name):
            return name, pretrained or "openai"
    return spec, default_pretrained(spec, pretrained)


def model_info(spec: str, dim: int, pretrained: str | None = None) -> ModelInfo:
    """The ``ModelInfo`` to record for vectors of dimension ``dim`` made by model ``spec``.

    ImportFolderError when the registry knows the model and its dimension differs from ``dim``."""
    name, tag = normalise_model(spec, pretrained)
    config = model_config(name) if name in available_models() else None
    if config is None:
        log.warning("model %r is not in open_clip's registry: recorded as it is, with dimension %d", name, dim)
        return ModelInfo(name=name, pretrained=tag, dim=dim)
    expected = int(config["embed_dim"])
    if expected != dim:
        raise ImportFolderError(f"the vectors are {dim}-d but model {spec} ({name}) embeds into {expected}-d: "
                                "name the model that made them (--model)")
    return ModelInfo(name=name, pretrained=tag, dim=dim)
