"""The MRML bridge on a real slicer-core scene: nodes <-> arrays, RAS/LPS, transforms, MRB, in-place updates.

Everything here is synthetic and engine-free (fast); the engine runs in test_cli.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

from LearnedRegistrationLib.bridge import mrml
from LearnedRegistrationLib.bridge.logic import (
    ComputedRegistration,
    RegistrationLogic,
    RegistrationOutputNodes,
    RegistrationRequest,
)
from LearnedRegistrationLib.engine.grid import ImageGrid
from LearnedRegistrationLib.engine.metrics import interpolate_displacement
from LearnedRegistrationLib.engine.transforms import resample_image

from conftest import oblique_grid

TOLERANCE_MM = 1e-4  # float32 storage of mm values of order 100


def smooth_field(grid: ImageGrid, amplitude=2.0) -> np.ndarray:
    """A smooth (Z, Y, X, 3) RAS mm displacement on ``grid``."""
    p = grid.world_points() - grid.center_ras
    return amplitude * np.stack(
        [np.sin(p[..., 1] / 9.0), np.cos(p[..., 2] / 7.0), np.sin((p[..., 0] + p[..., 1]) / 11.0)], axis=-1
    ).astype(np.float32)


def smooth_image(grid: ImageGrid) -> np.ndarray:
    p = grid.world_points() - grid.center_ras
    return (100 + 40 * np.sin(p[..., 0] / 6.0) * np.cos(p[..., 1] / 8.0) + p[..., 2]).astype(np.float32)


def node_names(scene, className):
    return sorted(scene.GetNthNodeByClass(i, className).GetName() for i in range(scene.GetNumberOfNodesByClass(className)))


def scene_node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


# ------------------------------------------------------------------------------------------ volumes
def test_volume_round_trip_keeps_values_order_and_oblique_geometry(slicer_app):
    grid = oblique_grid()
    array = np.arange(np.prod(grid.shape), dtype=np.float32).reshape(grid.shape)
    node = mrml.updateVolumeNodeFromArray(slicer_app.scene, array, grid, name="oblique")

    # KJI (numpy) vs IJK (VTK): voxel array[k, j, i] is VTK voxel (i, j, k)
    k, j, i = 3, 5, 11
    assert node.GetImageData().GetDimensions() == grid.size_ijk
    assert node.GetImageData().GetScalarComponentAsDouble(i, j, k, 0) == array[k, j, i]
    # RAS geometry: Slicer's IJK-to-RAS equals the grid's
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose(mrml.arrayFromVtkMatrix(matrix), grid.ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(node.GetSpacing(), grid.spacing, rtol=1e-12)

    values, read_grid = mrml.arrayFromVolumeNode(node)
    assert values.dtype == np.float32 and values.shape == grid.shape
    np.testing.assert_array_equal(values, array)
    assert read_grid.same_geometry(grid, tol_mm=1e-6)
    np.testing.assert_allclose(read_grid.direction, grid.direction, atol=1e-12)


def test_volume_files_carry_lps_geometry_for_simpleitk_and_reload(slicer_app, tmp_path):
    grid = oblique_grid()
    array = smooth_image(grid)
    node = mrml.updateVolumeNodeFromArray(slicer_app.scene, array, grid, name="image")
    for file_name in ("image.nrrd", "image.nii.gz"):
        path = slicer_app.saveNode(node, tmp_path / file_name)
        image = sitk.ReadImage(str(path))
        itk_array = sitk.GetArrayFromImage(image)
        itk_grid = ImageGrid.from_lps(itk_array.shape, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        assert itk_grid.same_geometry(grid, tol_mm=1e-3), file_name
        np.testing.assert_allclose(itk_array, array, rtol=1e-6)
        reloaded = slicer_app.loadVolume(path)
        values, read_grid = mrml.arrayFromVolumeNode(reloaded)
        assert read_grid.same_geometry(grid, tol_mm=1e-3), file_name
        np.testing.assert_allclose(values, array, rtol=1e-6)


def test_linear_parent_transform_moves_the_grid_and_nonlinear_one_is_refused(slicer_app):
    grid = oblique_grid()
    node = mrml.updateVolumeNodeFromArray(slicer_app.scene, smooth_image(grid), grid, name="image")
    shift = np.eye(4)
    shift[:3, 3] = [5.0, -7.0, 2.5]
    linear = slicer_app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    linear.SetMatrixTransformToParent(mrml.vtkMatrixFromArray(shift))
    node.SetAndObserveTransformNodeID(linear.GetID())
    np.testing.assert_allclose(mrml.gridFromVolumeNode(node).origin, grid.origin + shift[:3, 3], atol=1e-9)

    grid_transform = mrml.updateGridTransformNode(slicer_app.scene, smooth_field(grid), grid, name="warp")
    node.SetAndObserveTransformNodeID(grid_transform.GetID())
    with pytest.raises(ValueError, match="harden"):
        mrml.arrayFromVolumeNode(node)


def test_label_map_and_segmentation_become_labels_on_the_image_grid(slicer_app):
    scene = slicer_app.scene
    grid = oblique_grid()
    image = mrml.updateVolumeNodeFromArray(scene, smooth_image(grid), grid, name="image")
    labels = np.zeros(grid.shape, np.int16)
    labels[2:6, 3:9, 4:12] = 3
    labels[7:11, 8:13, 2:7] = 7
    label_node = mrml.updateVolumeNodeFromArray(scene, labels, grid, name="labels", className="vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(mrml.labelArrayFromLabelMapNode(label_node, grid), labels)

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, segmentation)
    nodes_before = scene.GetNumberOfNodes()
    values, names = mrml.labelArrayFromSegmentationNode(segmentation, image)
    assert scene.GetNumberOfNodes() == nodes_before  # the temporary label map is gone
    assert len(names) == 2
    np.testing.assert_array_equal(values == 1, labels == 3)
    np.testing.assert_array_equal(values == 2, labels == 7)

    # A second segmentation is numbered by segment name, whatever its own order
    reversed_names = list(reversed(names))
    values_by_name, names_out = mrml.labelArrayFromSegmentationNode(segmentation, image, reversed_names)
    assert names_out == reversed_names
    np.testing.assert_array_equal(values_by_name == 1, labels == 7)

    # And back: warped-label output as a segmentation, with the names
    output = mrml.updateSegmentationNodeFromLabels(scene, values, grid, None, "out", names)
    assert sorted(output.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)) == sorted(names)
    round_trip, _ = mrml.labelArrayFromSegmentationNode(output, image, names)
    np.testing.assert_array_equal(round_trip, values)


def test_markups_points_are_world_ras(slicer_app):
    scene = slicer_app.scene
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    points = np.array([[1.0, 2.0, 3.0], [-4.5, 5.0, 60.0]])
    for point in points:
        markups.AddControlPoint(vtk.vtkVector3d(*point))
    np.testing.assert_allclose(mrml.pointsFromMarkupsNode(markups), points)
    shift = np.eye(4)
    shift[:3, 3] = [10.0, 0.0, -1.0]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(mrml.vtkMatrixFromArray(shift))
    markups.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(mrml.pointsFromMarkupsNode(markups), points + shift[:3, 3])


# ------------------------------------------------------------------------------------------ displacement
def test_vector_volume_and_grid_transform_hold_the_ras_displacement(slicer_app):
    scene = slicer_app.scene
    grid = oblique_grid()
    field = smooth_field(grid)
    vector_node = mrml.updateDisplacementVolumeNode(scene, field, grid, name="displacement")
    assert vector_node.IsA("vtkMRMLVectorVolumeNode")
    assert vector_node.GetImageData().GetNumberOfScalarComponents() == 3
    stored = slicer.util.arrayFromVolume(vector_node)  # (K, J, I, 3), RAS components
    np.testing.assert_array_equal(stored, field)

    transform_node = mrml.updateGridTransformNode(scene, field, grid, name="transform")
    transform = transform_node.GetTransformFromParent()
    assert transform.IsA("vtkOrientedGridTransform") and not transform.GetInverseFlag()
    points = grid.world_points()
    for index in [(0, 0, 0), (3, 7, 11), (11, 13, 15), (6, 2, 9)]:
        x = points[index]
        np.testing.assert_allclose(np.array(transform.TransformPoint(x)) - x, field[index], atol=TOLERANCE_MM)
    # between voxel centres it interpolates (cubic, as Slicer does for grid transforms read from
    # files): close to the engine's trilinear value for this smooth field
    assert transform.GetInterpolationModeAsString() == "Cubic"
    rng = np.random.default_rng(0)
    ijk = rng.uniform(1, np.array(grid.size_ijk) - 2, size=(20, 3))
    off_grid = ijk @ (grid.direction * np.array(grid.spacing)).T + grid.origin
    expected = interpolate_displacement(field, grid, off_grid)
    mapped = np.array([transform.TransformPoint(p) for p in off_grid]) - off_grid
    np.testing.assert_allclose(mapped, expected, atol=0.05)

    round_trip, round_trip_grid = mrml.displacementFromGridTransformNode(transform_node)
    np.testing.assert_allclose(round_trip, field, atol=1e-6)
    assert round_trip_grid.same_geometry(grid, tol_mm=1e-6)


def test_transform_h5_is_read_by_simpleitk_like_the_displacement_field(slicer_app, tmp_path):
    grid = oblique_grid()
    field = smooth_field(grid)
    node = mrml.updateGridTransformNode(slicer_app.scene, field, grid, name="transform")
    path = slicer_app.saveNode(node, tmp_path / "transform.h5")
    transform = sitk.ReadTransform(str(path))
    flip = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    points = grid.world_points()
    rng = np.random.default_rng(1)
    for flat in rng.choice(np.prod(grid.shape), size=25, replace=False):
        index = np.unravel_index(flat, grid.shape)
        x = points[index]
        mapped_lps = np.array(transform.TransformPoint(tuple(x * flip)))
        np.testing.assert_allclose(mapped_lps * flip - x, field[index], atol=TOLERANCE_MM)

    # and reads back into Slicer as the same grid transform
    reloaded = slicer_app.loadTransform(path, "reloaded")
    x = points[4, 5, 6]
    np.testing.assert_allclose(
        np.array(reloaded.GetTransformFromParent().TransformPoint(x)) - x, field[4, 5, 6], atol=TOLERANCE_MM
    )


def test_hardening_the_grid_transform_reproduces_the_warped_volume(slicer_app):
    scene = slicer_app.scene
    grid = oblique_grid(shape=(20, 22, 24), spacing=(1.0, 1.5, 2.0))
    moving = smooth_image(grid)
    field = smooth_field(grid, amplitude=3.0)
    warped = resample_image(moving, grid, grid, field)  # the engine's warped(x) = moving(x + d(x))

    moving_node = mrml.updateVolumeNodeFromArray(scene, moving, grid, name="moving")
    transform_node = mrml.updateGridTransformNode(scene, field, grid, name="transform")
    moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
    assert slicer.vtkSlicerTransformLogic.hardenTransform(moving_node)
    assert moving_node.GetParentTransformNode() is None

    hardened, hardened_grid = mrml.arrayFromVolumeNode(moving_node)
    # Slicer resamples onto a grown grid with the same axes and spacing
    np.testing.assert_allclose(hardened_grid.direction, grid.direction, atol=1e-6)
    np.testing.assert_allclose(hardened_grid.spacing, grid.spacing, rtol=1e-6)
    back_on_fixed = resample_image(hardened, hardened_grid, grid)
    interior = (slice(4, -4),) * 3  # where x + d(x) stays inside the moving image
    value_range = float(moving.max() - moving.min())
    difference = np.abs(back_on_fixed - warped)[interior]
    assert difference.max() < 0.03 * value_range  # two linear interpolations in a row
    assert difference.mean() < 0.005 * value_range


# ------------------------------------------------------------------------------------------ scene
def test_mrb_round_trip_keeps_every_node(slicer_app, tmp_path):
    scene = slicer_app.scene
    grid = oblique_grid()
    image = smooth_image(grid)
    field = smooth_field(grid)
    labels = (image > 110).astype(np.int16) * 4
    mrml.updateVolumeNodeFromArray(scene, image, grid, name="scalar")
    mrml.updateVolumeNodeFromArray(scene, labels, grid, name="labels", className="vtkMRMLLabelMapVolumeNode")
    mrml.updateDisplacementVolumeNode(scene, field, grid, name="displacement")
    mrml.updateGridTransformNode(scene, field, grid, name="transform")
    segmentation = mrml.updateSegmentationNodeFromLabels(scene, labels, grid, None, "segmentation", None)
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    markups.AddControlPoint(vtk.vtkVector3d(1.0, 2.0, 3.0))
    path = slicer_app.saveScene(tmp_path / "scene.mrb")

    from LearnedRegistrationLib.app.headless import HeadlessSlicer

    with HeadlessSlicer(tmp_path / "cache2") as other:
        other.loadScene(path)
        loaded = other.scene
        assert node_names(loaded, "vtkMRMLVectorVolumeNode") == ["displacement"]
        assert node_names(loaded, "vtkMRMLLabelMapVolumeNode") == ["labels"]
        assert "scalar" in node_names(loaded, "vtkMRMLScalarVolumeNode")
        assert node_names(loaded, "vtkMRMLGridTransformNode") == ["transform"]
        assert node_names(loaded, "vtkMRMLSegmentationNode") == ["segmentation"]
        assert node_names(loaded, "vtkMRMLMarkupsFiducialNode") == ["points"]

        scalar, scalar_grid = mrml.arrayFromVolumeNode(loaded.GetFirstNodeByName("scalar"))
        np.testing.assert_allclose(scalar, image, rtol=1e-6)
        assert scalar_grid.same_geometry(grid)
        vectors = slicer.util.arrayFromVolume(loaded.GetFirstNodeByName("displacement"))
        np.testing.assert_allclose(vectors, field, atol=1e-6)
        stored_field, field_grid = mrml.displacementFromGridTransformNode(loaded.GetFirstNodeByName("transform"))
        np.testing.assert_allclose(stored_field, field, atol=1e-5)
        assert field_grid.same_geometry(grid)
        assert loaded.GetFirstNodeByName("segmentation").GetSegmentation().GetNumberOfSegments() == 1
        np.testing.assert_allclose(mrml.pointsFromMarkupsNode(loaded.GetFirstNodeByName("points")), [[1.0, 2.0, 3.0]])
    assert segmentation.GetScene() is scene


# ------------------------------------------------------------------------------------------ writeOutputs
def fake_computation(grid: ImageGrid, seed: float = 0.0) -> ComputedRegistration:
    """A ComputedRegistration with known arrays, without running the engine."""
    image = smooth_image(grid) + seed
    result = SimpleNamespace(
        warped=image,
        displacement_ras=smooth_field(grid) * (1 + seed),
        jacobian=np.ones(grid.shape, np.float32) * (1 + seed),
        lambda_map=np.full(grid.shape, 0.3, np.float32),
    )
    return ComputedRegistration(
        result=result,
        checkerboard=image,
        difference=image - 100,
        warpedLabels=(image > 110).astype(np.int32),
        metrics={"dice_mean": 0.5 + seed, "folding_percent": 0.0},
    )


def fake_request(scene, grid: ImageGrid) -> RegistrationRequest:
    image = smooth_image(grid)
    return RegistrationRequest(
        fixed=image, fixedGrid=grid, moving=image, movingGrid=grid, options=None, scene=scene, outputBaseName="moving"
    )


def vector_voxels(node) -> np.ndarray:
    """(Z, Y, X, 3) view of a vector volume node's voxels."""
    dims = node.GetImageData().GetDimensions()
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0], 3)


