"""Tests of mbldm/codec/spec.py: parsing {VQ|PQ|OPQ|RQ}-Y-Cb-Cr, the bit split into M x nbits, Eq. 23."""
from __future__ import annotations

import pytest

from mbldm.codec.spec import CodecSpec, parse_spec


def _layout(spec: CodecSpec) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(M per channel, nbits per channel, K per channel)."""
    return (tuple(c.m for c in spec.channels), tuple(c.nbits for c in spec.channels),
            tuple(c.k for c in spec.channels))


def test_opq_32_8_8_is_the_papers_six_channel_latent():
    spec = parse_spec("OPQ-32-8-8")
    assert spec.method == "OPQ"
    assert spec.patch_size == 8
    # 32 bits for Y = 4 sub-quantizers of 8 bits (4 divides d = 64); 8 bits = 1 x 8 for Cb and Cr
    assert _layout(spec) == ((4, 1, 1), (8, 8, 8), (256, 256, 256))
    assert spec.latent_channels == 6  # §4.2: 512x512 -> 64 x 64 x 6
    assert spec.max_k == 256
    assert spec.bits_per_patch == 48
    assert spec.bits_per_pixel == pytest.approx(48 / 64)
    assert spec.name == "OPQ-32-8-8"


def test_vq_8_8_8_has_three_latent_channels():
    spec = parse_spec("VQ-8-8-8")
    assert _layout(spec) == ((1, 1, 1), (8, 8, 8), (256, 256, 256))
    assert spec.latent_channels == 3


def test_pq_24_6_6_uses_6_bit_sub_quantizers():
    # 24 = 3 x 8, but 3 does not divide d = 64; 24 = 4 x 6 does.
    spec = parse_spec("PQ-24-6-6")
    assert _layout(spec) == ((4, 1, 1), (6, 6, 6), (64, 64, 64))
    assert spec.latent_channels == 6
    assert spec.max_k == 64


def test_rq_32_8_8():
    spec = parse_spec("RQ-32-8-8")
    assert spec.method == "RQ"
    assert _layout(spec) == ((4, 1, 1), (8, 8, 8), (256, 256, 256))


def test_rq_does_not_need_m_to_divide_d():
    # d = 9: PQ cannot use M = 2, RQ can (its sub-codewords are full d-dimensional vectors)
    spec = parse_spec("RQ-16-8-8", patch_size=3)
    assert _layout(spec)[0] == (2, 1, 1)


def test_vq_with_more_than_8_bits_is_one_big_codebook():
    spec = parse_spec("VQ-12-8-8")
    assert _layout(spec) == ((1, 1, 1), (12, 8, 8), (4096, 256, 256))
    assert spec.max_k == 4096


@pytest.mark.parametrize("text", ["opq-32-8-8", "Opq-32-8-8", "  OPQ-32-8-8 "])
def test_parsing_is_case_insensitive_and_strips(text):
    spec = parse_spec(text)
    assert spec.method == "OPQ"
    assert spec.name == "OPQ-32-8-8"
    assert spec == parse_spec("OPQ-32-8-8")


def test_compression_ratio_eq_23():
    # R = 3 * 8 * s^2 / (Y_b + Cb_b + Cr_b)
    assert parse_spec("OPQ-32-8-8").compression_ratio == pytest.approx(3 * 8 * 64 / 48) == 32
    assert parse_spec("VQ-8-8-8").compression_ratio == pytest.approx(64)
    assert parse_spec("PQ-24-6-6").compression_ratio == pytest.approx(1536 / 36)
    assert parse_spec("VQ-4-4-4", patch_size=4).compression_ratio == pytest.approx(3 * 8 * 16 / 12)


@pytest.mark.parametrize(
    ("text", "patch_size", "fragment"),
    [
        ("XQ-8-8-8", 8, "cannot parse"),  # unknown method
        ("OPQ-32-8", 8, "cannot parse"),  # two channels
        ("OPQ32-8-8", 8, "cannot parse"),
        ("OPQ-32-8-8-8", 8, "cannot parse"),
        ("OPQ-a-8-8", 8, "cannot parse"),
        ("OPQ--8-8-8", 8, "cannot parse"),
        ("", 8, "cannot parse"),
        ("PQ-0-8-8", 8, "at least 1"),  # 0 bits
        ("VQ-8-0-8", 8, "at least 1"),
        ("VQ-20-8-8", 8, "1..16"),  # 2**20 codewords
        ("PQ-16-8-8", 3, "divides the patch dimension 9"),  # d = 9: M in {2,4,8,16} never divides 9
        ("OPQ-9-8-8", 8, "divides the patch dimension 64"),  # 9 = 1 x 9 (> 8 bits) or 9 x 1 or 3 x 3
    ],
)
def test_invalid_specs_raise_with_the_valid_forms(text, patch_size, fragment):
    with pytest.raises(ValueError) as info:
        parse_spec(text, patch_size=patch_size)
    message = str(info.value)
    assert fragment in message
    # every message lists the valid forms
    for example in ("VQ-8-8-8", "OPQ-32-8-8", "PQ-24-6-6"):
        assert example in message
    assert "VQ/PQ/OPQ/RQ" in message


def test_invalid_patch_size():
    with pytest.raises(ValueError, match="patch size"):
        parse_spec("VQ-8-8-8", patch_size=0)


def test_patch_size_changes_the_split():
    # s = 4 (d = 16): 24 bits = 3 x 8 does not divide 16, 4 x 6 does; s = 6 (d = 36): 3 x 8 divides 36
    assert _layout(parse_spec("PQ-24-8-8", patch_size=4))[:2] == ((4, 1, 1), (6, 8, 8))
    assert _layout(parse_spec("PQ-24-8-8", patch_size=6))[:2] == ((3, 1, 1), (8, 8, 8))
