"""Similarity measures (issue 17, item 3): the LNCC window on thick slices, the linear-Parzen mutual
information, MIND-SSC against closed-form answers and gradcheck, and the similarity's place in the
optimizer, the λ path and the command line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from LearnedRegistrationLib.app.demo import make_demo_pair
from LearnedRegistrationLib.engine import optimize, similarity
from LearnedRegistrationLib.engine.common import SIMILARITIES, RegistrationOptions
from LearnedRegistrationLib.engine.filters import window_voxels
from LearnedRegistrationLib.engine.metrics import displacement_error
from LearnedRegistrationLib.engine.optimize import register_images
from LearnedRegistrationLib.engine.path import register_path
from LearnedRegistrationLib.engine.similarity import (
    REGULARIZATION_SCALE,
    lncc,
    mind,
    mind_ssc,
    mutual_information,
    similarity_loss,
)
from LearnedRegistrationLib.engine.transforms import resize_field, warp


def smooth_volume(shape=(6, 7, 8), seed=0, dtype=torch.float64) -> torch.Tensor:
    """(1, 1, Z, Y, X) random volume with some spatial structure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *shape), generator=g, dtype=dtype)
    return x + torch.nn.functional.avg_pool3d(x, 3, 1, 1, count_include_pad=False)


# --- LNCC window ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "size_mm, spacing, expected",
    [(9.0, (1.0, 2.0, 10.0), [9, 5, 1]), (9.0, (4.0, 3.0, 0.5), [3, 3, 19]), (9.0, (9.0, 9.0, 2.0), [1, 1, 5])],
)
def test_window_is_the_nearest_odd_voxel_count_and_at_least_one(size_mm, spacing, expected):
    assert window_voxels(size_mm, spacing) == expected


def test_lncc_window_on_thick_slices_stays_within_the_slice():
    fixed, warped = smooth_volume((5, 12, 12), 1), smooth_volume((5, 12, 12), 2)
    spacing = (1.0, 1.0, 10.0)  # 10 mm slices: a 9 mm window is one slice thick, not three (30 mm)
    got = similarity_loss("lncc", fixed, warped, spacing=spacing, window_mm=9.0)
    assert torch.allclose(got, lncc(fixed, warped, window_vox=(9, 9, 1)))
    assert not torch.allclose(got, lncc(fixed, warped, window_vox=(9, 9, 3)))


def test_lncc_window_on_a_level_coarser_than_the_window_is_three_voxels():
    # 9 mm at 8 mm voxels would be one voxel along every axis: no variance, no gradient
    fixed, warped = smooth_volume((8, 8, 8), 1), smooth_volume((8, 8, 8), 2)
    got = similarity_loss("lncc", fixed, warped, spacing=(8.0, 8.0, 8.0), window_mm=9.0)
    assert torch.allclose(got, lncc(fixed, warped, window_vox=(3, 3, 3)))


