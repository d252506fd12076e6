"""Pure helpers of the benchmark scripts (scripts/bench_helpers.py, scripts/benchmark.py).

Runs in seconds in the main environment: no antspyx / itk-elastix, no real data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_helpers  # noqa: E402
from bench_helpers import deform, dsc30, lps_field_to_ras, points_to_displacement, ratios, synthetic_deformation  # noqa: E402
from LearnedRegistrationLib.engine.grid import ImageGrid  # noqa: E402
from LearnedRegistrationLib.engine.imageio import grid_from_sitk, sitk_image  # noqa: E402
from LearnedRegistrationLib.engine.transforms import resample_image  # noqa: E402

from conftest import blobs, oblique_grid, rotation_about  # noqa: E402


def _oblique_grid(shape=(20, 22, 24), spacing=(1.5, 2.0, 2.5)) -> ImageGrid:
    # LIA-like orientation with a small rotation, so every LPS/RAS sign matters
    lia = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    return oblique_grid(shape, spacing, origin=(10.0, -20.0, 30.0), direction=rotation_about([0, 0, 1], np.rad2deg(0.2)) @ lia)


def test_dsc30_is_the_mean_of_the_worst_30_percent():
    per = {i: v for i, v in enumerate([0.9, 0.1, 0.8, 0.3, 0.7, 0.6, 0.5, 0.4, 0.95, 0.85])}
    assert dsc30(per) == pytest.approx(np.mean([0.1, 0.3, 0.4]))
    assert dsc30({1: 0.5, 2: 0.9}) == pytest.approx(0.5)  # ceil(0.6) = 1 label
    assert np.isnan(dsc30({}))


def test_itk_translation_field_converted_to_ras_matches_itk_resampling():
    """A peer's LPS field (here SimpleITK's, same as ANTs/elastix) on a known translation."""
    grid = _oblique_grid()
    image = blobs(grid)
    reference = sitk_image(image, grid)
    t_lps = (3.0, -2.0, 4.0)
    transform = sitk.TranslationTransform(3, t_lps)  # resampling transform: x -> x + t (LPS)
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    field_lps = sitk.GetArrayFromImage(to_field.Execute(transform))
    d = lps_field_to_ras(field_lps)
    assert d.shape == (*grid.shape, 3)
    np.testing.assert_allclose(d[0, 0, 0], [-3.0, 2.0, 4.0], atol=1e-5)  # (−L, −P, S)
    # our resampling with the converted field reproduces ITK's resampling of the same transform
    ours = resample_image(image, grid, grid, d)
    itk = sitk.GetArrayFromImage(sitk.Resample(reference, reference, transform, sitk.sitkLinear, 0.0))
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(ours[inner], itk[inner], atol=2e-3)
    assert grid_from_sitk(reference).same_geometry(grid)


def test_points_to_displacement_is_mapped_minus_grid_points():
    grid = _oblique_grid((4, 5, 6))
    d = points_to_displacement(grid.world_points() + [1.0, -2.0, 0.5], grid)
    np.testing.assert_allclose(d, np.broadcast_to([1.0, -2.0, 0.5], d.shape), atol=1e-5)


def test_synthetic_deformation_is_undone_by_its_true_displacement():
    grid = _oblique_grid((24, 24, 24), (2.0, 2.0, 2.0))
    image = blobs(grid)
    u, true_d = synthetic_deformation(grid, seed=0, max_displacement_mm=4.0, control_spacing_mm=20.0)
    moving = deform(image, grid, u)
    inner = (slice(4, -4),) * 3
    before = np.abs(moving - image)[inner].mean()
    assert before > 0.01  # it did deform
    restored = resample_image(moving, grid, grid, true_d.astype(np.float32))
    wrong_sign = resample_image(moving, grid, grid, (-true_d).astype(np.float32))
    # what is left is the interpolation error of two resamplings; the opposite sign makes it worse
    assert np.abs(restored - image)[inner].mean() < 0.3 * before
    assert np.abs(wrong_sign - image)[inner].mean() > before


def test_in_plane_deformation_has_no_through_slice_component():
    grid = _oblique_grid((6, 20, 20), (1.0, 1.0, 8.0))
    u, _ = synthetic_deformation(grid, seed=1, in_plane=True)
    np.testing.assert_allclose(u @ grid.direction[:, 2], 0.0, atol=1e-9)


def test_ratios_are_ours_over_peer_and_ours_minus_peer():
    out = ratios({"method": "ours", "runtime_s": 20.0, "dice_mean": 0.75}, {"method": "demons", "runtime_s": 80.0, "dice_mean": 0.70})
    assert out["time_ratio"] == pytest.approx(0.25)
    assert out["delta_dice_mean"] == pytest.approx(0.05)


def test_plan_and_network_rows():
    import benchmark

    flags = {"oasis_l2r_to_vxm": {"multimodal": False, "prealigned": True}, "multimodal_cardiac": {"multimodal": True, "prealigned": True}}
    jobs = benchmark.plan(["oasis_l2r_to_vxm", "multimodal_cardiac"], (0.1, 0.25), False, flags)
    oasis = [j for j in jobs if j["pair"] == "oasis_l2r_to_vxm"]
    assert {j["method"] for j in oasis} == {"identity", "demons", "ants", "elastix", "ours", "path", "path_sv"}
    assert [j["lambdas"] for j in oasis if j["method"] == "path"] == [[0.1, 0.25]]  # one run, every λ of the sweep
    assert sorted(j["lambda"] for j in oasis if j["method"] == "ours") == [0.1, 0.25]
    cardiac = [j for j in jobs if j["pair"] == "multimodal_cardiac"]
    assert "demons" not in {j["method"] for j in cardiac}
    assert {j["similarity"] for j in cardiac if j["method"] == "ours"} == {"mind", "mi", "ngf"}
    assert "path_sv" not in {j["method"] for j in cardiac}  # uniform against learned λ(x): OASIS only
    with_network = benchmark.plan(["oasis_l2r_to_vxm"], (0.25,), True, flags)
    assert {"network", "network+adapt"} <= {j["method"] for j in with_network}
    # The network rows run the shipped model through the logic's path (small pair: plumbing only).
    from LearnedRegistrationLib.engine.grid import ImageGrid

    grid = ImageGrid((20, 22, 18), (2.0, 2.0, 2.0), np.array([-18.0, -21.0, -19.0]), np.eye(3))
    p = grid.world_points()
    fixed = np.exp(-(p**2).sum(-1) / 200.0).astype(np.float32)
    moving = np.exp(-((p - [2.0, -1.0, 1.0]) ** 2).sum(-1) / 220.0).astype(np.float32)
    pair = {"fixed": fixed, "fixed_grid": grid, "moving": moving, "moving_grid": grid}
    rows = benchmark.run_network(pair, False, [0.25, 0.5], {"pair": "toy", "method": "network"}, None)
    assert [r["lambda"] for r in rows] == [0.25, 0.5] and all(r["label"].startswith("ours (network)") for r in rows)
    for r in rows:  # scored: Jacobian metrics of a finite field; one session, so one setup time in both
        assert np.isfinite(r["sdlogj"]) and 0.0 <= r["folding_percent"] <= 100.0
        assert 0.0 < r["update_s"] < r["runtime_s"]
    assert rows[0]["runtime_s"] - rows[0]["update_s"] == pytest.approx(rows[1]["runtime_s"] - rows[1]["update_s"])
    rows = benchmark.run_path(pair, False, [0.25, 0.5], {"pair": "toy", "method": "path"}, None)
    assert [r["lambda"] for r in rows] == [0.25, 0.5] and rows[0]["path_s"] == rows[1]["path_s"] > 0.0
    assert all(0.0 < r["update_s"] < r["runtime_s"] and np.isfinite(r["sdlogj"]) for r in rows)


def test_helpers_import_no_peer_tools():
    assert "ants" not in sys.modules and "itk" not in sys.modules
    assert bench_helpers.__name__ == "bench_helpers"


# --------------------------------------------------------------------------------- benchmark plan and verdict
def test_quick_plan_leaves_out_the_slowest_methods():
    import benchmark as bench

    flags = {"oasis_l2r_to_vxm": {"multimodal": False, "prealigned": True}, "synth_ct": {"multimodal": False, "prealigned": True}}
    quick = bench.plan(("oasis_l2r_to_vxm", "synth_ct"), (0.1, 0.25), True, flags, quick=True)
    full = bench.plan(("oasis_l2r_to_vxm", "synth_ct"), (0.1, 0.25), True, flags, quick=False)
    methods = lambda jobs, pair: [j["method"] for j in jobs if j["pair"] == pair]  # noqa: E731
    assert "elastix" not in methods(quick, "oasis_l2r_to_vxm") and "network+adapt" in methods(quick, "oasis_l2r_to_vxm")
    assert "demons" in methods(quick, "synth_ct") and "network+adapt" not in methods(quick, "synth_ct")
    assert "elastix" in methods(full, "synth_ct") and "network+adapt" in methods(full, "synth_ct")
    # the network runs once per pair and predicts every λ of the pair's sweep (default λ elsewhere)
    network = [j for j in full if j["method"] == "network"]
    assert [j["lambdas"] for j in network] == [[0.1, 0.25], [0.25]]
    # optimize, network+adapt and both λ paths, default λ, OASIS
    assert sum(j.get("snapshot", False) for j in full) == 4


def test_verdict_states_dice_and_time_against_ants():
    import benchmark as bench

    rows = [
        {"pair": "p", "method": "demons", "label": "demons", "dice_mean": 0.74, "runtime_s": 80.0},
        {"pair": "p", "method": "ants", "label": "ANTs", "dice_mean": 0.72, "runtime_s": 100.0},
        {"pair": "p", "method": "ours", "label": "fast", "lambda": 0.25, "similarity": "mse", "dice_mean": 0.75, "runtime_s": 8.0},
        {"pair": "p", "method": "network+adapt", "label": "slow", "lambda": 0.25, "dice_mean": 0.73, "runtime_s": 50.0},
        {"pair": "p", "method": "ours", "label": "other λ", "lambda": 0.5, "similarity": "mse", "dice_mean": 0.70, "runtime_s": 8.0},
    ]
    fast, slow = bench.verdict(rows, "p")
    assert "≥ best peer's 0.740" in fast and "0.08× ANTs" in fast and "met" in fast
    assert "0.010 below" in slow and "0.50× ANTs" in slow and "missed by 5.0×" in slow
    assert bench.verdict([r for r in rows if r["method"] != "ants"], "p") == []  # no ANTs time, no claim
