"""Similarity, regularization and metrics: closed-form values, gradcheck, bad shapes.

The tests on torch tensors take the ``device`` fixture (``LEARNEDREG_TEST_DEVICE``, default cpu);
their inputs are drawn on the CPU and moved, so every device sees the same numbers.
"""

import numpy as np
import pytest
import torch

from LearnedRegistrationLib.engine import regularization as reg
from LearnedRegistrationLib.engine import similarity as sim
from LearnedRegistrationLib.engine.filters import box_mean
from LearnedRegistrationLib.engine.grid import ImageGrid
from LearnedRegistrationLib.engine.metrics import dice_mean, dice_per_label, folding_percent, hd95_mm, sdlogj, tre_mm
from LearnedRegistrationLib.engine.visualization import checkerboard, difference


def pair(shape=(5, 6, 7), seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    warped = 0.6 * fixed + 0.4 * torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(1, 1, *shape, generator=g, dtype=torch.float64) > 0.3).to(torch.float64)
    return fixed.to(device), warped.to(device).requires_grad_(True), mask.to(device)


@pytest.mark.parametrize(
    "loss",
    [
        lambda f, w, m: sim.mse(f, w, m),
        lambda f, w, m: sim.ncc(f, w, m),
        lambda f, w, m: sim.lncc(f, w, m, window_vox=(3, 3, 3)),
        lambda f, w, m: sim.ngf(f, w, m, spacing=(1.0, 1.5, 2.0), eps=0.1),
        lambda f, w, m: sim.mutual_information(f, w, m, bins=8, intensity_range=(0.0, 1.0)),
    ],
    ids=["mse", "ncc", "lncc", "ngf", "mi"],
)
def test_similarity_gradcheck(loss, device):
    fixed, warped, mask = pair(device=device)
    assert torch.autograd.gradcheck(lambda w: loss(fixed, w, mask), (warped,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "energy",
    [
        lambda u: reg.diffusion(u, (1.0, 2.0, 1.5)),
        lambda u: reg.bending_energy(u, (1.0, 2.0, 1.5)),
        lambda u: reg.weighted_diffusion(u, (1.0, 2.0, 1.5), torch.linspace(0, 1, 210, dtype=torch.float64, device=u.device).view(1, 1, 5, 6, 7)),
        lambda u: reg.negative_jacobian_penalty(u, (1.0, 1.0, 1.0), threshold=1.5),
    ],
    ids=["diffusion", "bending", "weighted_diffusion", "negative_jacobian"],
)
def test_regularization_gradcheck(energy, device):
    u = (0.3 * torch.randn(1, 3, 5, 6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(energy, (u,), eps=1e-6, atol=1e-5)


def test_similarity_of_identical_images_is_best(device):
    fixed, _, mask = pair(device=device)
    assert sim.mse(fixed, fixed).item() == 0.0
    assert sim.ncc(fixed, fixed).item() == pytest.approx(0.0, abs=1e-6)
    assert sim.ncc(fixed, -fixed).item() == pytest.approx(2.0, abs=1e-6)
    assert sim.lncc(fixed, 2 * fixed + 1, window_vox=(3, 3, 3)).item() == pytest.approx(0.0, abs=1e-3)
    # NGF is invariant to intensity scale; its optimum is below 1 because of the edge parameter
    assert sim.ngf(fixed, 3 * fixed).item() == pytest.approx(sim.ngf(fixed, fixed).item())
    # (own generator, so the result does not depend on what ran before in the same process)
    unrelated = torch.rand(fixed.shape, generator=torch.Generator().manual_seed(7), dtype=fixed.dtype).to(device)
    assert sim.ngf(fixed, fixed).item() < sim.ngf(fixed, unrelated).item() - 0.1
    # MI ranks an intensity-remapped copy above an unrelated image
    other = torch.rand(fixed.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    assert sim.mutual_information(fixed, 1 - fixed ** 2).item() < sim.mutual_information(fixed, other).item()


def test_masked_mse_ignores_masked_out_voxels(device):
    fixed = torch.zeros(1, 1, 4, 4, 4, device=device)
    warped = torch.zeros(1, 1, 4, 4, 4, device=device)
    warped[..., 0] = 10.0
    mask = torch.ones_like(fixed)
    mask[..., 0] = 0
    assert sim.mse(fixed, warped, mask).item() == 0.0
    assert sim.mse(fixed, warped).item() == pytest.approx(25.0)


def test_bad_shapes_raise_value_error():
    with pytest.raises(ValueError, match=r"\(N, 1, Z, Y, X\)"):
        sim.mse(torch.zeros(4, 4, 4), torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="must have shape"):
        sim.lncc(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match=r"\(N, 3, Z, Y, X\)"):
        reg.diffusion(torch.zeros(1, 2, 4, 4, 4), (1, 1, 1))
    with pytest.raises(ValueError, match="unknown similarity"):
        sim.similarity_loss("ssd", torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))


def test_diffusion_of_linear_field_is_closed_form(device):
    # u_x = a * x (mm) -> du_x/dx = a everywhere -> energy a^2
    grid_x = torch.arange(8, dtype=torch.float64, device=device).view(1, 1, 8) * 2.0  # spacing 2 mm
    u = torch.zeros(1, 3, 6, 7, 8, dtype=torch.float64, device=device)
    u[:, 0] = 0.1 * grid_x
    assert reg.diffusion(u, (2.0, 1.0, 1.0)).item() == pytest.approx(0.01)
    assert reg.bending_energy(u, (2.0, 1.0, 1.0)).item() == pytest.approx(0.0, abs=1e-12)


def test_beta_prior_is_lowest_at_its_mode(device):
    alpha, beta = 3.0, 5.0
    mode = (alpha - 1) / (alpha + beta - 2)
    values = [reg.beta_prior_nll(torch.full((4,), w, device=device), alpha, beta).item() for w in (0.1, mode, 0.8)]
    assert values[1] < values[0] and values[1] < values[2]


def test_box_mean_matches_pooling(device):
    x = torch.rand(2, 3, 9, 11, 13, dtype=torch.float64).to(device)
    expected = torch.nn.functional.avg_pool3d(x, (7, 5, 3), 1, (3, 2, 1), count_include_pad=False)
    torch.testing.assert_close(box_mean(x, (3, 5, 7)), expected)


# ----------------------------------------------------------------------------- metrics
def test_dice_identical_disjoint_and_partial():
    a = np.zeros((10, 10, 10), np.int32)
    a[2:6, 2:6, 2:6] = 1
    a[6:9, 6:9, 6:9] = 2
    assert dice_per_label(a, a) == {1: 1.0, 2: 1.0}
    b = np.zeros_like(a)
    b[2:6, 2:6, 4:8] = 1  # half of label 1 overlaps
    scores = dice_per_label(a, b, labels=[1, 2, 3])
    assert scores[1] == pytest.approx(0.5)
    assert scores[2] == 0.0
    assert 3 not in scores  # absent from both maps
    assert dice_mean(a, b, [1, 2]) == pytest.approx(0.25)


def test_hd95_of_shifted_cube():
    grid = ImageGrid((30, 30, 30), (2.0, 1.0, 1.0), np.zeros(3), np.eye(3))
    a = np.zeros(grid.shape, np.uint8)
    a[5:20, 5:20, 5:20] = 1
    b = np.roll(a, 3, axis=2)  # 3 voxels along I = 6 mm
    assert hd95_mm(a, a, [1], grid)[1] == 0.0
    assert hd95_mm(a, b, [1], grid)[1] == pytest.approx(6.0)
    assert hd95_mm(a, np.zeros_like(a) + 0, [1], grid)[1] == float("inf")


def test_tre_with_translation_field():
    grid = ImageGrid((10, 10, 10), (1.0, 1.0, 1.0), np.zeros(3), np.eye(3))
    d = np.zeros((*grid.shape, 3), np.float32)
    d[..., 0] = 2.0
    fixed_points = np.array([[2.0, 3.0, 4.0], [5.0, 5.0, 5.0]])
    np.testing.assert_allclose(tre_mm(fixed_points, fixed_points + [2.0, 0, 0], d, grid), [0, 0], atol=1e-6)
    np.testing.assert_allclose(tre_mm(fixed_points, fixed_points + [2.0, 3.0, 4.0], d, grid), [5, 5], atol=1e-6)
    with pytest.raises(ValueError, match="as many fixed as moving"):
        tre_mm(fixed_points, fixed_points[:1], d, grid)


def test_folding_and_sdlogj():
    jac = np.ones((10, 10, 10), np.float32)
    assert folding_percent(jac) == 0.0 and sdlogj(jac) == pytest.approx(0.0)
    jac[0, 0, :5] = -0.5
    assert folding_percent(jac) == pytest.approx(0.5)
    mask = np.zeros(jac.shape, bool)
    mask[5:] = True
    assert folding_percent(jac, mask) == 0.0
    jac2 = np.ones((2, 2, 2))
    jac2[0] = np.e
    assert sdlogj(jac2) == pytest.approx(0.5)


def test_checkerboard_alternates_and_difference_is_signed():
    grid = ImageGrid((4, 4, 8), (1.0, 1.0, 1.0), np.zeros(3), np.eye(3))
    ramp = np.broadcast_to(np.linspace(0, 1, 8, dtype=np.float32), grid.shape).copy()
    fixed, warped = ramp, 1 - ramp
    board = checkerboard(fixed, warped, grid, square_mm=4.0)
    only_fixed = checkerboard(fixed, fixed, grid, square_mm=4.0)
    only_warped = checkerboard(warped, warped, grid, square_mm=4.0)
    # first 4 mm along I show the fixed image, the next 4 mm the warped one; the next row flips
    np.testing.assert_array_equal(board[0, 0, :4], only_fixed[0, 0, :4])
    np.testing.assert_array_equal(board[0, 0, 4:], only_warped[0, 0, 4:])
    assert not np.array_equal(board[0, 0, 4:], only_fixed[0, 0, 4:])
    np.testing.assert_array_equal(board[0, 0], board[0, 3])
    np.testing.assert_array_equal(difference(fixed, warped), warped - fixed)
