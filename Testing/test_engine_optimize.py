"""Instance optimization on small seeded problems: convergence, λ behaviour, cancel, bad input.

The registrations run on the ``device`` fixture's device (``LEARNEDREG_TEST_DEVICE``, default cpu).
"""

import numpy as np
import pytest

from LearnedRegistrationLib.app.demo import make_demo_pair
from LearnedRegistrationLib.engine.common import RegistrationCancelled, RegistrationOptions, choose_device
from LearnedRegistrationLib.engine.grid import ImageGrid
from LearnedRegistrationLib.engine.metrics import dice_mean, displacement_error, folding_percent, sdlogj
from LearnedRegistrationLib.engine.optimize import register_images
from LearnedRegistrationLib.engine.transforms import resample_image

#: A short schedule. Without histogram matching: the demo pair has one contrast (nothing to match),
#: and the matching needs SimpleITK, which the GPU machine of scripts/gpu_check.py lacks.
QUICK = dict(
    affine_spacings_mm=(6.0,),
    affine_iterations=(40,),
    deformable_spacings_mm=(6.0, 3.0),
    deformable_iterations=(60, 40),
    histogram_matching=False,
)


@pytest.fixture(scope="module")
def demo():
    return make_demo_pair(size=40, spacing_mm=3.0, seed=1, max_displacement_mm=6.0)


@pytest.fixture(scope="module")
def results(demo, device):
    """Two registrations of the demo pair, at a small and a large λ."""
    out = {}
    for lam in (0.1, 0.8):
        opts = RegistrationOptions(regularization_weight=lam, affine_model="none", device=str(device), **QUICK)
        out[lam] = register_images(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, opts)
    return out


def test_registration_recovers_known_deformation(demo, results):
    result = results[0.1]
    foreground = demo.fixed_labels > 0
    before = displacement_error(np.zeros_like(demo.true_displacement_ras), demo.true_displacement_ras, foreground)
    after = displacement_error(result.displacement_ras, demo.true_displacement_ras, foreground)
    # the phantom's labels are flat inside, so only edges pin the field down: the error must fall,
    # and overlap and intensity agreement must improve clearly
    assert after["displacement_error_mean_mm"] < 0.95 * before["displacement_error_mean_mm"]
    warped_labels = resample_image(demo.moving_labels, demo.moving_grid, demo.fixed_grid, result.displacement_ras, "nearest")
    assert dice_mean(demo.fixed_labels, warped_labels) > dice_mean(demo.fixed_labels, demo.moving_labels) + 0.03
    assert np.mean((result.warped - demo.fixed) ** 2) < 0.5 * np.mean((demo.moving - demo.fixed) ** 2)
    assert folding_percent(result.jacobian) < 0.1


def test_larger_lambda_gives_smoother_field(results):
    small, large = results[0.1], results[0.8]
    assert sdlogj(large.jacobian) < sdlogj(small.jacobian)
    assert np.abs(large.displacement_ras).mean() < np.abs(small.displacement_ras).mean()
    np.testing.assert_allclose(large.lambda_map, 0.8)
    assert large.regularization_weight == 0.8


def test_result_shapes_and_frames(demo, results, device):
    result = results[0.1]
    assert result.warped.shape == demo.fixed_grid.shape
    assert result.displacement_ras.shape == (*demo.fixed_grid.shape, 3)
    assert result.jacobian.shape == result.lambda_map.shape == demo.fixed_grid.shape
    assert result.device == str(device)
    # warped is the moving image resampled through the returned field
    again = resample_image(demo.moving, demo.moving_grid, demo.fixed_grid, result.displacement_ras)
    np.testing.assert_allclose(result.warped, again, atol=1e-5)


def rotated_grid(grid: ImageGrid, degrees: float, shift_mm) -> ImageGrid:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    return ImageGrid(grid.shape, grid.spacing, rot @ grid.origin + np.asarray(shift_mm), rot @ grid.direction)


