"""The λ path: one run registers a pair for every λ ∈ [0, 1], so that the slider needs no new optimization.

HyperMorph (Hoopes et al., IPMI 2021) amortizes the regularization weight λ over a population
with a hypernetwork; for one pair the same can be done by instance optimization. This module uses
**knots with continuation**: the velocity at a reference knot (the default λ) over the whole
pyramid, exactly as :func:`optimize.register_images` finds it, then the velocity at each further
knot on the finest level only, warm-started from its neighbour (towards larger, then towards
smaller λ). Between knots the velocity is interpolated linearly in ``s = log(λ / (1 - λ))``, the
log of the ratio of the two loss terms, in which the solution changes evenly; below the first knot
it is the first knot's; above the last it fades linearly to zero at λ = 1 (no deformation).

What decided it (OASIS l2r_subject1 -> vxm_test_scan, 30 labels, 2 CPU threads, Dice against an
independent optimizer run at each λ of 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9; /tmp experiment scripts,
the committed measurement is ``scripts/benchmark.py``):

- seven knots with 20 Adam steps each: every λ within 0.003 Dice, but 2.6x the optimizer's time;
- four knots (0.05, 0.25, 0.5, 0.9) with 20 / 10 steps above / below the reference: within 0.003,
  1.6x; with fewer steps or a larger Adam step, or a secant predictor, or L-BFGS, the knots far
  from the reference stayed 0.007-0.05 short: Adam's first steps move every parameter by the full
  step whatever the gradient, which throws a warm start off its optimum;
- with half the optimizer's step (0.25 voxel) the warm starts converge in a few steps: four knots
  with 16 / 8 steps are within 0.002 of the optimizer from λ = 0.2 up and 0.005 *above* it at
  λ ≤ 0.1 (the warm start finds a better optimum than a cold start there, with less folding), in
  about 1.4x the optimizer's time (1.50x and 1.51x in the committed benchmark, both OASIS
  directions: ``benchmarks/path/results.md``).

Since then the reference knot's levels are rolled back when they do not improve the similarity
(as the optimizer's, :mod:`optimize`), and every other knot ends at the lowest objective it saw, so
that a knot whose warm start is already at its optimum (an image registered to itself) stays there.

The alternative, HyperMorph's own objective (a velocity as a function of λ trained with λ sampled
at every step), was not pursued: each of its steps serves one λ, while every step of the
continuation goes to a λ that is kept.

A λ(x) map (:mod:`weightmap`, Chen et al.) can be learned with the reference knot and then kept for
every knot; the user's own λ(x) map (if any) multiplies it.

:meth:`LambdaPath.predict` evaluates any λ: interpolation, scaling and squaring on the velocity's
control grid, then one pass of :class:`fields.FixedGridSampler` for the full-resolution outputs
(slab by slab: :class:`fields.FixedGridOutputs`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .common import (
    DEFAULT_LAMBDA,
    PATH_KNOT_ITERATIONS,
    CancelCallback,
    ProgressCallback,
    RegistrationOptions,
    RegistrationResult,
    release_freed_memory,
    volume_tensor,
)
from .fields import FixedGridOutputs, FixedGridSampler
from .grid import ImageGrid
from .optimize import optimize_velocity, prepare_pair, quality_signal, result_similarity, seeded
from .transforms import integrate_svf
from .weightmap import WeightMap, WeightMapOptions

#: Default λ knots: the evaluation range 0.05 ... 0.9, denser where the solution changes fastest.
DEFAULT_KNOTS = (0.05, 0.25, 0.5, 0.9)


@dataclass(frozen=True)
class PathOptions:
    """Settings of :func:`register_path`.

    Attributes:
        knots: λ values whose velocities are optimized (increasing, in (0, 1)).
        knot_iterations: Adam steps on the finest level for each knot above the reference one
            (towards more regularization); the knots below it get half as many (towards less
            regularization the continuation converges faster: measured, module docstring).
        knot_learning_rate_vox: Adam step of those knots, in the units of the optimizer's
            ``learning_rate_vox``: half the optimizer's, because a warm start is near its optimum
            and Adam's first steps have the full step size whatever the gradient (with the
            optimizer's 0.5 they overshoot; module docstring).
        spatially_varying: learn a λ(x) map (:mod:`weightmap`) with the reference knot.
        weight_map: its settings.
    """

    knots: tuple = DEFAULT_KNOTS
    knot_iterations: int = PATH_KNOT_ITERATIONS
    knot_learning_rate_vox: float = 0.25
    spatially_varying: bool = False
    weight_map: WeightMapOptions = WeightMapOptions()

    def validated(self) -> PathOptions:
        """Return self after checking every field.

        Raises:
            ValueError: knots that are not increasing values in (0, 1), or negative iterations.
        """
        knots = [float(k) for k in self.knots]
        if not knots or any(not 0.0 < k < 1.0 for k in knots) or sorted(set(knots)) != knots:
            raise ValueError(f"λ-path knots must be increasing values in (0, 1), got {self.knots}")
        if int(self.knot_iterations) < 1:
            raise ValueError(f"λ-path knot_iterations must be >= 1, got {self.knot_iterations}")
        self.weight_map.validated()
        return self


def log_ratio(lam: float) -> float:
    """``s = log(λ / (1 - λ))``, the coordinate in which the path interpolates between knots."""
    return math.log(lam / (1.0 - lam))


class LambdaPath:
    """Velocities at λ knots on one control grid; :meth:`predict` gives the registration at any λ.

    Args:
        knots: increasing λ values in (0, 1).
        velocities: one (1, 3, z, y, x) normalized velocity per knot, on ``control_grid``.
        control_grid: the grid of the velocities (spans the fixed image's extent).
        fixed_grid: the fixed image's grid.
        moving: (Z', Y', X') moving image (any intensity unit) on ``moving_grid``.
        affine_ras: (4, 4) resampling affine (fixed RAS -> moving RAS) applied after the velocity's
            displacement.
        learned_map: the learned λ(x) / mean λ(x) (:mod:`weightmap`) used at every knot, (1, 1, z, y, x)
            on ``control_grid``, or None.
        user_lambda_map: the user's λ(x) on the fixed grid, (Z, Y, X), or None.
        svf_steps: scaling-and-squaring steps; ``similarity``: the similarity's name (reported).
        device: where the tensors live.
    """

    def __init__(self, knots, velocities, control_grid: ImageGrid, fixed_grid: ImageGrid, moving: np.ndarray,
                 moving_grid: ImageGrid, affine_ras: np.ndarray, learned_map: Optional[torch.Tensor],
                 user_lambda_map: Optional[np.ndarray], svf_steps: int, similarity: str, device) -> None:
        self.knots = [float(k) for k in knots]
        self.velocities = [v.to(device) for v in velocities]
        if len(self.knots) != len(self.velocities) or not self.knots:
            raise ValueError(f"a λ path needs one velocity per knot, got {len(self.knots)} knots and {len(self.velocities)} fields")
        self.control_grid, self.fixed_grid, self.moving_grid = control_grid, fixed_grid, moving_grid
        self.affine_ras = np.asarray(affine_ras, dtype=np.float64)
        self.learned_map = None if learned_map is None else learned_map.to(device)
        self.user_lambda_map = user_lambda_map
        self.svf_steps, self.similarity, self.device = int(svf_steps), similarity, torch.device(device)
        self.moving = np.ascontiguousarray(moving, dtype=np.float32)
        self._moving = volume_tensor(self.moving, self.device)
        self._sampler = FixedGridSampler(fixed_grid, fixed_grid, self.affine_ras, moving_grid, self.device)
        self.history: dict = {}

    # ------------------------------------------------------------------------------------ λ
    def velocity(self, lam: float) -> torch.Tensor:
        """The (1, 3, z, y, x) velocity at ``lam`` (module docstring: interpolation between knots).

        Raises:
            ValueError: λ outside [0, 1].
        """
        lam = float(lam)
        if not 0.0 <= lam <= 1.0 or math.isnan(lam):
            raise ValueError(f"λ must be in [0, 1], got {lam}")
        knots, fields = self.knots, self.velocities
        if lam <= knots[0]:
            return fields[0]
        if lam >= knots[-1]:
            return fields[-1] * ((1.0 - lam) / (1.0 - knots[-1]))
        for k0, f0, k1, f1 in zip(knots, fields, knots[1:], fields[1:]):
            if lam <= k1:
                t = (log_ratio(lam) - log_ratio(k0)) / (log_ratio(k1) - log_ratio(k0))
                return torch.lerp(f0, f1, t)
        return fields[-1]

    def predict(self, lam: float) -> RegistrationResult:
        """The registration at ``lam`` on the fixed grid, with no optimization (a slider move).

        Raises:
            ValueError: λ outside [0, 1].
        """
        return self.evaluate(lam).result()

    def evaluate(self, lam: float) -> PathEvaluation:
        """The outputs at ``lam``, each computed when first asked for: the warped image costs about a
        third of all of them, so a viewer can show it first (:class:`PathEvaluation`).

        Raises:
            ValueError: λ outside [0, 1].
        """
        return PathEvaluation(self, float(lam))

    # ------------------------------------------------------------------------------------ state
    def state(self) -> dict:
        """Everything but the images, as plain tensors, numbers and lists (``torch.save`` it; it reads
        back with ``weights_only=True``): how the panel's background process hands the path over."""
        return {
            "knots": list(self.knots),
            "velocities": [v.detach().cpu() for v in self.velocities],
            "control_grid": _grid_state(self.control_grid),
            "affine_ras": torch.as_tensor(self.affine_ras),
            "learned_map": None if self.learned_map is None else self.learned_map.detach().cpu(),
            "svf_steps": self.svf_steps,
            "similarity": self.similarity,
            "history": {k: float(v) for k, v in self.history.items() if isinstance(v, (int, float))},
        }

    @classmethod
    def restore(cls, state: dict, fixed_grid: ImageGrid, moving: np.ndarray, moving_grid: ImageGrid,
                user_lambda_map: Optional[np.ndarray] = None, device=None) -> LambdaPath:
        """The path :meth:`state` describes, for the same fixed grid and moving image."""
        path = cls(state["knots"], state["velocities"], _grid_from_state(state["control_grid"]), fixed_grid, moving, moving_grid,
                   np.asarray(state["affine_ras"]), state["learned_map"], user_lambda_map, state["svf_steps"], state["similarity"],
                   device or "cpu")
        path.history = dict(state.get("history", {}))
        return path


class PathEvaluation(FixedGridOutputs):
    """A λ path at one λ; the outputs are computed on first access, slab by slab (all on the fixed
    grid; :class:`fields.FixedGridOutputs`).

    ``warped`` needs the scaling and squaring, the moving positions at the fixed voxels and one
    trilinear sampling of the moving image; ``displacement_ras``, ``jacobian`` and ``lambda_map``
    (λ · the user's λ(x) · the learned λ(x) / its mean) add the rest, and :meth:`result` gathers
    everything.
    """

    def __init__(self, path: LambdaPath, lam: float) -> None:
        self.path = path
        self.started = time.perf_counter()
        with torch.no_grad():
            displacement = integrate_svf(path.velocity(lam), path.svf_steps)
        super().__init__(path._sampler, path._moving, displacement, lam, path.user_lambda_map, path.learned_map)

    def result(self) -> RegistrationResult:
        """Everything, as the engine's :class:`RegistrationResult`."""
        path = self.path
        return RegistrationResult(
            fixed_grid=path.fixed_grid,
            warped=self.warped,
            displacement_ras=self.displacement_ras,
            jacobian=self.jacobian,
            lambda_map=self.lambda_map,
            affine_ras=path.affine_ras,
            velocity=None,
            velocity_grid=None,
            runtime_s=time.perf_counter() - self.started,
            device=str(path.device),
            regularization_weight=self.lam,
            similarity=path.similarity,
            history=self._history(),
        )

    def _history(self) -> dict:
        """The path's history; its quality signal (``similarity_after``, ``improved``) only at the λ
        where it was measured (the reference knot, ``similarity_after_lambda``)."""
        history = dict(self.path.history, time_predict_s=time.perf_counter() - self.started)
        if history.pop("similarity_after_lambda", None) != self.lam:
            history.pop("similarity_after", None)
            history.pop("improved", None)
        return history


def _grid_state(grid: ImageGrid) -> dict:
    return {"shape": list(grid.shape), "spacing": list(grid.spacing), "origin": grid.origin.tolist(),
            "direction": grid.direction.tolist()}


def _grid_from_state(data: dict) -> ImageGrid:
    return ImageGrid(tuple(data["shape"]), tuple(data["spacing"]), np.asarray(data["origin"]), np.asarray(data["direction"]))


def register_path(
    fixed: np.ndarray,
    fixed_grid: ImageGrid,
    moving: np.ndarray,
    moving_grid: ImageGrid,
    options: Optional[RegistrationOptions] = None,
    path: Optional[PathOptions] = None,
    *,
    fixed_mask: Optional[np.ndarray] = None,
    lambda_map: Optional[np.ndarray] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
    start: Optional[Callable[[float, ImageGrid], torch.Tensor]] = None,
    affine: Optional[np.ndarray] = None,
) -> LambdaPath:
    """Register ``moving`` to ``fixed`` for every λ at once (module docstring).

    Args:
        fixed, fixed_grid, moving, moving_grid, fixed_mask, lambda_map, progress, cancel: as
            :func:`optimize.register_images`.
        options: the optimizer's settings; ``regularization_weight`` is the reference knot's λ
            (added to the knots when it is not one of them; :data:`common.DEFAULT_LAMBDA` when it is
            0 or 1, which :meth:`LambdaPath.predict` then evaluates like any other λ).
        path: :class:`PathOptions`.
        start: the starting point: ``start(λ, grid)`` gives a (1, 3, z, y, x) normalized velocity
            on ``grid`` (the finest control grid) for a knot λ, e.g. a network's prediction (its
            test-time adaptation is this path started there); None = zero (the affine alone).
            Each knot then starts from ``start(λ)`` plus its neighbour's optimized change.
        affine: a (4, 4) resampling affine found before (e.g. with the network); skips the
            initialization and the affine stage.

    Returns:
        :class:`LambdaPath`.

    Raises:
        as :func:`optimize.register_images`; ValueError for bad path options.
    """
    options = (options or RegistrationOptions()).validated()
    with seeded(int(options.seed)):
        return _register_path(fixed, fixed_grid, moving, moving_grid, options, (path or PathOptions()).validated(),
                              fixed_mask, lambda_map, progress, cancel, start, affine)


def _register_path(fixed, fixed_grid, moving, moving_grid, options, path, fixed_mask, lambda_map, progress, cancel, start,
                   affine) -> LambdaPath:
    """:func:`register_path` after seeding (same arguments, validated)."""
    reference = float(options.regularization_weight)
    if not 0.0 < reference < 1.0:  # λ = 0 or 1 (no knot can sit there): the path around the default λ
        reference = DEFAULT_LAMBDA
    knots = sorted({*(float(k) for k in path.knots), reference})
    ref_index = knots.index(reference)
    steps = [path.knot_iterations] * (len(knots) - ref_index - 1) + [max(1, path.knot_iterations // 2)] * ref_index
    pair = prepare_pair(fixed, fixed_grid, moving, moving_grid, options, fixed_mask, lambda_map, progress, cancel,
                        extra_iterations=sum(max(1, int(round(n * options.iteration_scale))) for n in steps), affine=affine,
                        reference_lambda=reference)
    if not pair.levels:
        raise ValueError("a λ path needs deformable levels (deformable_spacings_mm is empty)")
    finest = len(pair.levels) - 1
    weights = WeightMap(fixed_grid, path.weight_map, pair.device) if path.spatially_varying else None
    control = pair.levels[finest].control
    starts = [None] * len(knots) if start is None else [start(k, control) for k in knots]
    velocities: list = [None] * len(knots)
    # the affine check ran the first level at the reference λ: continue from there, unless the
    # reference knot starts elsewhere or learns its λ(x) map along on every level
    first = 1 if pair.coarse_velocity is not None and start is None and weights is None else 0
    velocities[ref_index] = optimize_velocity(pair, reference, range(first, len(pair.levels)),
                                              pair.options.deformable_iterations[first:],
                                              pair.coarse_velocity if first else starts[ref_index],
                                              weight_map=weights, learn_weight_map=True)
    # the other knots use the finest level only: let the coarser ones go
    pair.levels[:finest] = [None] * finest
    # Continuation: towards larger λ from the reference, then towards smaller λ.
    for index in [*range(ref_index + 1, len(knots)), *range(ref_index - 1, -1, -1)]:
        above = index > ref_index
        neighbour = index - 1 if above else index + 1
        initial = velocities[neighbour]
        if start is not None:  # the starting point at this λ, plus what the neighbour's optimization changed
            initial = starts[index] + (velocities[neighbour] - starts[neighbour])
        steps = path.knot_iterations if above else max(1, path.knot_iterations // 2)
        velocities[index] = optimize_velocity(pair, knots[index], [finest], [steps], initial,
                                              f"λ = {knots[index]:g}", weight_map=weights,
                                              learning_rate_vox=path.knot_learning_rate_vox, keep="objective")
    learned = None
    with torch.no_grad():
        if weights is not None:
            learned = weights.normalized(control.shape)
        # the quality signal at the reference knot's λ (PathEvaluation.result reports it there only)
        pair.history.update(quality_signal(pair.history["similarity_before"], result_similarity(pair, velocities[ref_index])))
        pair.history["similarity_after_lambda"] = reference
    result = LambdaPath(knots, velocities, control, fixed_grid, pair.moving, moving_grid, pair.affine, learned,
                        pair.lambda_map, pair.options.svf_steps, pair.options.similarity, pair.device)
    result.history = {k: v for k, v in pair.history.items() if isinstance(v, float)}
    result.history["time_path_s"] = time.perf_counter() - pair.start
    del pair
    release_freed_memory()  # what the optimization freed, before the outputs are made
    return result
