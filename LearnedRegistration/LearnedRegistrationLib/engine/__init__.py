"""Registration engine: pure torch/numpy (and SimpleITK for I/O); knows nothing of Slicer.

``grid`` (frames: IJK, RAS, torch's normalized frame), ``filters``, ``transforms`` (affine, SVF
scaling and squaring, warping, resampling), ``similarity``, ``regularization``, ``metrics`` and
their display table ``metric_table``, ``visualization`` (checkerboard, difference), ``imageio``,
``common`` (options, result, cancellation, device, input checks) and ``optimize`` (instance
optimization).
"""
