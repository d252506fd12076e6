"""LearnedRegistration engine and Slicer bridge.

Engine modules (``grid``, ``filters``, ``transforms``, ``similarity``, ``regularization``,
``metrics``, ``visualization``, ``optimize``, ``imageio``; the λ-conditioned network in
``network``, ``checkpoint``, ``synthesis``, ``training``) are pure torch/numpy/SimpleITK and import
nothing from ``slicer``. The bridge modules (``mrml``, ``logic``, ``headless``, ``cli``, ``demo``)
import vtk/MRML but never Qt; ``tasks`` is the Qt-free worker plumbing of the panel.

Nothing heavy is imported here, so that the Slicer module can load (and offer to install torch)
even when torch is missing.
"""

__version__ = "0.1.0"
