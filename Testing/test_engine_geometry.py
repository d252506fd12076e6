"""Engine geometry: grids, warping against SimpleITK, scaling and squaring, inverse, Jacobians.

The tests on torch tensors take the ``device`` fixture (``LEARNEDREG_TEST_DEVICE``, default cpu);
the comparisons with SimpleITK import it in the test, so that the rest runs where it is absent
(the GPU machine of ``scripts/gpu_check.py``).
"""

import numpy as np
import pytest
import torch

from LearnedRegistrationLib.engine.grid import LPS_TO_RAS, ImageGrid
from LearnedRegistrationLib.engine.metrics import jacobian_map
from LearnedRegistrationLib.engine.transforms import (
    AxisAlignedResampler,
    compose,
    displacement_to_ras,
    grid_sample,
    integrate_svf,
    mm_to_normalized,
    normalized_to_mm,
    resample_image,
    sampling_grid,
    warp,
)

from conftest import oblique_grid, rotation_about


def simpleitk():
    """``(SimpleITK, imageio.grid_from_sitk, imageio.sitk_image)``; skips where SimpleITK is not installed."""
    sitk = pytest.importorskip("SimpleITK")
    from LearnedRegistrationLib.engine.imageio import grid_from_sitk, sitk_image

    return sitk, grid_from_sitk, sitk_image


def geometry_grid(shape=(18, 20, 22), spacing=(1.5, 1.2, 2.0)):
    return oblique_grid(shape, spacing, origin=(-12.0, 7.5, 3.0), direction=rotation_about([1, 2, 3], 25))


def smooth_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    image = np.zeros(shape)
    for _ in range(4):
        a, b, c = rng.uniform(1, 3, size=3)
        image += rng.uniform(0.5, 1) * np.sin(a * np.pi * i + rng.uniform()) * np.cos(b * np.pi * j) * np.sin(c * np.pi * k + 1)
    return image.astype(np.float32)


def strictly_inside(points_ras, grid):
    """Points whose continuous index lies within [0, n-1] on every axis (no border convention involved)."""
    ijk = points_ras.reshape(-1, 3) @ grid.ras_to_ijk[:3, :3].T + grid.ras_to_ijk[:3, 3]
    ok = np.all((ijk >= 0) & (ijk <= np.asarray(grid.size_ijk) - 1), axis=1)
    return ok.reshape(points_ras.shape[:-1])


