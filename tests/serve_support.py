"""Helpers of the serve tests: small real collections (folder, manifest, webdataset) on the tiny
model (the server itself runs with vlsearch.app.serve.background_server)."""

from __future__ import annotations

import tarfile
from pathlib import Path

N_IMAGES = 24


def make_collections(root: Path, encoder) -> dict[str, Path]:
    """Generated shapes (captioned) indexed three ways: a folder, a CSV manifest and a tar.
    Returns {name: collection dir}; the folder collection has an IVF index, the others Flat."""
    import torch

    from indexing.build import build_index
    from indexing.embed import EmbedConfig, embed
    from vlsearch.data.shapes import ShapesConfig, generate_shapes

    data = generate_shapes(root / "shapes", ShapesConfig(n_train=0, n_heldout=N_IMAGES, image_format="jpg"))
    split = data.split_dir("heldout")
    tar_dir = root / "tars"
    tar_dir.mkdir()
    with tarfile.open(tar_dir / "shard-000.tar", "w") as tf:
        for i, img in enumerate(sorted((split / "images").iterdir())[:N_IMAGES // 2]):
            tf.add(img, arcname=f"sub/{i:04d}.jpg")
    config = EmbedConfig(model=encoder.info.name, workers=0, batch_size=16, shard_size=16, device="cpu")
    sources = {"folder": split / "images", "manifest": data.heldout_manifest, "tar": tar_dir}
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from more threads on a shared CPU
    try:
        for name, source in sources.items():
            out[name] = embed(source, root / f"coll-{name}", config, encoder=encoder).path
            build_index(out[name], index_type="IVF2,Flat" if name == "folder" else "Flat", nprobe_default=1)
    finally:
        torch.set_num_threads(threads)
    return out

