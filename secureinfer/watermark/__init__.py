"""Weight watermarking: keyed projection watermarks, signed certificates, verification.

Modules (imports point down):

* :mod:`~secureinfer.watermark.cli` — ``watermark keygen|train-digits|embed``, ``audit verify``.
* :mod:`~secureinfer.watermark.owner` — embed a fresh watermark and sign its certificate.
* :mod:`~secureinfer.watermark.verify` — the auditor's checks and the :class:`Verdict`.
* :mod:`~secureinfer.watermark.embed` — fine-tuning with the margin regularizer.
* :mod:`~secureinfer.watermark.certificate` — certificate format, commitment, Ed25519.
* :mod:`~secureinfer.watermark.keys` — owner keys (PEM) and watermark key files.
* :mod:`~secureinfer.watermark.modelio` — state_dict files (.pt weights-only, .npz), hashes.
* :mod:`~secureinfer.watermark.digits`, :mod:`~secureinfer.watermark.attacks` — the
  built-in digits CNN and the removal attacks of the robustness report.
* :mod:`~secureinfer.watermark.scheme` — key expansion, exact fixed-point extraction,
  thresholds: everything an MPC verifier needs to compute the same verdict on shares.
"""