def test_window_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="positive"):
        window_voxels(0.0, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        window_voxels(9.0, (1.0, 0.0, 1.0))


# --- mutual information ---------------------------------------------------------------------------

def test_mutual_information_is_best_for_the_image_itself_and_blind_to_its_sign_and_scale():
    fixed = smooth_volume((16, 16, 16), 3)
    itself = mutual_information(fixed, fixed)
    other = mutual_information(fixed, smooth_volume((16, 16, 16), 4))
    assert -2.0 <= itself < other <= -1.0
    # bins span each image's min/max: a * I + b (a < 0 mirrors the histogram) leaves the entropies alone
    for a, b in ((3.0, 0.5), (-2.0, 7.0)):
        assert torch.allclose(mutual_information(fixed, a * fixed + b), itself, atol=1e-10)


def test_mutual_information_of_two_constant_halves_is_exact():
    # two equal halves at the first and last bin: each spreads over three bins with the cubic
    # B-spline's weights k = (1/6, 2/3, 1/6), so with H0 = H(k): H(F) = H(W) = log 2 + H0, and
    # H(F, W) = log 2 + 2 H0 for the image and itself, 2 log 2 + 2 H0 for independent halves
    h0 = -sum(p * math.log(p) for p in (1 / 6, 2 / 3, 1 / 6))
    half = torch.zeros(1, 1, 4, 4, 4, dtype=torch.float64)
    half[..., 2:] = 1.0
    expected = -(2 * math.log(2) + 2 * h0) / (math.log(2) + 2 * h0)
    assert math.isclose(mutual_information(half, half).item(), expected, abs_tol=1e-9)
    other = torch.zeros_like(half)
    other[:, :, 2:] = 1.0  # split along another axis: independent of the first
    assert math.isclose(mutual_information(half, other).item(), -1.0, abs_tol=1e-9)


def test_mutual_information_gradcheck():
    fixed, warped = smooth_volume((4, 5, 6), 5), smooth_volume((4, 5, 6), 6).requires_grad_()
    # a fixed intensity range: with each image's own min/max the bins move with the extreme voxels,
    # which the analytic gradient treats as constants
    assert torch.autograd.gradcheck(lambda w: mutual_information(fixed, w, bins=8, intensity_range=(0.0, 2.0)), (warped,))


@pytest.mark.parametrize("name, shape, stride, samples", [
    ("mi", (10, 12, 14), (1, 1, 1), None), ("mi", (30, 33, 36), (1, 1, 1), 5000), ("mi", (30, 33, 36), (2, 1, 3), 2000),
    ("mse", (10, 12, 14), (1, 1, 1), None), ("mse", (30, 33, 36), (2, 2, 2), None), ("ncc", (30, 33, 36), (1, 3, 2), None),
])
def test_a_pointwise_similarity_at_its_samples_equals_the_full_warp(monkeypatch, name, shape, stride, samples):
    """The optimizer measures a pointwise similarity on a lattice of voxels only (the displacement
    read there by separable interpolation, the moving image sampled there; nothing up-sampled or
    warped everywhere): the same loss and gradient as the full warp on those voxels (MI also at
    its own flat stride through them, with ``samples``)."""
    max_samples = samples or similarity.MI_MAX_SAMPLES
    monkeypatch.setattr(optimize, "mi_sample_stride", lambda voxels: similarity.mi_sample_stride(voxels, max_samples))
    fixed, moving = smooth_volume(shape, 7, torch.float32), smooth_volume(shape, 8, torch.float32)
    mask = (smooth_volume(shape, 9, torch.float32) > 0.9).float()
    g = torch.Generator().manual_seed(3)
    displacement = (0.05 * torch.randn((1, 3, 5, 6, 7), generator=g)).requires_grad_()
    warped = warp(moving, resize_field(displacement, shape))

    def lattice(x):
        return x[:, :, ::stride[0], ::stride[1], ::stride[2]]

    if name == "mi":
        full = mutual_information(lattice(fixed), lattice(warped), lattice(mask), max_samples=max_samples)
    else:
        full = similarity_loss(name, lattice(fixed), lattice(warped), lattice(mask))
    (full_grad,) = torch.autograd.grad(full, displacement)
    sampled = optimize.sampled_similarity(name, fixed, moving, displacement, mask, stride)
    (sampled_grad,) = torch.autograd.grad(sampled, displacement)
    assert math.isclose(sampled.item(), full.item(), rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(sampled_grad, full_grad, atol=1e-3 * full_grad.abs().max().item(), rtol=1e-3)


def test_sampled_similarity_refuses_a_neighbourhood_similarity():
    volume = smooth_volume((6, 6, 6), 1, torch.float32)
    with pytest.raises(ValueError, match="pointwise"):
        optimize.sampled_similarity("lncc", volume, volume, torch.zeros(1, 3, 3, 3, 3), None, (2, 2, 2))


# --- MIND-SSC -------------------------------------------------------------------------------------

def test_mind_descriptor_of_a_ramp_in_closed_form():
    # I = x: a pair (a, b) of six-neighbours differs by a_x - b_x, so 8 of the 12 pairs (one
    # neighbour along X) have D = 1 and the 4 in the Y-Z plane D = 0; min 0, V = 8/12, so the
    # descriptor is exp(-1.5) on 8 channels and 1 on 4 (inside, away from the replicated border)
    z, y, x = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), torch.arange(9.0), indexing="ij")
    descriptor = mind_ssc(x[None, None].double())
    inside = descriptor[0, :, 2:-2, 2:-2, 2:-2]
    values = inside.reshape(12, -1)
    assert torch.allclose(values, values[:, :1].expand_as(values))
    assert sorted(values[:, 0].tolist()) == pytest.approx([math.exp(-1.5)] * 8 + [1.0] * 4)


