"""The ``secureinfer`` command line: argument parsing only; the work happens below.

Results go to stdout, logs to stderr. Exit status 0 on success, 1 on a failed check
(e.g. an audit verdict), 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from secureinfer.errors import InvalidArgumentError, SecureInferError

__all__ = ["main"]


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="topology TOML file (default: $SECUREINFER_CONFIG)")


def _topology(args: argparse.Namespace, **overrides: object):  # noqa: ANN202
    from secureinfer.config import config_path, load_topology

    return load_topology(config_path(args.config), overrides=overrides or None)


def _cmd_party(args: argparse.Namespace) -> int:
    from secureinfer.party.server import serve

    serve(_topology(args), args.id)
    return 0


def _cmd_dealer(args: argparse.Namespace) -> int:
    from secureinfer.dealer.server import serve

    serve(_topology(args))
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from secureinfer.client.sdk import deploy_graph
    from secureinfer.graph.load import load_model_file

    topo = _topology(args)
    shape = tuple(int(d) for d in args.input_shape.split(",")) if args.input_shape else None
    graph = load_model_file(Path(args.model), frac_bits=topo.cluster.frac_bits, input_shape=shape)
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgumentError(f"--param takes KEY=VALUE, got {item!r}")
        params[key] = value
    calibration = None
    if args.calibration:
        import numpy as np

        try:
            calibration = np.load(args.calibration, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(f"--calibration {args.calibration}: not a readable .npy array ({e})") from None
        if not isinstance(calibration, np.ndarray):  # an .npz archive
            raise InvalidArgumentError(f"--calibration {args.calibration}: expected one .npy array, not an archive")
    elif args.range_margin_bits is not None:
        raise InvalidArgumentError("--range-margin-bits needs --calibration")
    resp = deploy_graph(graph, name=args.name, config=topo, version=args.version or "", replace=args.replace,
                        identity=args.identity, parameters=params, calibration=calibration,
                        range_margin_bits=3 if args.range_margin_bits is None else args.range_margin_bits)
    print(json.dumps({"name": resp.name, "version": resp.version, "deployment_id": resp.deployment_id}))
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from secureinfer.client.sdk import Client

    x = np.load(args.input, allow_pickle=False)
    names = [o for o in args.outputs.split(",") if o] or ["logits"]
    with Client(_topology(args), identity=args.identity) as c:
        y = c.infer(args.model, x, version=args.version or "", outputs=names)
        if len(names) == 1:
            np.save(args.output, y, allow_pickle=False)
            shapes: dict[str, object] = {"shape": list(np.shape(y))}
        else:  # several outputs: one .npz, an array per output name
            with open(args.output, "wb") as fh:
                np.savez(fh, **y)
            shapes = {"shapes": {k: list(np.shape(v)) for k, v in y.items()}}
        print(json.dumps({"output": args.output, **shapes, **c.last_cost.as_dict()}))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from secureinfer.client.admin import list_models

    for m in list_models(_topology(args), identity=args.identity):
        print(json.dumps(m))
    return 0


def _cmd_dp_budget(args: argparse.Namespace) -> int:
    from secureinfer.dp.ledger import BudgetLedger

    topo = _topology(args)
    path = Path(topo.party(args.id).data_dir) / "dp-ledger.db"
    if not path.exists():
        raise InvalidArgumentError(f"party {args.id} has no DP ledger at {path} (no DP request yet)")
    with BudgetLedger(path, default_budget=None) as ledger:
        keys = [k for k in ledger.clients() if k.split("/", 1)[0] == args.client
                and (not args.model or k.split("/", 1)[1] == args.model)]
        if not keys:
            raise InvalidArgumentError(f"no DP budget recorded for client {args.client!r} on party {args.id}")
        for k in keys:
            b = ledger.budget(k)
            print(json.dumps({"client": args.client, "model": k.split("/", 1)[1], "party": args.id,
                              "epsilon_spent": ledger.spent(k), "epsilon_remaining": ledger.remaining(k),
                              "budget_epsilon": b.epsilon, "budget_delta": b.delta}))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from secureinfer.demo import run_demo

    return run_demo(workdir=Path(args.workdir), samples=args.samples, dp=args.dp)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secureinfer", description="Privacy-preserving inference (MPC and CKKS).")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("party", help="run a compute party")
    sp.add_argument("--id", type=int, required=True)
    _config_arg(sp)
    sp.set_defaults(func=_cmd_party)

    sp = sub.add_parser("dealer", help="run the dealer of correlated randomness")
    _config_arg(sp)
    sp.set_defaults(func=_cmd_dealer)

    sp = sub.add_parser("deploy", help="secret-share a model onto the parties (role owner)")
    sp.add_argument("model", help="model file: torch.export .pt2, ONNX .onnx, or TorchScript")
    sp.add_argument("--input-shape", default="", help="per-sample input shape, e.g. 1,28,28 (when the file lacks it)")
    sp.add_argument("--name", required=True)
    sp.add_argument("--version", default="")
    sp.add_argument("--replace", action="store_true", help="overwrite an existing version")
    sp.add_argument("--identity", default="owner")
    sp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="deployment parameter, e.g. dp.epsilon=1 dp.clip=8 dp.budget_epsilon=20")
    sp.add_argument("--calibration", default="", metavar="INPUTS.npy",
                    help="representative inputs: size every ReLU's comparison range from them (fewer DCF bits)")
    sp.add_argument("--range-margin-bits", type=int, default=None,
                    help="with --calibration: admit inputs up to 2^N times the calibration maximum (default 3)")
    _config_arg(sp)
    sp.set_defaults(func=_cmd_deploy)

    sp = sub.add_parser("infer", help="secure inference on a .npy input (role client)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--version", default="")
    sp.add_argument("--input", required=True)
    sp.add_argument("--output", required=True, help=".npy (one output) or .npz (several)")
    sp.add_argument("--outputs", default="logits",
                    help="comma-separated: logits, argmax, label, or the model's own output names "
                         "(e.g. output_label,output_probability of an skl2onnx file)")
    sp.add_argument("--identity", default="client")
    _config_arg(sp)
    sp.set_defaults(func=_cmd_infer)

    sp = sub.add_parser("models", help="list deployed models")
    sp.add_argument("--identity", default="client")
    _config_arg(sp)
    sp.set_defaults(func=_cmd_models)

    sp = sub.add_parser("dp", help="differential privacy: budgets")
    dsub = sp.add_subparsers(dest="dp_command", required=True)
    sp = dsub.add_parser("budget", help="a client's spent/remaining privacy budget (from a party's ledger)")
    sp.add_argument("--client", required=True, help="client certificate name")
    sp.add_argument("--model", default="", help="only this model")
    sp.add_argument("--id", type=int, default=0, help="which party's ledger to read")
    _config_arg(sp)
    sp.set_defaults(func=_cmd_dp_budget)

    sp = sub.add_parser("demo", help="run a local demo cluster end to end")
    sp.add_argument("--workdir", default=".demo-run",
                    help="scratch directory, recreated on every run (default: .demo-run)")
    sp.add_argument("--samples", type=int, default=0, help="test samples to run (0 = whole test split)")
    sp.add_argument("--dp", action="store_true", help="also release DP-noised logits and print epsilon spent")
    sp.set_defaults(func=_cmd_demo)

    from secureinfer import certs
    from secureinfer.graph import inspect_cli
    from secureinfer.he import cli as he_cli
    from secureinfer.watermark import cli as watermark_cli

    certs.register_cli(sub)
    he_cli.register_cli(sub)
    inspect_cli.register_cli(sub)
    watermark_cli.register_cli(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SecureInferError as exc:
        print(f"secureinfer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
