"""The network path: geometry of its outputs, test-time adaptation, and the interactive λ in the logic.

A tiny randomly initialized network (saved as a real checkpoint) stands in for the shipped one:
these tests check frames, plumbing and state, not registration quality (the OASIS end-to-end
test and ``scripts/benchmark_network.py`` do that).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import map_coordinates
from vtk.util import numpy_support

from LearnedRegistrationLib.bridge import mrml
from LearnedRegistrationLib.bridge.logic import DEFAULT_METHOD, RegistrationLogic
from LearnedRegistrationLib.engine.common import RegistrationCancelled, RegistrationOptions
from LearnedRegistrationLib.engine.grid import ImageGrid
from LearnedRegistrationLib.engine.path import LambdaPath, PathOptions
from LearnedRegistrationLib.engine.transforms import displacement_to_ras, resample_image
from LearnedRegistrationLib.learned.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
    save_checkpoint,
)
from LearnedRegistrationLib.learned.network import NetworkConfig, RegistrationNetwork
from LearnedRegistrationLib.learned.predict import NetworkRegistration, adapt

from conftest import blobs, oblique_grid, random_network

TINY = NetworkConfig(
    encoder_features=(4, 8, 8), decoder_features=(8,), head_features=4, condition_features=8, integration_steps=4, output_level=1
)
LIA = [[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]
METADATA = {"working_grid": {"spacing_mm": 3.0, "direction_ras": LIA}}


def tiny_network(seed: int = 0) -> RegistrationNetwork:
    return random_network(TINY, seed)


@pytest.fixture
def tiny_model(tmp_path):
    return save_checkpoint(tmp_path / "tiny.pt", tiny_network(), METADATA)


def pair():
    fixed_grid = oblique_grid((13, 17, 11), (1.3, 0.9, 2.1), seed=3)
    moving_grid = oblique_grid((15, 12, 14), (1.1, 1.6, 1.4), seed=5, origin=(10.0, -28.0, 40.0))
    moving_grid = ImageGrid(moving_grid.shape, moving_grid.spacing, fixed_grid.center_ras - moving_grid.direction @ (
        np.asarray(moving_grid.spacing) * (np.asarray(moving_grid.size_ijk) - 1) / 2), moving_grid.direction)
    return blobs(fixed_grid), fixed_grid, blobs(moving_grid, (1.5, -1.0, 0.5)), moving_grid


AFFINE = np.array([[1.02, 0.01, 0.0, 1.5], [-0.01, 0.99, 0.02, -1.0], [0.0, -0.02, 1.01, 0.5], [0, 0, 0, 1.0]])


# --------------------------------------------------------------------------------- geometry
def test_outputs_lie_on_odd_anisotropic_oblique_fixed_grid_and_match_an_independent_resampling():
    fixed, fixed_grid, moving, moving_grid = pair()
    net = tiny_network()
    session = NetworkRegistration(net, METADATA, fixed, fixed_grid, moving, moving_grid, AFFINE, "cpu")
    result = session.predict(0.3)
    assert result.warped.shape == result.jacobian.shape == result.lambda_map.shape == fixed_grid.shape
    assert result.displacement_ras.shape == (*fixed_grid.shape, 3)
    assert all(n % net.config.divisor == 0 for n in session.work.shape)
    assert np.allclose(session.work.spacing, 3.0) and np.allclose(session.work.direction, LIA)

    # Independent path: the coarse field as a RAS displacement on its own grid, interpolated by
    # scipy at the fixed voxels' world positions.
    with torch.no_grad():
        out = session.network.decode_coarse(session.encoded, 0.3)
    coarse_grid = session.work.resized(out.displacement.shape[2:])
    coarse_ras = displacement_to_ras(out.displacement, coarse_grid, AFFINE)  # (Z, Y, X, 3)
    world = fixed_grid.world_points().reshape(-1, 3)
    ijk = (coarse_grid.ras_to_ijk @ np.c_[world, np.ones(len(world))].T)[:3]
    kji = ijk[::-1]
    expected = np.stack([map_coordinates(coarse_ras[..., c], kji, order=1, mode="nearest") for c in range(3)], -1)
    # Inside the coarse grid (outside it the two differ on purpose: ours clamps only the deformable
    # part and keeps the affine exact).
    inside = np.all((kji > -1e-6) & (kji < np.asarray(coarse_grid.shape)[:, None] - 1 + 1e-6), axis=0)
    assert inside.mean() > 0.8
    assert np.abs(result.displacement_ras.reshape(-1, 3)[inside] - expected[inside]).max() < 1e-3
    assert np.abs(expected - (world @ AFFINE[:3, :3].T + AFFINE[:3, 3] - world)).max() > 0.05  # not just the affine

    # The warped image is the moving image resampled through that displacement.
    warped = resample_image(moving, moving_grid, fixed_grid, result.displacement_ras)
    assert np.abs(result.warped - warped).max() < 1e-4
    assert 0.0 < result.lambda_map.min() and result.lambda_map.max() < 0.3


def test_axis_aligned_fast_path_matches_grid_sample_and_keeps_the_affine_exact_to_the_last_voxel():
    # A fixed grid axis-aligned with the working grid (permuted, flipped, anisotropic, odd) takes
    # the separable resampler; forcing the generic grid_sample path must give the same result.
    fixed_grid = ImageGrid((13, 17, 11), (1.3, 0.9, 2.1), np.array([12.5, -30.25, 41.0]), np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]]))
    _, _, moving, moving_grid = pair()
    fixed = blobs(fixed_grid)
    session = NetworkRegistration(tiny_network(), METADATA, fixed, fixed_grid, moving, moving_grid, AFFINE, "cpu")
    fast = session.predict(0.3)
    assert session._sampler._resampler is not None  # engine.fields.FixedGridSampler
    session._sampler._resampler = None  # generic path (the geometry is cached for this output shape)
    generic = session.predict(0.3)
    assert np.abs(fast.displacement_ras - generic.displacement_ras).max() < 1e-4
    assert np.abs(fast.warped - generic.warped).max() < 1e-5
    assert np.abs(fast.lambda_map - generic.lambda_map).max() < 1e-6

    # With a network that predicts no deformation, the displacement is the affine's at every
    # fixed voxel, the outermost ones included (they lie beyond the working grid's voxel centres).
    still = tiny_network()
    with torch.no_grad():
        still.velocity_head.weight.zero_()
        still.velocity_head.bias.zero_()
    session = NetworkRegistration(still, METADATA, fixed, fixed_grid, moving, moving_grid, AFFINE, "cpu")
    world = fixed_grid.world_points()
    affine_only = world @ AFFINE[:3, :3].T + AFFINE[:3, 3] - world
    assert np.abs(session.predict(0.5).displacement_ras - affine_only).max() < 1e-4


def test_lambda_changes_the_field_and_bad_lambda_is_refused():
    fixed, fixed_grid, moving, moving_grid = pair()
    session = NetworkRegistration(tiny_network(), METADATA, fixed, fixed_grid, moving, moving_grid, None, "cpu")
    low, high = session.predict(0.0), session.predict(1.0)
    assert np.abs(low.displacement_ras - high.displacement_ras).max() > 1e-3
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="λ"):
            session.predict(bad)
    with pytest.raises(ValueError, match="working_grid"):
        NetworkRegistration(tiny_network(), {}, fixed, fixed_grid, moving, moving_grid)


# --------------------------------------------------------------------------------- adaptation
#: A small, fast optimizer schedule for the adaptation tests (two pyramid levels, few steps).
QUICK = RegistrationOptions(affine_model="none", affine_spacings_mm=(), affine_iterations=(), deformable_spacings_mm=(6.0, 3.0),
                            deformable_iterations=(6, 4), device="cpu")


def test_network_velocity_on_another_grid_gives_the_networks_own_displacement():
    """velocity_on() rotates and resamples the network's velocity into another grid's frame. With a
    constant velocity (a translation), a λ path holding it reproduces the network's displacement
    at every fixed voxel; a frame error (axis order, sign, units) would not."""
    fixed, fixed_grid, moving, moving_grid = pair()
    network = tiny_network()
    with torch.no_grad():
        network.velocity_head.weight.zero_()
        network.velocity_head.bias.copy_(torch.tensor([0.05, -0.03, 0.02]))  # normalized working units
    session = NetworkRegistration(network, METADATA, fixed, fixed_grid, moving, moving_grid, AFFINE, "cpu")
    control = fixed_grid.with_spacing(2.5)  # another grid: the fixed image's extent, its orientation
    path = LambdaPath([0.3], [session.velocity_on(0.3, control)], control, fixed_grid, moving, moving_grid, AFFINE,
                      None, None, network.config.integration_steps, "mse", "cpu")
    expected = session.predict(0.3).displacement_ras
    affine_only = fixed_grid.world_points() @ AFFINE[:3, :3].T + AFFINE[:3, 3] - fixed_grid.world_points()
    assert np.linalg.norm(expected - affine_only, axis=-1).min() > 0.5  # a real translation (mm) on top of the affine
    np.testing.assert_allclose(path.predict(0.3).displacement_ras, expected, atol=1e-3)


def test_adaptation_is_the_lambda_path_started_from_the_network_and_keeps_the_weights(tiny_model):
    fixed, fixed_grid, moving, moving_grid = pair()
    file_bytes = tiny_model.read_bytes()
    cached, metadata = load_checkpoint(tiny_model)
    before = {k: v.clone() for k, v in cached.state_dict().items()}
    session = NetworkRegistration(cached, metadata, fixed, fixed_grid, moving, moving_grid, None, "cpu")
    start = {lam: session.predict(lam).displacement_ras for lam in (0.05, 0.3, 0.6)}

    calls = []
    with pytest.raises(RegistrationCancelled):
        adapt(session, QUICK, PathOptions(knots=(0.2, 0.5), knot_iterations=2), cancel=lambda: len(calls) > 5,
              progress=lambda f, m: calls.append(f))
    assert np.array_equal(session.predict(0.3).displacement_ras, start[0.3])  # the network session is untouched

    path = adapt(session, QUICK, PathOptions(knots=(0.2, 0.5), knot_iterations=4))
    assert isinstance(path, LambdaPath) and path.knots == [0.2, 0.25, 0.5]  # the reference λ is a knot
    for lam, field in start.items():  # every slider position changed, instantly (no new run)
        assert np.abs(path.predict(lam).displacement_ras - field).max() > 1e-4, lam
    for k, v in cached.state_dict().items():
        assert torch.equal(v, before[k]), f"adaptation changed the cached network's {k}"
    for k, v in session.network.state_dict().items():
        assert torch.equal(v, before[k]), f"adaptation changed the session's network {k}"
    assert tiny_model.read_bytes() == file_bytes
    with pytest.raises(ValueError, match="knots"):
        adapt(session, QUICK, PathOptions(knots=(0.5, 0.2)))


def session_without_adaptation(network, metadata):
    fixed, fixed_grid, moving, moving_grid = pair()
    return NetworkRegistration(network, metadata, fixed, fixed_grid, moving, moving_grid, None, "cpu")


# --------------------------------------------------------------------------------- logic
def add_volume(scene, array, grid, name):
    return mrml.updateVolumeNodeFromArray(scene, array, grid, None, name)


def voxels(node) -> np.ndarray:
    """A copy of a volume node's voxel values (any number of components)."""
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).copy()


