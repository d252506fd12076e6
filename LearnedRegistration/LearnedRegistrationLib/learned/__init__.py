"""The λ-conditioned network: ``network`` (architecture), ``checkpoint`` (self-describing files read
with ``weights_only=True``), ``predict`` (the network bound to one pair: any λ, test-time
adaptation) and ``weights`` (where the shipped weights are)."""
