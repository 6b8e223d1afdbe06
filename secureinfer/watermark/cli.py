"""Command line for watermarking: ``watermark keygen|train-digits|embed`` and ``audit verify``.

:func:`register_cli` adds the commands to the main ``secureinfer`` parser; each sets
``args.func(args) -> int`` (the exit status). ``python -m secureinfer.watermark.cli`` runs
them standalone.

Limitation: ``watermark embed`` fine-tunes the model, so it needs the architecture and the
training data, which a weights file does not contain. Only the built-in ``digits-cnn``
(scikit-learn's bundled digits, no download) is supported from the command line; other
models are watermarked from Python with :func:`secureinfer.watermark.owner.watermark_model`.
``audit verify`` works on any state_dict (``.pt``/``.pth`` via ``torch.load(weights_only=True)``,
or ``.npz``).

Exit status of ``audit verify``: 0 if the watermark verifies, 1 otherwise (including
unreadable inputs); the verdict and every reason go to stdout.
"""

from __future__ import annotations

from collections.abc import Sequence

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from secureinfer.errors import AlreadyExistsError, InvalidArgumentError, SecureInferError
from secureinfer.watermark.certificate import parse_time, save_certificate
from secureinfer.watermark.digits import ARCHITECTURES, accuracy, build_model, default_layer, fit_digits, load_digits_data
from secureinfer.watermark.keys import (
    generate_owner_key,
    load_owner_private_key,
    load_owner_public_key,
    public_key_bytes,
    save_watermark_key,
)
from secureinfer.watermark.modelio import load_state_dict, save_state_dict
from secureinfer.watermark.owner import watermark_model
from secureinfer.watermark.scheme import DEFAULT_BITS, DEFAULT_FPR, DEFAULT_FRAC_BITS
from secureinfer.watermark.verify import Verdict, verify_files

__all__ = ["main", "register_cli"]


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _cmd_keygen(args: argparse.Namespace) -> int:
    try:
        key = generate_owner_key(args.out, overwrite=args.force)
    except SecureInferError as exc:
        return _err(str(exc))
    print(f"owner key: {args.out} (private, mode 0600)")
    print(f"public key: {args.out}.pub")
    print(f"owner id: {public_key_bytes(key).hex()}")
    return 0


def _small_model_threads() -> None:
    # The built-in model is tiny: intra-op threads only add contention (3-4x slower on 2 cores).
    torch.set_num_threads(1)


def _cmd_train_digits(args: argparse.Namespace) -> int:
    _small_model_threads()
    data = load_digits_data()
    model = fit_digits(data, seed=args.seed, epochs=args.epochs)
    try:
        save_state_dict(model.state_dict(), args.out)
    except SecureInferError as exc:
        return _err(str(exc))
    print(f"digits-cnn test accuracy {accuracy(model, data.x_test, data.y_test):.4f}; saved {args.out}")
    return 0


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise AlreadyExistsError(f"refusing to overwrite {', '.join(existing)} (use --force)")