def test_set_regularization_updates_the_same_nodes_in_place(slicer_app, tiny_model):
    scene = slicer_app.scene
    fixed, fixed_grid, moving, moving_grid = pair()
    fixedNode = add_volume(scene, fixed, fixed_grid, "fixed")
    movingNode = add_volume(scene, moving, moving_grid, "moving")
    logic = RegistrationLogic()
    assert not logic.canSetRegularizationInstantly()
    with pytest.raises(RuntimeError, match="network"):
        logic.setRegularization(0.5)

    outputs = logic.register(fixedNode, movingNode, method="network", modelPath=str(tiny_model),
                             regularizationWeight=0.1, device="cpu")
    assert outputs.metrics["method"] == "network" and outputs.metrics["lambda"] == pytest.approx(0.1)
    assert logic.canSetRegularizationInstantly()
    nodes = {k: getattr(outputs, k) for k in ("warpedVolumeNode", "displacementVolumeNode", "transformNode",
                                              "checkerboardVolumeNode", "differenceVolumeNode",
                                              "jacobianVolumeNode", "lambdaMapVolumeNode")}
    count = scene.GetNumberOfNodes()
    displacement = voxels(outputs.displacementVolumeNode)
    lambdaMap = voxels(outputs.lambdaMapVolumeNode)

    again = logic.setRegularization(0.9)
    assert scene.GetNumberOfNodes() == count
    for key, node in nodes.items():
        assert getattr(again, key) is node, key
    assert again.metrics["lambda"] == pytest.approx(0.9)
    assert np.abs(voxels(again.displacementVolumeNode) - displacement).max() > 1e-3
    assert voxels(again.lambdaMapVolumeNode).mean() > 2 * lambdaMap.mean()
    with pytest.raises(ValueError, match="λ"):
        logic.setRegularization(1.5)

    # An optimizer run ends the interactive network session.
    logic.register(fixedNode, movingNode, method="optimize", device="cpu", iterationScale=0.05, workingSpacingMm=4.0)
    assert not logic.canSetRegularizationInstantly()


