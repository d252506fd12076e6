"""Front doors outside the Slicer GUI: ``cli`` (``learnedreg``), ``headless`` (a slicer-core scene with
the module logics), ``demo`` (a built-in pair with a known answer) and ``plots``. The only layer
that imports the command-line dependencies (tqdm, matplotlib, slicer-core's headless set-up)."""
