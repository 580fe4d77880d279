"""Differential privacy beside DP-SGD's training step: :mod:`.audit` tests the guarantee of a run
(an empirical lower bound on its ε, from one training run with canaries)."""