def test_missing_or_corrupt_weights_name_the_file_and_leave_the_scene_alone(slicer_app, tmp_path):
    scene = slicer_app.scene
    fixed, fixed_grid, moving, moving_grid = pair()
    fixedNode = add_volume(scene, fixed, fixed_grid, "fixed")
    movingNode = add_volume(scene, moving, moving_grid, "moving")
    count = scene.GetNumberOfNodes()
    logic = RegistrationLogic()
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        logic.register(fixedNode, movingNode, method="network", modelPath=str(missing), device="cpu")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        logic.register(fixedNode, movingNode, method="network+adapt", modelPath=str(corrupt), device="cpu")
    assert scene.GetNumberOfNodes() == count


def test_method_choice_and_its_errors(slicer_app, tiny_model, tmp_path):
    scene = slicer_app.scene
    fixed, fixed_grid, moving, moving_grid = pair()
    fixedNode = add_volume(scene, fixed, fixed_grid, "fixed")
    movingNode = add_volume(scene, moving, moving_grid, "moving")
    lambdaNode = add_volume(scene, np.full(fixed_grid.shape, 0.5, np.float32), fixed_grid, "lambda")
    logic = RegistrationLogic()
    assert logic.prepareRegistration(fixedNode, movingNode).method == DEFAULT_METHOD == "path"
    with pytest.raises(ValueError, match="unknown registration method"):
        logic.prepareRegistration(fixedNode, movingNode, method="magic")
    with pytest.raises(ValueError, match="optimize"):
        logic.prepareRegistration(fixedNode, movingNode, method="network", lambdaMapNode=lambdaNode)
    with pytest.raises(ValueError, match="adaptation steps"):
        logic.prepareRegistration(fixedNode, movingNode, method="network+adapt", adaptationSteps=-1)
    request = logic.prepareRegistration(fixedNode, movingNode, method="network+adapt", adaptationSteps=3,
                                        modelPath=str(tiny_model), device="cpu")
    computed = logic.computeRegistration(request)
    assert computed.metrics["adaptation_steps"] == 3  # Adam steps per knot of the adapted λ path
    assert computed.metrics["method"] == "network+adapt"


