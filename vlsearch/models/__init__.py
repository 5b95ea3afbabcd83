"""Encoders: the one factory (``load_model``), the config registry and pretrained sources, the ``Encoder``,
precision choice, Hugging Face text towers, timm trunks, BatchNorm folding and inference-time tower parts."""
