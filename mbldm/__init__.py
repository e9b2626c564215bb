"""mbldm: denoising diffusion models on a model-based latent space (Scribano et al., Algorithms 2023).

Public API: ``load_image``, ``scan_images``, ``Codec``, ``parse_spec``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from mbldm.codec.spec import CodecSpec, parse_spec

__all__ = ["Codec", "CodecSpec", "load_image", "parse_spec", "scan_images", "__version__"]


def __getattr__(name: str):  # lazy: keep ``import mbldm`` light (no faiss/torch until needed)
    if name in ("load_image", "scan_images"):
        from mbldm.io import images

        return getattr(images, name)
    if name == "Codec":
        from mbldm.codec import Codec

        return Codec
    raise AttributeError(f"module 'mbldm' has no attribute {name!r}")
