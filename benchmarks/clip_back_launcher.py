"""Serve clip-retrieval 2.45's back end on 127.0.0.1 only (run by clip-retrieval's own virtualenv).

``clip_back()`` ends in ``app.run(host="0.0.0.0")``, so this launcher repeats its app construction
with clip-retrieval's own classes (``load_clip_indices``, ``KnnService``, ``MetadataService``,
``IndicesList``, the front's static endpoints, the Prometheus middleware, CORS) and serves the app
with werkzeug's ``make_server(..., threaded=True)``, the server and threading mode ``app.run`` uses.
It refuses to serve unless the socket is bound to 127.0.0.1.

Two things differ from a stock ``clip-retrieval back``, both because nothing can be downloaded:

* the CLIP model: ``all_clip.load_clip`` is replaced by ``open_clip.create_model_and_transforms(ARCH,
  pretrained=CHECKPOINT)``: the same local checkpoint (random ViT-B-32 weights) vlsearch's collection
  records, so the text encoder does identical work on both servers;
* ``enable_mclip_option`` and ``provide_aesthetic_embeddings`` (both on by default) are off: they
  fetch a multilingual model and the aesthetic embeddings from the network. The requests'
  ``use_mclip: false`` and aesthetic fields then change nothing, as on a back without them.

    python clip_back_launcher.py --indices indices.json --port 1234 --checkpoint vit-b-32.pt
"""

from __future__ import annotations

import argparse
import importlib

HOST = "127.0.0.1"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--indices", required=True, help="clip back's indices_paths JSON: {name: index folder}")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--checkpoint", required=True, help="open_clip checkpoint of --arch (state dict)")
    ap.add_argument("--arch", default="ViT-B-32")
    return ap.parse_args()


def patch_model_loading(arch: str, checkpoint: str) -> None:
    """Make clip back's ``from all_clip import load_clip`` load ``arch`` from a local checkpoint."""
    import all_clip
    import open_clip

    def load_clip(clip_model: str, use_jit: bool = True, device: str = "cpu", **_: object):
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint, device=device)
        model.eval()
        return model, preprocess, open_clip.get_tokenizer(arch)

    all_clip.load_clip = load_clip


def load_resources(cb, indices: str, arch: str) -> dict:
    """``clip_back()``'s ``load_clip_indices`` call with its defaults, less the downloads (module doc)."""
    return cb.load_clip_indices(indices_paths=indices, clip_options=cb.ClipOptions(
        indice_folder="", clip_model=f"open_clip:{arch}", enable_hdf5=False, enable_faiss_memory_mapping=False,
        columns_to_return=["url", "image_path", "caption", "NSFW"], reorder_metadata_by_ivf_index=False,
        enable_mclip_option=False, use_jit=True, use_arrow=False, provide_safety_model=False,
        provide_violence_detector=False, provide_aesthetic_embeddings=False))


def build_app(cb, clip_resources: dict):
    """The Flask app exactly as ``clip_back()`` builds it (clip_back.py, clip-retrieval 2.45)."""
    from flask import Flask
    from flask_cors import CORS
    from flask_restful import Api
    from prometheus_client import make_wsgi_app
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from clip_retrieval.clip_front import add_static_endpoints

    app = Flask(cb.__name__)
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": make_wsgi_app()})
    add_static_endpoints(app, None, None, "url")
    api = Api(app)
    api.add_resource(cb.MetricsSummary, "/metrics-summary")
    api.add_resource(cb.IndicesList, "/indices-list", resource_class_kwargs={"indices": list(clip_resources)})
    api.add_resource(cb.MetadataService, "/metadata", resource_class_kwargs={"clip_resources": clip_resources})
    api.add_resource(cb.KnnService, "/knn-service", resource_class_kwargs={"clip_resources": clip_resources})
    CORS(app)
    return app


def main() -> None:
    from werkzeug.serving import make_server

    args = parse_args()
    cb = importlib.import_module("clip_retrieval.clip_back")  # the package re-exports the function
    patch_model_loading(args.arch, args.checkpoint)
    app = build_app(cb, load_resources(cb, args.indices, args.arch))
    server = make_server(HOST, args.port, app, threaded=True)  # what app.run(threaded=True) builds
    bound = server.socket.getsockname()
    if bound[0] != HOST:
        raise SystemExit(f"refusing to serve: bound to {bound[0]}, not {HOST}")
    print(f"clip back listening on {bound[0]}:{bound[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