def test_write_outputs_creates_every_node_then_updates_in_place(slicer_app):
    scene = slicer_app.scene
    grid = oblique_grid()
    logic = RegistrationLogic()
    request = fake_request(scene, grid)
    first = logic.writeOutputs(request, fake_computation(grid, 0.0))
    attributes = [
        "warpedVolumeNode", "displacementVolumeNode", "transformNode", "checkerboardVolumeNode",
        "differenceVolumeNode", "jacobianVolumeNode", "lambdaMapVolumeNode", "warpedLabelNode",
    ]
    assert all(getattr(first, a) is not None for a in attributes)
    assert first.displacementVolumeNode.IsA("vtkMRMLVectorVolumeNode")
    assert first.transformNode.IsA("vtkMRMLGridTransformNode")
    assert first.warpedLabelNode.IsA("vtkMRMLLabelMapVolumeNode")
    assert first.metrics["dice_mean"] == 0.5
    # display defaults: grey for images, a colour table + window/level centred on 1 for the Jacobian
    assert first.checkerboardVolumeNode.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeGrey"
    jacobian_display = first.jacobianVolumeNode.GetDisplayNode()
    assert jacobian_display.GetColorNodeID() in mrml.JACOBIAN_COLOR_NODE_IDS
    assert (jacobian_display.GetWindow(), jacobian_display.GetLevel()) == (2.0, 1.0)
    assert first.lambdaMapVolumeNode.GetDisplayNode().GetColorNodeID() in mrml.LAMBDA_COLOR_NODE_IDS

    ids_before = scene_node_ids(scene)
    node_ids = [getattr(first, a).GetID() for a in attributes]
    # Same grid again (a slider move): the VTK objects stay, only their voxel arrays are swapped.
    images = {a: getattr(first, a).GetImageData() for a in attributes if a not in ("transformNode",)}
    transform = first.transformNode.GetTransformFromParent()
    second = logic.writeOutputs(request, fake_computation(grid, 1.0), first)
    assert [getattr(second, a).GetID() for a in attributes] == node_ids
    assert all(getattr(second, a).GetImageData() is image for a, image in images.items())
    assert second.transformNode.GetTransformFromParent() is transform
    np.testing.assert_allclose(vector_voxels(second.displacementVolumeNode), smooth_field(grid) * 2.0, atol=1e-5)
    assert scene_node_ids(scene) == ids_before  # nothing added
    values, _ = mrml.arrayFromVolumeNode(second.warpedVolumeNode)
    np.testing.assert_allclose(values, smooth_image(grid) + 1.0)
    field, _ = mrml.displacementFromGridTransformNode(second.transformNode)
    np.testing.assert_allclose(field, smooth_field(grid) * 2.0, atol=1e-5)
    assert second.metrics["dice_mean"] == 1.5