# --------------------------------------------------------------------------------- command line
def test_cli_network_method_and_lambda_sweep_write_metrics_and_plot(tmp_path, tiny_model):
    from LearnedRegistrationLib.app import cli

    out = tmp_path / "out"
    status = cli.main(["register", "--output-dir", str(out), "--method", "network", "--model", str(tiny_model),
                       "--lambda", "0.3", "--lambda-sweep", "0.1,0.5,0.9", "--device", "cpu", "--quiet",
                       "--demo-size", "32"])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "network" and metrics["lambda"] == pytest.approx(0.3)
    sweep = json.loads((out / "lambda_sweep.json").read_text())
    assert [r["lambda"] for r in sweep] == [0.1, 0.5, 0.9] == [r["lambda"] for r in metrics["lambda_sweep"]]
    assert all("dice_mean" in r and "folding_percent" in r for r in sweep)
    assert (out / "lambda_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The files hold the registration at --lambda, not at the sweep's last λ.
    lam_map = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lambda_map.nrrd")))
    assert 0.0 < lam_map.max() <= 0.3 + 1e-6

    assert cli.main(["register", "--output-dir", str(tmp_path / "bad"), "--lambda-sweep", "0.1,2", "--quiet"]) == cli.EXIT_USER_ERROR
    assert cli.main(["register", "--output-dir", str(tmp_path / "bad"), "--method", "network", "--model",
                     str(tmp_path / "missing.pt"), "--quiet", "--demo-size", "32"]) == cli.EXIT_USER_ERROR
    assert not (tmp_path / "bad").exists()
