"""Clinical-size volumes (issue 16, item 5): the full-resolution outputs in slabs, bounded memory, and
a clear refusal before any heavy work when a registration will not fit in memory.

The slab tests force one-slice slabs (``common.SLAB_VOXELS``) on small grids and compare with a
single slab; the memory test registers a 12.6 M-voxel volume in a child process and reads its
peak RSS; the refusal tests simulate a short machine with ``LEARNEDREG_MEMORY_LIMIT_GB``.
``scripts/benchmark_large_volume.py`` measures the 512 x 512 x 400 case.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from LearnedRegistrationLib.app.demo import make_demo_pair
from LearnedRegistrationLib.engine import common
from LearnedRegistrationLib.engine.common import MEMORY_LIMIT_ENV, RegistrationOptions, available_memory_bytes
from LearnedRegistrationLib.engine.fields import FixedGridOutputs, FixedGridSampler, warp_and_displacement
from LearnedRegistrationLib.engine.grid import ImageGrid
from LearnedRegistrationLib.engine.metrics import folding_percent, jacobian_map, sdlogj
from LearnedRegistrationLib.engine.optimize import check_memory, estimate_memory, register_images
from LearnedRegistrationLib.engine.path import register_path
from LearnedRegistrationLib.engine.transforms import displacement_to_ras, resample_image
from LearnedRegistrationLib.engine.visualization import checkerboard, difference

from conftest import REPO_ROOT, blobs, oblique_grid, rotation_about

QUICK = dict(deformable_spacings_mm=(8.0, 4.0), deformable_iterations=(10, 5), affine_iterations=(5, 5), device="cpu")


def in_slabs(monkeypatch, compute, voxels: int = 1):
    """``compute()`` once with the whole volume in one slab and once with slabs of about ``voxels``
    voxels (one slice each by default): both results."""
    monkeypatch.setattr(common, "SLAB_VOXELS", 1 << 40)
    whole = compute()
    monkeypatch.setattr(common, "SLAB_VOXELS", voxels)
    return whole, compute()


def assert_same(whole, slabbed, atol=1e-5):
    for a, b in zip(whole if isinstance(whole, tuple) else (whole,), slabbed if isinstance(slabbed, tuple) else (slabbed,)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol, rtol=1e-6)


# --------------------------------------------------------------------------------------------- slabs
@pytest.mark.parametrize("oblique_frame", [False, True])
def test_fixed_grid_outputs_in_slabs_equal_the_whole_volume(monkeypatch, oblique_frame):
    """Axis-aligned frame (1-D passes, restricted to a slab's rows) and an oblique one (grid_sample on
    a slab's positions): the same warped image, displacement, Jacobian and λ map."""
    fixed_grid = oblique_grid((13, 11, 12), (1.5, 1.2, 2.0), seed=5)
    moving_grid = oblique_grid((12, 14, 10), (1.7, 1.3, 1.9), seed=6)
    frame = fixed_grid
    if oblique_frame:  # a working grid rotated against the fixed grid, as the network's may be
        frame = ImageGrid((9, 8, 10), (2.5, 2.5, 2.5), fixed_grid.origin, rotation_about([1, -1, 2], 20) @ fixed_grid.direction)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation_about([0, 1, 1], 5), [1.5, -2.0, 0.5]
    sampler = FixedGridSampler(fixed_grid, frame, affine, moving_grid, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    u = 0.05 * torch.randn(1, 3, 5, 6, 4, generator=generator)
    learned = torch.rand(1, 1, 5, 6, 4, generator=generator) + 0.5
    user = np.random.default_rng(1).uniform(0.2, 1.0, fixed_grid.shape).astype(np.float32)
    moving = torch.as_tensor(blobs(moving_grid))[None, None]

    def compute():
        out = FixedGridOutputs(sampler, moving, u, 0.3, user, learned)
        return out.warped, out.displacement_ras, out.jacobian, out.lambda_map

    whole, slabbed = in_slabs(monkeypatch, compute)
    assert (sampler._resampler is None) == oblique_frame  # the path taken
    assert_same(whole, slabbed)
    assert np.ptp(whole[0]) > 0.1 and np.abs(whole[1]).max() > 1.0  # not a trivial field
    # the network's entry point gives the same
    warped, displacement, extra = warp_and_displacement(sampler, moving, u, learned)
    assert_same((warped, displacement), whole[:2])
    assert extra.shape == (1, *fixed_grid.shape)


def test_resampling_displacements_and_derived_volumes_in_slabs_equal_the_whole_volume(monkeypatch):
    grid = oblique_grid((14, 15, 16), (2.0, 2.0, 2.5), seed=2)
    moving_grid = oblique_grid((12, 13, 11), (2.2, 1.9, 2.4), seed=4)
    image = blobs(moving_grid)
    labels = (image > 0.3).astype(np.int32) + (image > 0.7)
    rng = np.random.default_rng(0)
    field = rng.normal(0.0, 1.5, (*grid.shape, 3)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = [2.0, -1.0, 3.0]
    velocity = 0.02 * torch.randn(1, 3, *grid.shape, generator=torch.Generator().manual_seed(3))
    fixed = blobs(grid)
    # the checkerboard's rescaling reads percentiles of its input: give both runs the same one (the
    # slabbed warped image differs from the whole one by rounding, 2e-7)
    warped_once = resample_image(image, moving_grid, grid, field)

    def compute():
        warped = resample_image(image, moving_grid, grid, field)
        jac = jacobian_map(field, grid)
        return (
            warped,
            resample_image(labels, moving_grid, grid, field, mode="nearest"),
            resample_image(image, moving_grid, grid, affine_ras=affine, default_value=-1.0),
            displacement_to_ras(velocity, grid, affine),
            jac,
            checkerboard(fixed, warped_once, grid, 7.0),
            difference(fixed, warped_once),
            np.array([sdlogj(jac), folding_percent(jac), sdlogj(jac, fixed > 0.2), folding_percent(jac, fixed > 0.2)]),
        )

    whole, slabbed = in_slabs(monkeypatch, compute)
    assert_same(whole, slabbed)
    assert 0 < whole[7][1] < 100  # the random field folds somewhere: the count is exercised


def test_slabs_cover_every_slice_once():
    for shape, voxels in [((400, 512, 512), common.SLAB_VOXELS), ((7, 3, 3), 20), ((5, 100, 100), 1)]:
        slabs = common.z_slabs(shape, voxels)
        assert [z for z0, z1 in slabs for z in range(z0, z1)] == list(range(shape[0]))
        assert all(z1 - z0 == max(1, voxels // (shape[1] * shape[2])) for z0, z1 in slabs[:-1])
    assert len(common.z_slabs((400, 512, 512))) == 50  # 8 slices of a 512 x 512 CT per slab


# --------------------------------------------------------------------------------------------- memory
_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(2)
    from LearnedRegistrationLib.engine import common
    from LearnedRegistrationLib.engine.common import RegistrationOptions
    from LearnedRegistrationLib.engine.grid import ImageGrid
    # slabs of 1 MB a channel: at this size the default slab's temporaries (about 200 MB) would be
    # 4 volumes; at 512 x 512 x 400 they are half of one
    common.SLAB_VOXELS = 1 << 18
    from LearnedRegistrationLib.engine.optimize import register_images

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    shape = (192, 256, 256)
    grid = ImageGrid(shape, (1.0, 1.0, 1.2), np.zeros(3), np.eye(3))
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    fixed = (np.sin(i / 9.0) * np.cos(j / 11.0) + np.cos(k / 7.0)).astype(np.float32)
    moving = np.roll(fixed, 2, axis=2)
    # a deformable stage on a coarse pyramid, so that the outputs carry a real field
    options = RegistrationOptions(affine_model="none", deformable_spacings_mm=(16.0, 8.0), deformable_iterations=(3, 2),
                                  device="cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here
    before = status("VmRSS")
    result = register_images(fixed, grid, moving, grid, options)
    print(json.dumps({"extra": status("VmHWM") - before, "volume": fixed.nbytes}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
def test_a_large_registration_peaks_near_the_size_of_its_outputs():
    """12.6 M voxels (50 MB a volume): the outputs are 6 volumes (warped, displacement x3, Jacobian,
    λ map); preparation, slabs and torch's own first allocations add a few more (11.0 and 12.0
    measured in two environments, 2 CPU threads). Before the outputs were computed in slabs, the
    float64 world points, their displacement and the sampling grid alone took 20 volumes more."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "LearnedRegistration"), OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    volumes = measured["extra"] / measured["volume"]
    assert volumes < 14.0, f"peak {volumes:.1f} volumes above the inputs"


# --------------------------------------------------------------------------------------------- refusal
@pytest.fixture(scope="module")
def demo():
    return make_demo_pair(size=32, seed=1)


@pytest.mark.parametrize("method", ["optimize", "path"])
def test_a_registration_that_does_not_fit_is_refused_before_any_heavy_work(monkeypatch, demo, method):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "0.001")
    calls = []

    def must_not_run(*args, **kwargs):
        raise AssertionError("the images were prepared although the registration does not fit")

    from LearnedRegistrationLib.engine import optimize

    monkeypatch.setattr(optimize, "normalize_intensity", must_not_run)
    register = register_images if method == "optimize" else register_path
    with pytest.raises(ValueError) as error:
        register(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, RegistrationOptions(**QUICK),
                 progress=lambda fraction, message: calls.append(message))
    message = str(error.value)
    assert "\n" not in message and calls == []
    assert re.search(r"needs about [\d.]+ GB .* but 0\.00 GB is available", message), message
    assert "crop or resample the fixed image" in message  # 1 MB does not even hold the outputs


def test_the_refusal_names_a_coarser_working_spacing_that_fits(monkeypatch):
    """A large field of view registered at 1 mm: the outputs fit, the optimizer's 1 mm level does not."""
    grid = ImageGrid((160, 200, 200), (1.0, 1.0, 1.0), np.zeros(3), np.eye(3))
    options = RegistrationOptions(similarity="lncc", deformable_spacings_mm=(2.0, 1.0), deformable_iterations=(10, 10))
    fine = estimate_memory(grid, grid, options)
    assert fine.registration > max(fine.outputs, fine.preparation)
    limit = max(fine.outputs, fine.preparation) * 1.05
    monkeypatch.setenv(MEMORY_LIMIT_ENV, f"{limit / 1e9:.4f}")
    with pytest.raises(ValueError, match="not enough memory") as error:
        check_memory(grid, grid, options, torch.device("cpu"))
    found = re.search(r"--working-spacing ([\d.]+) on the command line \(workingSpacingMm=([\d.]+) in Slicer", str(error.value))
    assert found and found.group(1) == found.group(2), str(error.value)
    spacing = float(found.group(1))
    assert spacing > 1.0
    # the suggestion fits (the pyramid scaled as the logic's workingSpacingMm scales it)
    coarser = RegistrationOptions(similarity="lncc", deformable_spacings_mm=(2.0 * spacing, spacing), deformable_iterations=(10, 10))
    assert check_memory(grid, grid, coarser, torch.device("cpu")).peak <= limit


def test_the_memory_limit_variable(monkeypatch):
    for bad in ("lots", "-2", "0", "nan"):
        monkeypatch.setenv(MEMORY_LIMIT_ENV, bad)
        with pytest.raises(ValueError, match=MEMORY_LIMIT_ENV):
            available_memory_bytes()
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "3.5")
    assert available_memory_bytes() == 3_500_000_000
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    if sys.platform.startswith("linux"):  # MemAvailable of /proc/meminfo
        assert 0 < available_memory_bytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_registration_that_fits_is_not_refused(monkeypatch, demo):
    options = RegistrationOptions(**QUICK)
    need = estimate_memory(demo.fixed_grid, demo.moving_grid, options).peak
    monkeypatch.setenv(MEMORY_LIMIT_ENV, f"{1.01 * need / 1e9:.6f}")
    result = register_images(demo.fixed, demo.fixed_grid, demo.moving, demo.moving_grid, options)
    assert result.warped.shape == demo.fixed_grid.shape


def test_read_only_inputs_reach_torch_without_a_copy_or_a_warning():
    """The logic hands the engine read-only views of Slicer's voxels (one volume less each)."""
    import warnings

    from LearnedRegistrationLib.engine.common import volume_tensor

    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    image.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = volume_tensor(image)
    assert tensor.shape == (1, 1, 2, 3, 4) and np.shares_memory(tensor.numpy(), image)