def test_write_outputs_is_all_or_nothing(slicer_app, monkeypatch):
    scene = slicer_app.scene
    grid = oblique_grid()
    logic = RegistrationLogic()
    request = fake_request(scene, grid)
    first = logic.writeOutputs(request, fake_computation(grid, 0.0))
    first.warpedLabelNode = None  # asked to create a new one in the next call
    ids_before = scene_node_ids(scene)
    warped_before = mrml.arrayFromVolumeNode(first.warpedVolumeNode)[0]
    vectors_before = vector_voxels(first.displacementVolumeNode).copy()
    jacobian_before = mrml.arrayFromVolumeNode(first.jacobianVolumeNode)[0]
    field_before = mrml.displacementFromGridTransformNode(first.transformNode)[0]

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure while writing")

    monkeypatch.setattr(mrml, "setLambdaMapDisplay", fail)  # after most outputs were written
    with pytest.raises(RuntimeError, match="simulated failure"):
        logic.writeOutputs(request, fake_computation(grid, 1.0), first)
    assert scene_node_ids(scene) == ids_before
    # the voxel arrays swapped into the same VTK objects are swapped back
    np.testing.assert_array_equal(mrml.arrayFromVolumeNode(first.warpedVolumeNode)[0], warped_before)
    np.testing.assert_array_equal(vector_voxels(first.displacementVolumeNode), vectors_before)
    np.testing.assert_array_equal(mrml.arrayFromVolumeNode(first.jacobianVolumeNode)[0], jacobian_before)
    np.testing.assert_array_equal(mrml.displacementFromGridTransformNode(first.transformNode)[0], field_before)


