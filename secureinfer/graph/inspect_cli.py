"""``secureinfer inspect MODEL``: the imported graph, the validator's findings and the
estimated online cost per step, before anything is deployed.

Output (stdout): one line per IR node (name, op, input shapes -> output shape, fixed-point
scale of the output in the secure plan, parameter shapes), the findings (errors and warnings, with suggested rewrites), then one line per
plan step (rounds, estimated bytes sent per peer, output scale) and the totals, for the
chosen batch size and number of parties. ``--json`` prints one JSON document instead.
Exit status: 0 when the model can run, 1 when it cannot (the findings say why).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from secureinfer.errors import UnsupportedModelError
from secureinfer.graph.ir import Graph

__all__ = ["inspect_graph", "inspect_model", "register_cli"]


def inspect_graph(graph: Graph, *, batch: int = 1, n_parties: int = 2, method: str | None = None) -> dict[str, Any]:
    """The report of :func:`inspect_model` for an IR graph."""
    from secureinfer.graph.passes import infer_shapes
    from secureinfer.graph.validate import estimate_cost, validate

    findings = validate(graph)
    try:
        shapes: dict[str, tuple[int, ...]] = infer_shapes(graph, batch=batch)
    except Exception:  # noqa: BLE001 - shape errors are already findings
        shapes = {}
    nodes = [{"name": n.name, "op": n.op, "inputs": list(n.inputs),
              "in_shapes": [list(shapes[i]) if i in shapes else None for i in n.inputs],
              "out_shape": list(shapes[n.name]) if n.name in shapes else None,
              "params": {a: list(graph.param_shapes.get(n.attrs[a], ())) for a in ("weight", "bias") if n.attrs.get(a)},
              "attrs": {k: v for k, v in n.attrs.items() if k not in ("weight", "bias")}} for n in graph.nodes]
    report: dict[str, Any] = {
        "input": {"name": graph.input_spec().name, "shape": list(graph.input_spec().shape)},
        "outputs": list(graph.outputs), "frac_bits": graph.frac_bits, "nodes": nodes,
        "labels": list(graph.labels) if graph.labels is not None else None,
        "output_names": dict(graph.output_names),
        "findings": [{"severity": f.severity, "node": f.node, "op": f.op, "message": f.message,
                      "suggestion": f.suggestion} for f in findings],
        "batch": batch, "parties": n_parties, "steps": None, "total_rounds": None, "total_bytes_per_peer": None,
        "ok": not any(f.severity == "error" for f in findings),
    }
    if report["ok"]:
        steps = estimate_cost(graph, batch=batch, n_parties=n_parties, method=method)
        report["steps"] = [s.__dict__ for s in steps]
        report["total_rounds"] = sum(s.rounds for s in steps)
        known = [s.bytes_per_peer for s in steps if s.bytes_per_peer is not None]
        report["total_bytes_per_peer"] = sum(known) if len(known) == len(steps) else None
        scales = {s.step: s.scale for s in steps}
        for n in nodes:
            n["scale"] = scales.get(n["name"])
    return report


def inspect_model(path: Path, *, batch: int = 1, n_parties: int = 2, frac_bits: int = 16,
                  input_shape: tuple[int, ...] | None = None, method: str | None = None) -> dict[str, Any]:
    """Import ``path`` (not strict: engine gaps become findings) and build the report.

    A model that cannot even be imported yields a report with ``import_errors``."""
    from secureinfer.graph.load import load_model_file

    try:
        graph = load_model_file(path, frac_bits=frac_bits, input_shape=input_shape, strict=False)
    except UnsupportedModelError as exc:
        return {"model": str(path), "ok": False, "import_errors": list(exc.problems) or [str(exc)]}
    report = inspect_graph(graph, batch=batch, n_parties=n_parties, method=method)
    report["model"] = str(path)
    return report


def _fmt_shape(s: Any) -> str:
    return "?" if s is None else "x".join(str(d) for d in s)


def format_report(r: dict[str, Any]) -> str:
    lines = [f"model {r.get('model', '')}"]
    if "import_errors" in r:
        lines.append(f"cannot import ({len(r['import_errors'])} problem(s)):")
        lines += [f"  - {p}" for p in r["import_errors"]]
        return "\n".join(lines)
    lines.append(f"input {r['input']['name']} {_fmt_shape(r['input']['shape'])}  frac_bits {r['frac_bits']}  "
                 f"outputs {', '.join(r['outputs'])}")
    lines.append(f"\ngraph ({len(r['nodes'])} nodes, batch {r['batch']}):")
    width = max((len(n["name"]) for n in r["nodes"]), default=4)
    for n in r["nodes"]:
        ins = ", ".join(_fmt_shape(s) for s in n["in_shapes"])
        params = " ".join(f"{k}={_fmt_shape(v)}" for k, v in n["params"].items())
        scale = f"  @2^-{n['scale']}" if n.get("scale") is not None else ""
        lines.append(f"  {n['name']:<{width}}  {n['op']:<14} {ins} -> {_fmt_shape(n['out_shape'])}{scale}  "
                     f"{params}".rstrip())
    lines.append(f"\nfindings: {len(r['findings'])}")
    for f in r["findings"]:
        where = f"{f['node']} ({f['op']})" if f["node"] else "graph"
        tail = f" -> {f['suggestion']}" if f["suggestion"] else ""
        lines.append(f"  {f['severity']}: {where}: {f['message']}{tail}")
    if r["steps"] is None:
        lines.append("\ncost: unavailable until every error above is fixed")
        return "\n".join(lines)
    lines.append(f"\nestimated online cost per step ({r['parties']} parties, batch {r['batch']}; bytes = sent to each "
                 "peer, estimate):")
    width = max(len(s["step"]) for s in r["steps"])
    for s in r["steps"]:
        b = "?" if s["bytes_per_peer"] is None else f"{s['bytes_per_peer']:,}"
        lines.append(f"  {s['step']:<{width}}  {s['op']:<14} rounds {s['rounds']:>3}  bytes {b:>12}  "
                     f"out {_fmt_shape(s['output'])} @ 2^-{s['scale']}")
    total_b = "?" if r["total_bytes_per_peer"] is None else f"{r['total_bytes_per_peer']:,}"
    lines.append(f"  total: {r['total_rounds']} rounds, {total_b} bytes per peer")
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    shape = tuple(int(d) for d in args.input_shape.split(",")) if args.input_shape else None
    report = inspect_model(Path(args.model), batch=args.batch, n_parties=args.parties, frac_bits=args.frac_bits,
                           input_shape=shape, method=args.method)
    print(json.dumps(report, default=str) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to the ``secureinfer`` argument parser."""
    sp = subparsers.add_parser("inspect", help="show a model's graph, unsupported layers and estimated MPC cost")
    sp.add_argument("model", help=".pt2 (torch.export.save), .onnx or TorchScript file")
    sp.add_argument("--input-shape", default=None, help="per-sample input shape, e.g. 1,28,28 (when not in the file)")
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--parties", type=int, default=2)
    sp.add_argument("--frac-bits", type=int, default=16)
    sp.add_argument("--method", choices=("fss", "bitwise"), default=None,
                    help="comparison protocol (default: fss for 2 parties, bitwise otherwise)")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(func=_cmd_inspect)
    return sp