@pytest.mark.parametrize("a, b", [(3.0, -2.0), (-0.5, 10.0), (1e3, 1e3)])
def test_mind_is_invariant_to_an_affine_intensity_remapping(a, b):
    # every patch distance, their minimum, the variance estimate V and its bounds scale by a^2 and b
    # cancels, so exp(-D / V) is unchanged: exactly, up to float64 rounding
    fixed, warped = smooth_volume((6, 7, 8), 7), smooth_volume((6, 7, 8), 8)
    assert torch.allclose(mind_ssc(a * fixed + b), mind_ssc(fixed), rtol=0, atol=1e-12)
    # hence the loss is unchanged by a remapping of either image (a multi-modal pair's contrast)
    assert torch.allclose(mind(a * fixed + b, warped), mind(fixed, warped), rtol=0, atol=1e-12)
    assert torch.allclose(mind(fixed, a * warped + b), mind(fixed, warped), rtol=0, atol=1e-12)


def test_mind_loss_is_zero_for_the_image_itself_and_positive_otherwise():
    fixed, warped = smooth_volume((6, 7, 8), 9), smooth_volume((6, 7, 8), 10)
    assert mind(fixed, fixed).item() == 0.0
    assert 0.0 < mind(fixed, warped).item() <= 1.0
    mask = torch.zeros_like(fixed)
    mask[..., :4] = 1.0
    diff = ((mind_ssc(fixed) - mind_ssc(warped)) ** 2).mean(1)
    assert torch.allclose(mind(fixed, warped, mask), diff[..., :4].mean())


def test_mind_gradcheck():
    fixed, warped = smooth_volume((4, 5, 6), 11), smooth_volume((4, 5, 6), 12).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: mind(fixed, w), (warped,))


def test_mind_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, 1, Z, Y, X\)"):
        mind_ssc(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="odd"):
        mind_ssc(torch.zeros(1, 1, 4, 4, 4), patch_vox=2)


# --- the similarity in the optimizer, the λ path and the command line -----------------------------

def test_every_similarity_has_a_regularization_scale():
    assert set(REGULARIZATION_SCALE) == set(SIMILARITIES)
    assert "mind" in SIMILARITIES


QUICK = dict(affine_model="none", affine_spacings_mm=(6.0,), affine_iterations=(20,), deformable_spacings_mm=(6.0, 3.0),
             deformable_iterations=(40, 20), histogram_matching=False, device="cpu")


def test_mind_registers_a_pair_with_inverted_contrast():
    # a contrast the intensities alone cannot match (moving = 1 - image): MIND still sees the structure
    demo = make_demo_pair(size=32, spacing_mm=3.0, seed=1, max_displacement_mm=6.0)
    moving = demo.moving.max() - demo.moving
    result = register_images(demo.fixed, demo.fixed_grid, moving, demo.moving_grid,
                             RegistrationOptions(similarity="mind", **QUICK))
    assert result.similarity == "mind"
    foreground = demo.fixed_labels > 0
    before = displacement_error(np.zeros_like(demo.true_displacement_ras), demo.true_displacement_ras, foreground)
    after = displacement_error(result.displacement_ras, demo.true_displacement_ras, foreground)
    assert after["displacement_error_mean_mm"] < 0.9 * before["displacement_error_mean_mm"]
    path = register_path(demo.fixed, demo.fixed_grid, moving, demo.moving_grid, RegistrationOptions(similarity="mind", iteration_scale=0.25, **QUICK))
    assert path.predict(0.25).similarity == "mind"


def test_cli_accepts_every_similarity():
    from LearnedRegistrationLib.app.cli import build_parser

    parser = build_parser()
    for name in SIMILARITIES:
        args = parser.parse_args(["register", "--output-dir", "out", "--similarity", name])
        assert args.similarity == name


def test_a_situation_resolves_to_its_similarity():
    from LearnedRegistrationLib.app.cli import build_parser
    from LearnedRegistrationLib.engine.common import SITUATION_SIMILARITIES, resolve_similarity

    assert set(SITUATION_SIMILARITIES) == {"same-modality", "multimodal"}
    assert set(SITUATION_SIMILARITIES.values()) <= set(SIMILARITIES)
    for situation, measure in SITUATION_SIMILARITIES.items():
        assert resolve_similarity(situation.upper()) == measure
        # the options, hence the result and metrics.json, carry the measure, not the situation
        assert RegistrationOptions(similarity=situation).validated().similarity == measure
    assert resolve_similarity("ngf") == "ngf"
    with pytest.raises(ValueError, match="same-modality, multimodal, mse"):
        resolve_similarity("auto")
    args = build_parser().parse_args(["register", "--output-dir", "out"])
    assert resolve_similarity(args.similarity) == SITUATION_SIMILARITIES["same-modality"]