def test_write_outputs_rejects_an_output_node_of_the_wrong_class(slicer_app):
    scene = slicer_app.scene
    grid = oblique_grid()
    label_node = mrml.updateVolumeNodeFromArray(
        scene, np.zeros(grid.shape, np.int16), grid, name="labels", className="vtkMRMLLabelMapVolumeNode"
    )
    ids_before = scene_node_ids(scene)
    with pytest.raises(ValueError, match="warpedVolumeNode"):
        RegistrationLogic().writeOutputs(
            fake_request(scene, grid), fake_computation(grid), RegistrationOutputNodes(warpedVolumeNode=label_node)
        )
    assert scene_node_ids(scene) == ids_before


def test_outputs_and_inputs_are_not_copied_twice(slicer_app):
    """Memory on clinical-size volumes (issue 16): the grid transform shares the displacement vector
    volume's voxels, and the logic reads float32 inputs as read-only views of their nodes."""
    scene = slicer_app.scene
    grid = oblique_grid()
    logic = RegistrationLogic()
    outputs = logic.writeOutputs(fake_request(scene, grid), fake_computation(grid, 0.0))
    displacement_grid = outputs.transformNode.GetTransformFromParent().GetDisplacementGrid()
    vectors = numpy_support.vtk_to_numpy(displacement_grid.GetPointData().GetScalars())
    assert np.shares_memory(vectors, vector_voxels(outputs.displacementVolumeNode))

    node = mrml.updateVolumeNodeFromArray(scene, smooth_image(grid), grid, name="input")
    view, _ = mrml.arrayFromVolumeNode(node, copy=False)
    scalars = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
    assert np.shares_memory(view, scalars) and not view.flags.writeable
    copied, _ = mrml.arrayFromVolumeNode(node)
    assert not np.shares_memory(copied, scalars) and copied.flags.writeable
    # a label map stored as integers is converted (a copy) whatever copy says
    labels = mrml.updateVolumeNodeFromArray(scene, (smooth_image(grid) > 110).astype(np.int32), grid, name="labels",
                                            className="vtkMRMLLabelMapVolumeNode")
    converted, _ = mrml.arrayFromVolumeNode(labels, copy=False)
    assert converted.dtype == np.float32 and converted.flags.writeable
    # the default (copy) keeps a transform of its own
    own = mrml.updateGridTransformNode(scene, smooth_field(grid), grid, name="own")
    own_vectors = numpy_support.vtk_to_numpy(own.GetTransformFromParent().GetDisplacementGrid().GetPointData().GetScalars())
    assert not np.shares_memory(own_vectors, vectors)