def test_grid_matches_simpleitk_index_to_point():
    sitk, grid_from_sitk, sitk_image = simpleitk()
    grid = geometry_grid()
    image = sitk_image(np.zeros(grid.shape, np.float32), grid)
    for ijk in [(0, 0, 0), (3, 5, 7), (21, 19, 17)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = (grid.ijk_to_ras @ np.array([*ijk, 1.0]))[:3]
        np.testing.assert_allclose(LPS_TO_RAS @ lps, ras, atol=1e-9)
    assert grid_from_sitk(image).same_geometry(grid, tol_mm=1e-9)


def test_grid_rejects_2d_and_bad_direction():
    with pytest.raises(ValueError, match="3D volume"):
        ImageGrid((1, 10, 10), (1, 1, 1), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="orthonormal"):
        ImageGrid((4, 4, 4), (1, 1, 1), np.zeros(3), np.diag([1.0, 2.0, 1.0]))


def test_resized_grid_keeps_corner_voxel_centres():
    grid = geometry_grid()
    small = grid.resized((7, 9, 11))
    far = np.array([*(np.asarray(grid.size_ijk) - 1), 1.0])
    far_small = np.array([*(np.asarray(small.size_ijk) - 1), 1.0])
    np.testing.assert_allclose(grid.ijk_to_ras @ far, small.ijk_to_ras @ far_small, atol=1e-9)
    np.testing.assert_allclose(grid.origin, small.origin)


@pytest.mark.parametrize("degrees", [0.0, 12.0])
def test_affine_resampling_matches_simpleitk(degrees):
    """Translation and rotation, oblique grids of different size/spacing: max error < 1e-4 of the range."""
    sitk, _, sitk_image = simpleitk()
    moving_grid = geometry_grid()
    fixed_grid = ImageGrid((16, 17, 19), (1.3, 1.4, 1.7), np.array([-10.0, 9.0, 5.0]), rotation_about([0, 1, 1], -10))
    moving = smooth_image(moving_grid.shape)
    affine = np.eye(4)
    affine[:3, :3] = rotation_about([1, -1, 2], degrees)
    affine[:3, 3] = [2.5, -1.25, 3.0]  # RAS mm
    ours = resample_image(moving, moving_grid, fixed_grid, affine_ras=affine)

    # The same resampling transform expressed in LPS for ITK: F A F with F = diag(-1, -1, 1).
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    a_lps = flip @ affine @ flip
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(a_lps[:3, :3].ravel().tolist())
    transform.SetTranslation(a_lps[:3, 3].tolist())
    reference = sitk_image(np.zeros(fixed_grid.shape, np.float32), fixed_grid)
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(sitk_image(moving, moving_grid), reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    # ITK and torch treat the outer half voxel differently: compare where the sample is inside
    points = fixed_grid.world_points()
    inside = strictly_inside(points @ affine[:3, :3].T + affine[:3, 3], moving_grid)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-4 * np.ptp(moving))


def test_displacement_resampling_matches_simpleitk_displacement_field():
    sitk, _, sitk_image = simpleitk()
    grid = oblique_grid((14, 15, 16), (2.0, 2.0, 2.5))
    moving = smooth_image(grid.shape, seed=3)
    points = grid.world_points()
    centre = grid.center_ras
    d = np.zeros(points.shape, np.float32)
    d[..., 0] = 2.0 * np.exp(-np.sum((points - centre) ** 2, -1) / 200.0)
    d[..., 2] = -1.5 * np.exp(-np.sum((points - centre - 4) ** 2, -1) / 150.0)
    ours = resample_image(moving, grid, grid, displacement_ras=d)
    field = sitk_image((d @ LPS_TO_RAS).astype(np.float64), grid)  # RAS vectors -> LPS vectors
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(sitk_image(moving, grid), sitk_image(moving, grid), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    inside = strictly_inside(points + d, grid)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-4 * np.ptp(moving))


def test_scaling_and_squaring_of_constant_velocity_is_translation(device):
    velocity = torch.zeros(1, 3, 10, 11, 12, dtype=torch.float64, device=device)
    velocity[:, 0], velocity[:, 1], velocity[:, 2] = 0.1, -0.05, 0.02
    displacement = integrate_svf(velocity, steps=7)
    torch.testing.assert_close(displacement, velocity, atol=1e-10, rtol=0)


def test_inverse_svf_composes_to_identity(device):
    torch.manual_seed(0)
    shape = (24, 24, 24)
    coarse = (torch.randn(1, 3, 4, 4, 4, dtype=torch.float64) * 0.1).to(device)
    velocity = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    forward = integrate_svf(velocity, 8)
    inverse = integrate_svf(-velocity, 8)
    residual = compose(inverse, forward)  # x -> phi^-1(phi(x))
    interior = residual[..., 4:-4, 4:-4, 4:-4]
    voxel = 2.0 / (shape[0] - 1)
    assert forward.abs().max() > 2 * voxel  # the deformation is not trivial
    # interpolation error only: mean below 2 % and max below 20 % of a voxel for a ~3-voxel deformation
    assert interior.abs().mean() < 0.02 * voxel
    assert interior.abs().max() < 0.2 * voxel


def test_warp_by_translation_shifts_image(device):
    image = torch.zeros(1, 1, 9, 9, 9, dtype=torch.float64, device=device)
    image[0, 0, 4, 4, 5] = 1.0
    disp = torch.zeros(1, 3, 9, 9, 9, dtype=torch.float64, device=device)
    disp[:, 0] = 2.0 / 8  # one voxel along x: warped(x) = image(x + 1)
    out = warp(image, disp).cpu()
    assert out[0, 0, 4, 4, 4] == pytest.approx(1.0)
    assert out.sum() == pytest.approx(1.0)


def test_jacobian_of_affine_is_its_determinant():
    grid = oblique_grid((12, 13, 14), (1.0, 1.5, 2.0))
    affine = np.eye(4)
    affine[:3, :3] = rotation_about([1, 0, 1], 8) @ np.diag([1.1, 0.9, 1.2])
    affine[:3, 3] = [3, -2, 1]
    d = displacement_to_ras(None, grid, affine)
    jac = jacobian_map(d, grid)
    np.testing.assert_allclose(jac, np.linalg.det(affine[:3, :3]), rtol=1e-4)


def test_normalized_mm_conversion_round_trip(device):
    grid = geometry_grid()
    field = torch.randn(1, 3, *grid.shape).to(device)
    torch.testing.assert_close(mm_to_normalized(normalized_to_mm(field, grid), grid), field)
    # one voxel along I in normalized units is spacing_I mm
    one = torch.zeros(1, 3, *grid.shape, device=device)
    one[:, 0] = 2.0 / (grid.size_ijk[0] - 1)
    assert normalized_to_mm(one, grid)[0, 0, 0, 0, 0].item() == pytest.approx(grid.spacing[0])


def test_displacement_to_ras_of_normalized_translation(device):
    grid = geometry_grid()
    disp = torch.zeros(1, 3, *grid.shape, device=device)
    disp[:, 1] = 2.0 / (grid.size_ijk[1] - 1)  # one voxel along J
    d = displacement_to_ras(disp, grid)
    expected = grid.direction[:, 1] * grid.spacing[1]
    np.testing.assert_allclose(d.reshape(-1, 3), np.broadcast_to(expected, (d.size // 3, 3)), atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_axis_aligned_resampler_equals_grid_sample_on_permuted_flipped_anisotropic_grids(channels_last, device):
    # target: axes permuted and flipped relative to the source, odd sizes, anisotropic, shifted so
    # some target voxels fall outside the source (border padding), one axis two voxels thick
    source = ImageGrid((9, 7, 6), (3.0, 2.5, 4.0), np.array([1.0, -2.0, 3.5]), np.array([[-1.0, 0, 0], [0, 0, 1], [0, -1, 0]]))
    for shape in ((23, 17, 30), (2, 17, 31)):
        target = ImageGrid(shape, (1.1, 0.7, 1.3), np.array([-3.0, 8.0, -14.0]), np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]))
        field = torch.randn(1, 4, *source.shape, generator=torch.Generator().manual_seed(1)).to(device)
        resampler = AxisAlignedResampler.between(target, source, device)
        assert resampler is not None
        expected = grid_sample(field, sampling_grid(target, source, device=device), "linear", padding_mode="border")
        if channels_last:
            expected = expected.permute(0, 2, 3, 4, 1)
        got = resampler(field, channels_last=channels_last)
        assert got.shape == expected.shape and got.is_contiguous()
        assert float((got - expected).abs().max()) < 1e-5


def test_axis_aligned_resampler_refuses_oblique_grids():
    source = ImageGrid((9, 7, 6), (3.0, 2.5, 4.0), np.zeros(3), np.eye(3))
    assert AxisAlignedResampler.between(geometry_grid(), source) is None