@pytest.mark.parametrize("model", ["rigid", "affine"])
def test_affine_stage_recovers_a_rigid_motion(demo, model, device):
    """The same voxels placed with a rotated/shifted geometry: the affine must undo it (< 1 mm)."""
    moving_grid = rotated_grid(demo.fixed_grid, 6.0, [5.0, -4.0, 3.0])
    opts = RegistrationOptions(
        affine_model=model, deformable_spacings_mm=(), deformable_iterations=(),
        affine_spacings_mm=(6.0, 3.0), affine_iterations=(80, 60), histogram_matching=False, device=str(device),
    )
    result = register_images(demo.fixed, demo.fixed_grid, demo.fixed, moving_grid, opts)
    # true resampling map: fixed RAS -> same voxel in the moving geometry
    truth = moving_grid.ijk_to_ras @ demo.fixed_grid.ras_to_ijk
    points = demo.fixed_grid.world_points()[demo.fixed_labels > 0]
    mapped = points + (result.displacement_ras[demo.fixed_labels > 0])
    expected = points @ truth[:3, :3].T + truth[:3, 3]
    assert np.linalg.norm(mapped - expected, axis=1).mean() < 1.0


def test_progress_and_cancel(demo, device):
    calls = []

    def cancel():
        return len(calls) >= 3

    with pytest.raises(RegistrationCancelled):
        register_images(
            demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, RegistrationOptions(**QUICK, device=str(device)),
            progress=lambda fraction, message: calls.append((fraction, message)), cancel=cancel,
        )
    assert len(calls) == 3
    fractions = [c[0] for c in calls]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)


def test_registration_leaves_the_callers_random_stream_alone(demo, device):
    import torch

    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    with pytest.raises(RegistrationCancelled):  # a short run is enough: the seed is set first
        register_images(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid,
                        RegistrationOptions(**QUICK, seed=7, device=str(device)), cancel=lambda: True)
    assert torch.equal(torch.rand(5), expected)


def test_lambda_map_is_used_and_reported(demo, device):
    lam_map = np.ones(demo.fixed_grid.shape, np.float32)
    lam_map[:, :, : lam_map.shape[2] // 2] = 0.2
    opts = RegistrationOptions(regularization_weight=0.5, affine_model="none", iteration_scale=0.25, device=str(device), **QUICK)
    result = register_images(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, opts, lambda_map=lam_map)
    np.testing.assert_allclose(result.lambda_map, 0.5 * lam_map)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda f: f[:1], "3D volume"),
        (lambda f: np.zeros_like(f), "empty"),
        (lambda f: np.where(f > 0.5, np.nan, f), "NaN"),
    ],
    ids=["2d", "all-zero", "nan"],
)
def test_bad_moving_image_is_rejected(demo, make, message):
    bad = make(demo.moving)
    grid = demo.moving_grid if bad.shape == demo.moving.shape else None
    with pytest.raises(ValueError, match=message):
        register_images(demo.fixed, demo.fixed_grid, bad, grid or demo.moving_grid, RegistrationOptions(**QUICK))


def test_no_overlap_after_initialization(demo, device):
    far = ImageGrid(demo.moving_grid.shape, demo.moving_grid.spacing, demo.moving_grid.origin + 1000.0, demo.moving_grid.direction)
    with pytest.raises(ValueError, match="does not overlap"):
        register_images(demo.fixed, demo.fixed_grid, demo.moving, far,
                        RegistrationOptions(initialization="none", device=str(device), **QUICK))


def test_bad_options_and_masks(demo):
    args = (demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid)
    with pytest.raises(ValueError, match=r"λ must be in \[0, 1\]"):
        register_images(*args, RegistrationOptions(regularization_weight=1.5))
    with pytest.raises(ValueError, match="similarity"):
        register_images(*args, RegistrationOptions(similarity="ssd"))
    with pytest.raises(ValueError, match="mask has shape"):
        register_images(*args, fixed_mask=np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="mask is empty"):
        register_images(*args, fixed_mask=np.zeros(demo.fixed_grid.shape))


def test_device_choice():
    assert choose_device(None).type in ("cpu", "cuda")
    assert choose_device("cpu").type == "cpu"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            choose_device("cuda")
