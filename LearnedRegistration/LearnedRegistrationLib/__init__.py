"""LearnedRegistration: the registration engine, the λ-conditioned models, the MRML bridge, the front doors.

Layers, one sub-package each; imports point down only (``Testing/test_layers.py`` checks it):

- ``engine``: grids and frames, transforms, similarity, regularization, metrics, the instance
  optimizer; torch, numpy, scipy and SimpleITK only.
- ``learned``: the λ-conditioned network, its checkpoints, registration with it, the shipped weights.
- ``training``: synthesis of training pairs and the training objective (``scripts/train.py``; not
  installed into Slicer).
- ``bridge``: MRML nodes <-> arrays, the registration logic, background-task plumbing; vtk and
  MRML, never Qt.
- ``app``: the command line, the headless slicer-core scene, the demo pair, plots.

The Slicer module (``LearnedRegistration.py``, the only place that imports Qt) sits on ``bridge``.
Nothing heavy is imported here, so that the module can load (and offer to install torch) even when
torch is missing.
"""

__version__ = "0.1.0"
