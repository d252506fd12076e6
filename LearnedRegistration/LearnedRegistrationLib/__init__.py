"""LearnedRegistration engine and Slicer bridge.

Engine modules (``grid``, ``transforms``, ``similarity``, ``regularization``, ``metrics``,
``visualization``, ``optimize``) are pure torch/numpy and import nothing from ``slicer``.
The bridge modules (``mrml``, ``logic``, ``headless``, ``cli``) import vtk/MRML but never Qt.

Nothing heavy is imported here, so that the Slicer module can load (and offer to install torch)
even when torch is missing.
"""

__version__ = "0.1.0"
