"""Settings of the network path that the logic checks before any torch import.

Kept apart from :mod:`predict` (which needs torch) so that the Slicer panel can validate a request
on its main thread without loading torch there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdaptationOptions:
    """Test-time adaptation settings (:meth:`predict.NetworkRegistration.adapt`).

    Attributes:
        steps: Adam steps at each knot after the first (warm-started from the previous knot).
        first_steps: Adam steps at the first knot, on the working grid; they follow
            ``coarse_steps`` steps on the working grid down-sampled 2x (the optimizer's
            coarse-to-fine schedule, since the first knot starts from the bare network prediction).
        coarse_steps: see ``first_steps``.
        knots: λ values at which the residual velocity is optimized (increasing, in (0, 1)).
        learning_rate_vox: Adam step of the residual velocity, in voxels of the velocity grid.
        jacobian_penalty: γ, weight of the penalty on non-positive Jacobian determinants.
    """

    steps: int = 15
    first_steps: int = 40
    coarse_steps: int = 60
    knots: tuple = (0.1, 0.25, 0.5, 0.75)
    learning_rate_vox: float = 0.5
    jacobian_penalty: float = 1.0

    def validated(self) -> AdaptationOptions:
        if min(int(self.steps), int(self.first_steps), int(self.coarse_steps)) < 0:
            raise ValueError(f"adaptation step counts must be >= 0, got {self.steps}, {self.first_steps}, {self.coarse_steps}")
        knots = [float(k) for k in self.knots]
        if not knots or any(not 0.0 < k < 1.0 for k in knots) or sorted(set(knots)) != knots:
            raise ValueError(f"adaptation 'knots' must be increasing values in (0, 1), got {self.knots}")
        if not self.learning_rate_vox > 0:
            raise ValueError(f"adaptation 'learning_rate_vox' must be positive, got {self.learning_rate_vox}")
        return self

    @classmethod
    def with_steps(cls, steps: int) -> AdaptationOptions:
        """The default schedule scaled to ``steps`` per later knot (15 = the default: 60 coarse, 40 + 3 x 15 fine)."""
        steps = int(steps)
        return cls(steps=steps, first_steps=int(round(steps * 8 / 3)), coarse_steps=4 * steps)

    @property
    def total_steps(self) -> int:
        return int(self.coarse_steps) + int(self.first_steps) + int(self.steps) * (len(self.knots) - 1)
