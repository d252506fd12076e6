"""The λ path (engine.path): one run, every λ; and the per-pair λ(x) map (engine.weightmap).

Small synthetic pairs on the ``device`` fixture's device (``LEARNEDREG_TEST_DEVICE``, default cpu):
the built-in demo phantom (a smooth known deformation) and a pair whose deformation is local (one
bump), so that a learned λ(x) has something to say.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from LearnedRegistrationLib.app.demo import make_demo_pair
from LearnedRegistrationLib.engine.common import RegistrationCancelled, RegistrationOptions
from LearnedRegistrationLib.engine.metrics import sdlogj
from LearnedRegistrationLib.engine.optimize import register_images
from LearnedRegistrationLib.engine.path import LambdaPath, PathOptions, register_path
from LearnedRegistrationLib.engine.regularization import diffusion
from LearnedRegistrationLib.engine.transforms import normalized_to_mm, resample_image

#: A quick schedule for 2 mm, 32^3 images. Without histogram matching: the pairs have one contrast
#: (nothing to match), and the matching needs SimpleITK, which the GPU machine of scripts/gpu_check.py lacks.
QUICK = RegistrationOptions(deformable_spacings_mm=(8.0, 4.0), deformable_iterations=(40, 20), affine_iterations=(20, 10),
                            histogram_matching=False, device="cpu")


@pytest.fixture(scope="module")
def quick(device):
    """:data:`QUICK` on the device under test."""
    return replace(QUICK, device=str(device))


@pytest.fixture(scope="module")
def demo():
    return make_demo_pair(size=32, seed=1)


@pytest.fixture(scope="module")
def path(demo, quick):
    return register_path(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, quick, PathOptions(knot_iterations=6))


def test_the_path_reproduces_the_optimizer_at_its_reference_knot(demo, path, quick):
    optimized = register_images(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, quick)
    assert 0.25 in path.knots and path.knots == sorted(path.knots)
    at = path.predict(0.25)
    np.testing.assert_allclose(at.displacement_ras, optimized.displacement_ras, atol=2e-3)  # float32 sampling vs float64
    np.testing.assert_allclose(at.warped, optimized.warped, atol=2e-3 * float(np.abs(demo.moving).max()))
    np.testing.assert_allclose(at.jacobian, optimized.jacobian, atol=5e-3)
    np.testing.assert_allclose(at.affine_ras, optimized.affine_ras)


def test_every_lambda_without_a_new_optimization_smoother_as_lambda_rises(demo, path):
    lambdas = [0.0, 0.05, 0.15, 0.25, 0.4, 0.7, 0.9, 0.97, 1.0]
    results = [path.predict(lam) for lam in lambdas]
    # The knots' velocities hold less diffusion energy as λ rises (what the optimization trades off;
    # between knots the interpolation is smoother still); the deformation vanishes at λ = 1.
    # A knot whose steps do not lower its objective keeps its neighbour's velocity (:mod:`engine.optimize`:
    # on this smooth phantom the knot below the reference does, with 6 steps), so non-increasing.
    energy = [float(diffusion(normalized_to_mm(v, path.control_grid), path.control_grid.spacing)) for v in path.velocities]
    assert all(a >= b for a, b in zip(energy, energy[1:])) and energy[0] > energy[-1], energy
    assert sdlogj(results[1].jacobian) > sdlogj(results[-3].jacobian) > sdlogj(results[-1].jacobian)
    assert sdlogj(results[-1].jacobian) < 1e-6  # the affine alone: a constant determinant
    world = demo.fixed_grid.world_points()
    affine_only = world @ path.affine_ras[:3, :3].T + path.affine_ras[:3, 3] - world
    np.testing.assert_allclose(results[-1].displacement_ras, affine_only, atol=1e-3)  # λ = 1: no deformation
    for lam, result in zip(lambdas, results):
        assert result.regularization_weight == lam and np.allclose(result.lambda_map, lam)
    # at a knot the path holds the knot's own velocity; between knots it interpolates in log(λ / (1 - λ))
    for knot, velocity in zip(path.knots, path.velocities):
        assert torch.equal(path.velocity(knot), velocity)
    middle = path.velocity(0.4)
    below, above = path.velocities[path.knots.index(0.25)], path.velocities[path.knots.index(0.5)]
    t = (np.log(0.4 / 0.6) - np.log(0.25 / 0.75)) / (np.log(0.5 / 0.5) - np.log(0.25 / 0.75))
    torch.testing.assert_close(middle, torch.lerp(below, above, float(t)))
    with pytest.raises(ValueError, match="λ must be in"):
        path.predict(1.5)


def test_the_path_registers_better_than_no_registration_at_every_knot(demo, path):
    before = np.mean((demo.moving - demo.fixed) ** 2)
    for knot in path.knots:
        warped = path.predict(knot).warped
        assert np.mean((warped - demo.fixed) ** 2) < before, knot


def test_state_round_trip_gives_the_same_outputs(demo, path):
    restored = LambdaPath.restore(path.state(), demo.fixed_grid, demo.moving, demo.moving_grid, device=path.device)
    for lam in (0.1, 0.6):
        np.testing.assert_array_equal(restored.predict(lam).displacement_ras, path.predict(lam).displacement_ras)


def test_cancel_and_bad_options(demo, quick):
    calls = []
    with pytest.raises(RegistrationCancelled):
        register_path(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, quick, PathOptions(knot_iterations=2),
                      progress=lambda f, m: calls.append(f), cancel=lambda: len(calls) > 20)
    with pytest.raises(ValueError, match="knots"):
        PathOptions(knots=(0.5, 0.2)).validated()
    with pytest.raises(ValueError, match="knots"):
        register_path(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, quick, PathOptions(knots=(0.0, 0.5)))


def _local_pair():
    """A pair whose deformation is a single bump in one corner; the rest does not move."""
    demo = make_demo_pair(size=32, seed=2, max_displacement_mm=0.0)  # the phantom, undeformed
    grid = demo.fixed_grid
    points = grid.world_points()
    centre = grid.center_ras + np.array([12.0, 10.0, 0.0])
    bump = np.exp(-((points - centre) ** 2).sum(-1) / (2 * 6.0**2))[..., None] * np.array([4.0, -3.0, 2.0])
    moving = resample_image(demo.fixed, grid, grid, -bump.astype(np.float32))
    return demo.fixed, grid, moving, bump, centre


def test_learned_lambda_map_is_in_zero_one_and_lower_where_the_pair_deforms(quick):
    fixed, grid, moving, bump, centre = _local_pair()
    # no affine (the pair needs none) and twice the quick iterations: with fewer, the reference knot
    # does not lower the similarity of this smooth phantom (its MSE is 1e-5) and is rolled back
    options = replace(quick, affine_model="none", deformable_iterations=(80, 40))
    path = register_path(fixed, grid, moving, grid, options, PathOptions(knot_iterations=4, spatially_varying=True))
    assert path.learned_map is not None
    result = path.predict(0.5)
    weight = result.lambda_map / 0.5  # λ(x) / the prior's mode: 1 is the uniform weight
    assert weight.min() > 0.0 and weight.max() < 2.0  # λ(x) ∈ (0, 1), divided by the mode 0.5
    assert weight.std() > 0.01  # not constant
    near = np.linalg.norm(grid.world_points() - centre, axis=-1) < 6.0
    far = np.linalg.norm(grid.world_points() - centre, axis=-1) > 20.0
    assert weight[near].mean() < weight[far].mean()  # less regularization where the registration needs freedom


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_a_path_asked_at_lambda_0_or_1_is_registered_around_the_default(demo, path, quick, lam):
    """No knot can sit at 0 or 1 (the path's interpolation is in log(λ / (1 - λ))): the path runs
    around the default λ, the same as the one registered there, and is evaluated at the λ asked."""
    at_end = register_path(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, replace(quick, regularization_weight=lam),
                           PathOptions(knot_iterations=6))
    assert at_end.knots == path.knots
    result = at_end.predict(lam)
    assert result.regularization_weight == lam
    np.testing.assert_allclose(result.displacement_ras, path.predict(lam).displacement_ras, atol=1e-4)
