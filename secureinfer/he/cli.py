"""``secureinfer he serve`` and ``secureinfer he infer``: argument parsing only.

:func:`register_cli` adds the ``he`` command to the main parser; ``python -m
secureinfer.he.cli ...`` runs the same commands on their own. Results (JSON) go to stdout,
logs to stderr; exit status 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


__all__ = ["main", "register_cli"]


def _topology(args: argparse.Namespace):  # noqa: ANN202
    from secureinfer.config import config_path, load_topology

    return load_topology(config_path(args.config))


def _cmd_serve(args: argparse.Namespace) -> int:
    from secureinfer.he.server import serve
    from secureinfer.he.service import ServiceLimits

    limits = ServiceLimits(max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout,
                           max_batch_pack=args.max_batch_pack, max_input_ciphertexts=args.max_input_ciphertexts,
                           flood_sigma=args.flood_sigma, cache_bytes=args.cache_mb * 1024 * 1024,
                           max_session_bytes=args.max_session_mb * 1024 * 1024,
                           max_concurrent=args.max_concurrent)
    serve(_topology(args), models=args.model, limits=limits, address=args.address)
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from secureinfer.he.client import HEClient

    x = np.load(args.input, allow_pickle=False)
    with HEClient(_topology(args), identity=args.identity, batch_pack=args.batch_pack,
                  timeout_s=args.timeout) as c:
        y = c.infer(args.model, x)
        np.save(args.output, y, allow_pickle=False)
        print(json.dumps({"output": args.output, "shape": list(np.shape(y)), **c.last_cost.as_dict()}))
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from secureinfer.he.lower import lower
    from secureinfer.he.model import load_model
    from secureinfer.he.params import select_params

    m = load_model(args.model)
    prog = lower(m)
    p = select_params(prog.depth, output_bound=m.output_bound or 256.0)
    print(json.dumps({"model": m.name, "depth": prog.depth, **p.to_dict(), "total_bits": p.total_bits,
                      "security_bits": 128}))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``he serve``, ``he infer`` and ``he params`` to a parser's subcommands."""
    he = subparsers.add_parser("he", help="CKKS homomorphic inference (server and client)")
    sub = he.add_subparsers(dest="he_command", required=True)

    sp = sub.add_parser("serve", help="run the HE inference server ([he] table of the topology)")
    sp.add_argument("--model", action="append", required=True, help="HE model file (.npz); repeat for several")
    sp.add_argument("--config", default=None, help="topology TOML file (default: $SECUREINFER_CONFIG)")
    sp.add_argument("--address", default=None, help="listen address (default: [he].address)")
    sp.add_argument("--flood-sigma", type=float, default=0.0,
                    help="std of the integer flooding noise added to results (0 = off; e.g. 0.000244 = 2^-12)")
    sp.add_argument("--max-sessions", type=int, default=32)
    sp.add_argument("--idle-timeout", type=float, default=600.0, help="seconds before an idle session ends")
    sp.add_argument("--max-batch-pack", type=int, default=32768)
    sp.add_argument("--max-input-ciphertexts", type=int, default=1024)
    sp.add_argument("--max-session-mb", type=int, default=256)
    sp.add_argument("--cache-mb", type=int, default=512, help="encoded-weight cache size")
    sp.add_argument("--max-concurrent", type=int, default=2, help="requests evaluated / buffered at once")
    sp.set_defaults(func=_cmd_serve)

    sp = sub.add_parser("infer", help="encrypted inference on a .npy input (role client)")
    sp.add_argument("--model", required=True, help="model name on the server")
    sp.add_argument("--input", required=True)
    sp.add_argument("--output", required=True)
    sp.add_argument("--identity", default="client")
    sp.add_argument("--batch-pack", type=int, default=None, help="cap on images per ciphertext slot group")
    sp.add_argument("--timeout", type=float, default=None, help="RPC deadline in seconds")
    sp.add_argument("--config", default=None, help="topology TOML file (default: $SECUREINFER_CONFIG)")
    sp.set_defaults(func=_cmd_infer)

    sp = sub.add_parser("params", help="print the CKKS parameters selected for a model file")
    sp.add_argument("--model", required=True)
    sp.set_defaults(func=_cmd_params)
    return he


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m ...``): the full ``secureinfer`` command line."""
    from secureinfer.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
