"""Training of the λ-conditioned network: ``synthesis`` (SynthMorph-style pairs from label maps) and
``objective`` (the loss and one optimizer step). Used by ``scripts/train.py`` and the tests; not part
of the Slicer install."""
