"""Codec spec strings: ``{VQ|PQ|OPQ|RQ}-{Y}-{Cb}-{Cr}``, bits per s x s patch for each YCbCr channel.

Examples (s = 8, d = 64): ``VQ-8-8-8`` (one 256-codeword codebook per channel, 3 latent channels),
``OPQ-32-8-8`` (Y: 4 sub-quantizers x 8 bits, Cb/Cr: 1 x 8 bits -> 6 latent channels), ``PQ-24-6-6``
(Y: 4 x 6 bits, since 3 x 8 would not divide d = 64; Cb/Cr: 1 x 6 bits).

How bits are split into M sub-quantizers of ``nbits`` each (K = 2**nbits codewords):
- VQ: M = 1, nbits = bits (1..16).
- PQ / OPQ: the largest nbits <= 8 that divides ``bits`` such that M = bits / nbits divides d.
- RQ: the largest nbits <= 8 that divides ``bits``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

METHODS = ("VQ", "PQ", "OPQ", "RQ")
CHANNELS = ("Y", "Cb", "Cr")
_SPEC_RE = re.compile(r"^(VQ|PQ|OPQ|RQ)-(\d+)-(\d+)-(\d+)$", re.IGNORECASE)
_HELP = (
    "valid specs look like VQ-8-8-8, PQ-32-8-8, OPQ-32-8-8, RQ-32-8-8 or PQ-24-6-6: a method in "
    f"{'/'.join(METHODS)} and the bits per patch for Y, Cb and Cr"
)


@dataclass(frozen=True)
class ChannelQuantizer:
    """Sub-quantizer layout of one image channel: ``m`` sub-quantizers of ``nbits`` bits (K = 2**nbits)."""

    bits: int
    m: int
    nbits: int

    @property
    def k(self) -> int:
        return 1 << self.nbits


@dataclass(frozen=True)
class CodecSpec:
    """A parsed spec. ``channels`` holds the Y, Cb, Cr layouts in that order."""

    method: str
    channels: tuple[ChannelQuantizer, ChannelQuantizer, ChannelQuantizer]
    patch_size: int

    @property
    def name(self) -> str:
        return f"{self.method}-" + "-".join(str(c.bits) for c in self.channels)

    @property
    def latent_channels(self) -> int:
        """c: number of latent channels (sum of M over Y, Cb, Cr)."""
        return sum(c.m for c in self.channels)

    @property
    def bits_per_patch(self) -> int:
        return sum(c.bits for c in self.channels)

    @property
    def max_k(self) -> int:
        return max(c.k for c in self.channels)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """K_j of every latent channel j, (c,) ints: Y sub-quantizers first, then Cb, then Cr (the latent
        layout). VQ-6-4-4 -> (64, 16, 16); OPQ-32-8-8 -> (256,) * 6."""
        return tuple(cq.k for cq in self.channels for _ in range(cq.m))

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Name of every latent channel: "Y" (one sub-quantizer) or "Y[m]" (sub-quantizer m), "Cb", "Cr"."""
        names = []
        for plane, cq in zip(CHANNELS, self.channels):
            names += [plane] if cq.m == 1 else [f"{plane}[{m}]" for m in range(cq.m)]
        return tuple(names)

    @property
    def compression_ratio(self) -> float:
        """Eq. 23: 3 * 8 * s**2 / (Y_b + Cb_b + Cr_b)."""
        return 3 * 8 * self.patch_size**2 / self.bits_per_patch

    @property
    def bits_per_pixel(self) -> float:
        return self.bits_per_patch / self.patch_size**2


def _split(method: str, bits: int, d: int, channel: str, spec: str) -> ChannelQuantizer:
    if bits < 1:
        raise ValueError(f"codec spec {spec!r}: {channel} has {bits} bits; each channel needs at least 1. {_HELP}")
    if method == "VQ":
        if bits > 16:
            raise ValueError(
                f"codec spec {spec!r}: VQ with {bits} bits for {channel} would need 2**{bits} codewords; "
                f"VQ allows 1..16 bits per channel (use PQ/OPQ/RQ for more). {_HELP}"
            )
        return ChannelQuantizer(bits, 1, bits)
    for nbits in range(8, 0, -1):
        if bits % nbits:
            continue
        m = bits // nbits
        if method in ("PQ", "OPQ") and d % m:
            continue
        return ChannelQuantizer(bits, m, nbits)
    valid = sorted({m * n for n in range(1, 9) for m in range(1, d + 1) if d % m == 0})
    raise ValueError(
        f"codec spec {spec!r}: {bits} bits for {channel} cannot be split into sub-quantizers of <= 8 bits whose "
        f"count divides the patch dimension {d}; valid bit counts for {method} are {valid[:24]}... {_HELP}"
    )


def parse_spec(spec: str, patch_size: int = 8) -> CodecSpec:
    """Parse ``spec`` for s = ``patch_size``.

    Raises:
        ValueError: unknown method, malformed string, or bits that cannot be split (message lists what is valid).
    """
    if patch_size < 1:
        raise ValueError(f"patch size must be >= 1, got {patch_size}")
    match = _SPEC_RE.match(spec.strip())
    if not match:
        raise ValueError(f"cannot parse codec spec {spec!r}; {_HELP}")
    method = match.group(1).upper()
    d = patch_size * patch_size
    channels = tuple(
        _split(method, int(b), d, ch, spec) for b, ch in zip(match.groups()[1:], CHANNELS, strict=True)
    )
    return CodecSpec(method, channels, patch_size)  # type: ignore[arg-type]
