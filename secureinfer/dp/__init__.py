"""Differential privacy: exact noise samplers, accountant, mechanisms and budget ledger.

* :mod:`secureinfer.dp.samplers` -- exact integer samplers on the fixed-point grid
  (discrete Laplace / Gaussian, Poisson, Skellam, binomial, negative binomial) and the
  per-party noise shares of infinitely divisible laws.
* :mod:`secureinfer.dp.accountant` -- pure-DP, zCDP and RDP events, composition and
  conversion to (epsilon, delta), collusion-aware noise accounting.
* :mod:`secureinfer.dp.mechanisms` -- plaintext reference mechanisms (clipping, Laplace /
  Gaussian / Skellam output perturbation, report-noisy-max) and ``draw_noise_share``.
* :mod:`secureinfer.dp.ledger` -- the per-client budget ledger (SQLite, WAL, fsync).

Nothing is imported here, so ``import secureinfer.dp.ledger`` stays light.
"""
