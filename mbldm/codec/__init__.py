"""The model-based latent space (§3.1, §3.2.1): colour, patches, spec, FAISS quantizers, ordering, ``Codec``."""
from mbldm.codec.spec import CodecSpec, parse_spec

__all__ = ["Codec", "CodecSpec", "parse_spec"]


def __getattr__(name: str):
    if name == "Codec":
        from mbldm.codec.codec import Codec

        return Codec
    raise AttributeError(name)