def _cmd_embed(args: argparse.Namespace) -> int:
    key_out = Path(args.key_out) if args.key_out else Path(args.cert).with_suffix(".wmkey.json")
    try:
        _refuse_existing([Path(args.out), Path(args.cert), key_out], args.force)
        owner = load_owner_private_key(args.owner_key)
        model = build_model(args.arch)
        _small_model_threads()
        state = load_state_dict(args.model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InvalidArgumentError(f"{args.model} is not a {args.arch} state_dict: {exc}") from None
        layer = args.layer or default_layer(model)
        data = load_digits_data()
        before = accuracy(model, data.x_test, data.y_test)
        wm = watermark_model(
            model,
            owner_key=owner,
            x=data.x_train,
            y=data.y_train,
            layer=layer,
            bits=args.bits,
            frac_bits=args.frac_bits,
            target_fpr=args.fpr,
        )
        after = accuracy(model, data.x_test, data.y_test)
        save_state_dict(model.state_dict(), args.out)
        save_certificate(wm.certificate, args.cert)
        save_watermark_key(wm.key, key_out, overwrite=args.force)
    except SecureInferError as exc:
        return _err(str(exc))
    e, c = wm.embedding, wm.certificate
    print(f"layer {e.layer} {list(e.layer_shape)}: {e.bits} bits embedded in {e.epochs} epochs")
    print(f"smallest projected margin {e.min_margin:.4g} = {e.min_margin / e.quantization_bound:.1f}x the fixed-point bound")
    print(f"test accuracy {before:.4f} -> {after:.4f}")
    print(f"threshold {c.threshold} bit errors, false-positive rate {c.false_positive_rate:.3g}")
    print(f"model: {args.out}\ncertificate: {args.cert}\nkey (secret, give to the auditor only at verification): {key_out}")
    return 0


def _print_verdict(v: Verdict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(v.to_dict(), sort_keys=True))
        return
    print(f"verdict: {'PASS' if v.passed else 'FAIL'}")
    if v.bit_errors is not None:
        print(f"bit errors: {v.bit_errors} / {v.bits} (threshold {v.threshold})")
        print(f"p-value: {v.p_value:.3g}")
    if v.false_positive_rate is not None:
        print(f"false-positive rate of the test: {v.false_positive_rate:.3g}")
    if v.weights_identical is not None:
        print(f"weights identical to the certified model: {'yes' if v.weights_identical else 'no'}")
    for r in v.reasons:
        print(f"reason: {r}")


def _cmd_verify(args: argparse.Namespace) -> int:
    try:
        registered = parse_time(args.registered_at) if args.registered_at else None
        expected = public_key_bytes(load_owner_public_key(args.expect_owner)) if args.expect_owner else None
    except SecureInferError as exc:
        return _err(str(exc))
    if args.deployed:
        if args.model:
            return _err("give either MODEL (a file) or --deployed NAME (a deployed model), not both")
        return _verify_deployed(args, registered)
    if not args.model:
        return _err("give MODEL (a file) or --deployed NAME with --config")
    verdict = verify_files(
        args.model,
        args.cert,
        args.key,
        registered_at=registered,
        max_fpr=args.max_fpr,
        expected_owner=expected,
    )
    _print_verdict(verdict, as_json=args.json)
    return 0 if verdict.passed else 1


def _verify_deployed(args: argparse.Namespace, registered: Any) -> int:
    """MPC mode: the parties verify their secret-shared weights; only the verdict comes back."""
    from secureinfer.client.audit import verify_deployed
    from secureinfer.config import config_path, load_topology
    from secureinfer.watermark.certificate import load_certificate
    from secureinfer.watermark.keys import load_watermark_key

    try:
        topo = load_topology(config_path(args.config))
        verdict = verify_deployed(topo, args.deployed, cert=load_certificate(args.cert), key=load_watermark_key(args.key),
                                  version=args.version, registered_at=registered,
                                  reveal_distance=args.reveal_distance)
    except SecureInferError as exc:
        return _err(str(exc))
    _print_verdict(verdict, as_json=args.json)
    return 0 if verdict.passed else 1


def register_cli(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    """Add ``watermark …`` and ``audit verify`` to ``subparsers`` (from ``add_subparsers``).

    Returns the new parsers by command (``"watermark embed"``, ``"audit verify"``, …) so
    the caller can extend them (e.g. the MPC mode of ``audit verify``).
    """
    made: dict[str, argparse.ArgumentParser] = {}
    wm = subparsers.add_parser("watermark", help="embed ownership watermarks into model weights")
    wsub = wm.add_subparsers(dest="watermark_command", metavar="COMMAND", required=True)

    p = wsub.add_parser("keygen", help="create an Ed25519 owner key (PEM, mode 0600) and KEY.pub")
    p.add_argument("--out", required=True, help="private key path; the public key goes to OUT.pub")
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    p.set_defaults(func=_cmd_keygen)
    made["watermark keygen"] = p

    p = wsub.add_parser("train-digits", help="train the built-in digits CNN (for trying the workflow)")
    p.add_argument("--out", required=True, help="state_dict path (.pt or .npz)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed (not secret)")
    p.add_argument("--epochs", type=int, default=25)
    p.set_defaults(func=_cmd_train_digits)
    made["watermark train-digits"] = p

    p = wsub.add_parser(
        "embed",
        help="embed a watermark and write the model, a signed certificate and the secret key file",
        description="Fine-tunes the model with a watermark regularizer; needs the architecture and its "
        "training data, so only built-in architectures are supported here (--arch).",
    )
    p.add_argument("model", metavar="MODEL", help="state_dict of the model (.pt/.pth/.npz)")
    p.add_argument("--owner-key", required=True, help="owner's Ed25519 private key (PEM)")
    p.add_argument("--out", required=True, help="where to write the watermarked model")
    p.add_argument("--cert", required=True, help="where to write the certificate (JSON)")
    p.add_argument("--key-out", help="where to write the secret key file (default: CERT with .wmkey.json)")
    p.add_argument("--arch", choices=ARCHITECTURES, default="digits-cnn", help="model architecture")
    p.add_argument("--layer", help="parameter to watermark (default: the largest weight tensor)")
    p.add_argument("--bits", type=int, default=DEFAULT_BITS, help="watermark length T")
    p.add_argument("--frac-bits", type=int, default=DEFAULT_FRAC_BITS, help="fixed-point precision to survive")
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR, help="false-positive rate of the decision")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=_cmd_embed)
    made["watermark embed"] = p

    audit = subparsers.add_parser("audit", help="verify ownership watermarks")
    asub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    p = asub.add_parser("verify", help="verify a model file against a certificate and its key; exit 0 = pass")
    p.add_argument("model", metavar="MODEL", nargs="?", help="suspect model's state_dict (.pt/.pth/.npz)")
    p.add_argument("--deployed", metavar="NAME", help="verify a deployed secret-shared model through the MPC instead")
    p.add_argument("--version", default="", help="with --deployed: model version (default: latest)")
    p.add_argument("--config", help="with --deployed: topology file (default: $SECUREINFER_CONFIG)")
    p.add_argument("--reveal-distance", action="store_true", help="with --deployed: also reveal the bit errors")
    p.add_argument("--cert", required=True, help="the owner's certificate (JSON)")
    p.add_argument("--key", required=True, help="the watermark key file revealed by the owner")
    p.add_argument("--registered-at", help="ISO 8601 time the suspect model was registered; the certificate must predate it")
    p.add_argument("--expect-owner", help="PEM public key the certificate must name")
    p.add_argument("--max-fpr", type=float, default=DEFAULT_FPR, help="largest acceptable false-positive rate")
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    p.set_defaults(func=_cmd_verify)
    made["audit verify"] = p
    return made


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m ...``): the full ``secureinfer`` command line."""
    from secureinfer.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
