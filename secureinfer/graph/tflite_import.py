"""TFLite importer: a ``.tflite`` flatbuffer -> IR, with no TensorFlow at run time.

The file is parsed with the ``tflite`` package (the TFLite schema's generated flatbuffer
code; ``pip install secureinfer[tflite]``), subgraph 0 only. Weights stored as int8 or
uint8 are dequantized, ``(q - zero_point) * scale`` with per-tensor or per-channel
(``quantized_dimension``) parameters, whether an op reads them directly (dynamic-range
"hybrid" kernels) or through a ``DEQUANTIZE`` op; int32 biases likewise. The model then
runs in the IR's fixed point like any float model, so its outputs are the dequantized
float model's (what the TFLite interpreter computes for weight-only quantization; a
hybrid kernel's on-the-fly input quantization differs from it by its rounding).

Layout. TFLite is NHWC; the IR is NCHW. The client sends the model's own NHWC input;
the importer emits one ``transpose`` (local, free under MPC) to NCHW after the input and
one back before every flatten/reshape of a 4-D value, so weights keep their meaning.

TFLite builtin op -> IR:

===================================  =================================================
CONV_2D (SAME with even total pad,   ``conv2d`` (OHWI kernel -> OIHW); fused RELU,
  VALID; stride, dilation)             RELU6, TANH applied after
DEPTHWISE_CONV_2D (depth multiplier) ``conv2d`` with ``groups`` = input channels
FULLY_CONNECTED                      ``linear`` (a 4-D input is flattened in NHWC order)
ADD (two activations, or a per-      ``add`` / ``channel_affine``
  channel constant)
RELU; RELU6                          ``relu``; ``relu(x) - relu(x - 6)`` (two ReLU gates)
LOGISTIC; TANH                       ``sigmoid``; ``tanh``
AVERAGE_POOL_2D, MAX_POOL_2D         ``avgpool2d``, ``maxpool2d``
RESHAPE                              ``flatten`` / ``reshape`` (batch axis kept)
SOFTMAX (beta)                       ``softmax`` over the channels
MEAN over H and W                    ``global_avgpool`` (+ flatten without keep_dims)
PAD (zeros, symmetric H/W) before a  the convolution's padding
  convolution
DEQUANTIZE, QUANTIZE                 dropped (constants dequantized; activations are
                                     fixed point in the IR anyway)
===================================  =================================================

Inputs and outputs must be float32 (weight-only or dynamic-range quantization); a
full-integer model (int8 input) is refused. Every op the importer cannot map is listed
in one :class:`~secureinfer.errors.UnsupportedModelError`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from secureinfer.errors import InvalidArgumentError, UnsupportedModelError
from secureinfer.graph.builder import Builder, ImportProblem
from secureinfer.graph.ir import Graph

__all__ = ["MAX_TFLITE_BYTES", "from_tflite"]

#: largest .tflite file read (the flatbuffer is parsed in memory)
MAX_TFLITE_BYTES = 1 << 30
_IMPORT_BATCH = 2  # a placeholder batch while importing (a reshape mixing the batch shows)


def _np_dtype(tflite: Any, code: int) -> Any:
    t = tflite.TensorType
    table = {t.FLOAT32: np.float32, t.INT8: np.int8, t.UINT8: np.uint8, t.INT32: np.int32, t.INT64: np.int64,
             t.FLOAT16: np.float16, t.INT16: np.int16}
    if code not in table:
        raise ImportProblem(f"tensor type {code} is not supported")
    return table[code]


class _Importer:
    def __init__(self, data: bytes, *, frac_bits: int) -> None:
        import tflite

        self.tfl = tflite
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise InvalidArgumentError("not a TFLite model (no 'TFL3' file identifier)")
        try:
            self.model = tflite.Model.GetRootAsModel(data, 0)
            if self.model.SubgraphsLength() < 1:
                raise ValueError("no subgraph")
            self.sg = self.model.Subgraphs(0)
        except Exception as exc:  # noqa: BLE001 - a malformed flatbuffer raises anything
            raise InvalidArgumentError(f"not a readable TFLite model: {exc}") from None
        self.data = data
        self.frac_bits = frac_bits
        self.consts: dict[int, np.ndarray] = {}
        self.vals: dict[int, str] = {}  # tensor index -> IR value (4-D values NCHW)
        self.pads: dict[int, tuple[int, tuple[int, int]]] = {}  # PAD outputs -> (input tensor, (ph, pw))
        self.names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}

    # ------------------------------------------------------------------ tensors
    def tensor(self, i: int) -> Any:
        return self.sg.Tensors(int(i))

    def shape(self, i: int) -> tuple[int, ...]:
        t = self.tensor(i)
        return tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()

    def raw(self, i: int) -> np.ndarray | None:
        t = self.tensor(i)
        buf = self.model.Buffers(t.Buffer())
        if buf is None:
            return None
        if buf.DataLength():
            data = buf.DataAsNumpy().tobytes()
        elif buf.Offset() > 1:  # large models: data after the flatbuffer
            start, size = int(buf.Offset()), int(buf.Size())
            if start + size > len(self.data):
                raise ImportProblem(f"tensor {self.tname(i)!r}: buffer outside the file")
            data = self.data[start:start + size]
        else:
            return None
        dtype = _np_dtype(self.tfl, t.Type())
        shape = self.shape(i)
        arr = np.frombuffer(data, dtype=dtype)
        if arr.size != int(np.prod(shape)):
            raise ImportProblem(f"tensor {self.tname(i)!r}: {arr.size} values for shape {shape}")
        return arr.reshape(shape)

    def tname(self, i: int) -> str:
        name = self.tensor(i).Name()
        return name.decode(errors="replace") if name else f"t{i}"

    def const(self, i: int) -> np.ndarray | None:
        """A constant as float64, dequantized if it is stored quantized."""
        if i in self.consts:
            return self.consts[i]
        arr = self.raw(i)
        if arr is None:
            return None
        q = self.tensor(i).Quantization()
        scale = q.ScaleAsNumpy() if q is not None and q.ScaleLength() else None
        if scale is not None and arr.dtype in (np.int8, np.uint8, np.int16, np.int32):
            zp = q.ZeroPointAsNumpy() if q.ZeroPointLength() else np.zeros_like(scale)
            view = [1] * arr.ndim
            if scale.size > 1:
                view[int(q.QuantizedDimension())] = -1
            out = (arr.astype(np.float64) - np.asarray(zp, np.float64).reshape(view)) * np.asarray(
                scale, np.float64).reshape(view)
        else:
            out = arr.astype(np.float64)
        self.consts[i] = out
        return out

    def act(self, i: int) -> str:
        if i not in self.vals:
            raise ImportProblem(f"input {self.tname(i)!r} is not an activation computed from the model input")
        return self.vals[i]

    # ------------------------------------------------------------------ walk
    def run(self) -> tuple[Builder, list[str]]:
        sg = self.sg
        if sg.InputsLength() != 1:
            raise UnsupportedModelError(f"the TFLite model has {sg.InputsLength()} inputs; exactly one is supported")
        inp = int(sg.Inputs(0))
        tf = self.tfl.TensorType
        if self.tensor(inp).Type() != tf.FLOAT32:
            raise UnsupportedModelError("the TFLite model's input is not float32 (a full-integer model); "
                                        "convert with weight-only or dynamic-range quantization")
        shape = self.shape(inp)
        self.b = Builder(input_name="input", input_shape=(_IMPORT_BATCH, *shape[1:]), frac_bits=self.frac_bits)
        x = "input"
        if len(shape) == 4:
            x = self.b.emit("transpose", [x], {"perm": [0, 3, 1, 2]}, name="input_nchw", origin="input NHWC -> NCHW")
        self.vals[inp] = x
        for k in range(sg.OperatorsLength()):
            op = sg.Operators(k)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            num = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
            opname = self.names.get(num, f"builtin {num}")
            ins = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
            outs = [int(i) for i in op.OutputsAsNumpy()] if op.OutputsLength() else []
            where = f"op {k} {opname} ({self.tname(outs[0]) if outs else '?'})"
            try:
                if code.CustomCode():
                    raise ImportProblem(f"custom op {code.CustomCode().decode(errors='replace')!r}")
                if all(i < 0 or self.raw(i) is not None or i in self.consts for i in ins) and opname in (
                        "DEQUANTIZE", "QUANTIZE"):
                    self.consts[outs[0]] = self.const(ins[0])  # a dequantized weight
                    continue
                handler = getattr(self, f"op_{opname}", None)
                if handler is None:
                    raise ImportProblem(f"TFLite op {opname} is not supported")
                value = handler(op, ins, outs, where)
                if value is not None:
                    self.vals[outs[0]] = value
            except ImportProblem as exc:
                after = any(self.b.is_opaque(self.vals.get(i, "")) for i in ins)
                if not after:
                    self.b.problem(f"{where}: {exc}")
                first = next((self.vals[i] for i in ins if i in self.vals), None)
                guess = self.b.shapes.get(first, (self.b.batch,)) if first else (self.b.batch,)
                for o in outs:
                    self.vals[o] = self.b.opaque(guess, self.tname(o))
        outputs = []
        for j in range(sg.OutputsLength()):
            o = int(sg.Outputs(j))
            if o not in self.vals:
                self.b.problem(f"output {self.tname(o)!r} is not computed from the model input")
            else:
                outputs.append(self.to_nhwc(self.vals[o], "output"))
        if len(outputs) > 1:
            self.b.problem(f"the model has {len(outputs)} outputs; one is supported")
        self.b.check_engine_ops()
        return self.b, outputs[:1]

    # ------------------------------------------------------------------ helpers
    def options(self, op: Any, cls: str) -> Any:
        table = op.BuiltinOptions()
        if table is None:
            return None
        opts = getattr(self.tfl, cls)()
        opts.Init(table.Bytes, table.Pos)
        return opts

    def emit(self, op: str, inputs: list[str], attrs: dict[str, Any] | None = None, *, name: str, where: str,
             params: dict[str, np.ndarray | None] | None = None) -> str:
        return self.b.emit(op, inputs, attrs, name=name, params=params, origin=where)

    def fused(self, x: str, act: int, name: str, where: str) -> str:
        a = self.tfl.ActivationFunctionType
        if act == a.NONE:
            return x
        if act == a.RELU:
            return self.emit("relu", [x], name=f"{name}.relu", where=where)
        if act == a.RELU6:
            return self.relu6(x, name, where)
        if act == a.TANH:
            return self.emit("tanh", [x], name=f"{name}.tanh", where=where)
        raise ImportProblem(f"fused activation {act} (supported: NONE, RELU, RELU6, TANH)")

    def relu6(self, x: str, name: str, where: str) -> str:
        """min(max(x, 0), 6) = relu(x) - relu(x - 6): two ReLU gates, the rest local."""
        low = self.emit("relu", [x], name=f"{name}.relu", where=where)
        shifted = self.b.affine(x, weight=np.array(1.0), bias=np.array(-6.0), axis=1, name=f"{name}.minus6",
                                origin=where)
        high = self.emit("relu", [shifted], name=f"{name}.relu_above6", where=where)
        neg = self.b.affine(high, weight=np.array(-1.0), bias=None, axis=1, name=f"{name}.neg", origin=where)
        return self.emit("add", [low, neg], name=f"{name}.relu6", where=where)

    def to_nhwc(self, x: str, name: str) -> str:
        """A 4-D (NCHW) value in TFLite's NHWC order, e.g. before a flatten."""
        if len(self.b.shapes[x]) != 4:
            return x
        return self.emit("transpose", [x], {"perm": [0, 2, 3, 1]}, name=f"{name}.nhwc", where=f"{name}: NCHW -> NHWC")

    def padding(self, opts: Any, in_hw: tuple[int, int], k: tuple[int, int], s: tuple[int, int],
                d: tuple[int, int]) -> list[int]:
        if opts.Padding() == self.tfl.Padding.VALID:
            return [0, 0]
        pads = []
        for n, kk, ss, dd in zip(in_hw, k, s, d):
            out = -(-n // ss)
            total = max((out - 1) * ss + (kk - 1) * dd + 1 - n, 0)
            if total % 2:
                raise ImportProblem(f"SAME padding of {total} (odd: asymmetric) is not supported")
            pads.append(total // 2)
        return pads

    def _conv(self, op: Any, ins: list[int], outs: list[int], where: str, *, depthwise: bool) -> str:
        src = ins[0]
        extra = (0, 0)
        if src in self.pads:  # PAD + conv: one padded convolution
            src, extra = self.pads.pop(src)
        x = self.act(src)
        w = self.const(ins[1])
        if w is None or w.ndim != 4:
            raise ImportProblem("a convolution kernel that is not a 4-D constant")
        bias = self.const(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
        opts = self.options(op, "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions")
        s = (int(opts.StrideH()), int(opts.StrideW()))
        d = (int(opts.DilationHFactor()) or 1, int(opts.DilationWFactor()) or 1)
        cin = self.b.shapes[x][1]
        if depthwise:  # (1, KH, KW, C*M) -> (C*M, 1, KH, KW), groups = C
            kernel = np.transpose(w[0], (2, 0, 1))[:, None]
            groups = cin
        else:  # OHWI -> OIHW
            kernel = np.transpose(w, (0, 3, 1, 2))
            groups = 1
        k = (int(kernel.shape[2]), int(kernel.shape[3]))
        in_hw = tuple(int(v) for v in self.b.shapes[x][2:])
        pad = self.padding(opts, in_hw, k, s, d)
        if any(extra) and any(pad):
            raise ImportProblem("PAD before a SAME-padded convolution")
        pad = [pad[0] + extra[0], pad[1] + extra[1]]
        name = self.tname(outs[0])
        attrs = {"in_channels": int(cin), "out_channels": int(kernel.shape[0]), "kernel_size": list(k),
                 "stride": list(s), "padding": pad, "dilation": list(d), "groups": groups}
        y = self.emit("conv2d", [x], attrs, name=name, where=where, params={"weight": kernel, "bias": bias})
        return self.fused(y, opts.FusedActivationFunction(), name, where)

    # ------------------------------------------------------------------ handlers
    def op_CONV_2D(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        return self._conv(op, ins, outs, where, depthwise=False)

    def op_DEPTHWISE_CONV_2D(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        return self._conv(op, ins, outs, where, depthwise=True)

    def op_FULLY_CONNECTED(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        name = self.tname(outs[0])
        x = self.to_nhwc(self.act(ins[0]), name)
        w = self.const(ins[1])
        if w is None or w.ndim != 2:
            raise ImportProblem("FULLY_CONNECTED with weights that are not a 2-D constant")
        if len(self.b.shapes[x]) != 2:
            x = self.b.reshape(x, (self.b.batch, int(np.prod(self.b.shapes[x][1:]))), name=f"{name}.flat",
                               origin=where)
        bias = self.const(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
        attrs = {"in_features": int(w.shape[1]), "out_features": int(w.shape[0])}
        y = self.emit("linear", [x], attrs, name=name, where=where, params={"weight": w, "bias": bias})
        opts = self.options(op, "FullyConnectedOptions")
        return self.fused(y, opts.FusedActivationFunction() if opts is not None else 0, name, where)

    def op_ADD(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        name = self.tname(outs[0])
        p, q = self.vals.get(ins[0]), self.vals.get(ins[1])
        if p is not None and q is not None:
            y = self.emit("add", [p, q], name=name, where=where)
        else:
            x, c = (p, self.const(ins[1])) if p is not None else (q, self.const(ins[0]))
            if x is None or c is None:
                raise ImportProblem("ADD of values the importer could not map")
            if c.size not in (1, self.b.shapes[x][1]):
                raise ImportProblem(f"ADD of a constant of shape {c.shape} (per channel or scalar only)")
            y = self.b.affine(x, weight=np.array(1.0), bias=c.reshape(-1), axis=1, name=name, origin=where)
        opts = self.options(op, "AddOptions")
        return self.fused(y, opts.FusedActivationFunction() if opts is not None else 0, name, where)

    def op_RELU(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        return self.emit("relu", [self.act(ins[0])], name=self.tname(outs[0]), where=where)

    def op_RELU6(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        return self.relu6(self.act(ins[0]), self.tname(outs[0]), where)

    def _pool(self, op: Any, ins: list[int], outs: list[int], where: str, kind: str) -> str:
        x = self.act(ins[0])
        opts = self.options(op, "Pool2DOptions")
        k = (int(opts.FilterHeight()), int(opts.FilterWidth()))
        s = (int(opts.StrideH()), int(opts.StrideW()))
        pad = self.padding(opts, tuple(int(v) for v in self.b.shapes[x][2:]), k, s, (1, 1))
        if any(pad):
            raise ImportProblem("SAME-padded pooling that pads (TFLite excludes the padding from averages and "
                                "maxima; the IR pads with zeros)")
        name = self.tname(outs[0])
        y = self.emit(kind, [x], {"kernel_size": list(k), "stride": list(s), "padding": [0, 0]}, name=name, where=where)
        return self.fused(y, opts.FusedActivationFunction(), name, where)

    def op_AVERAGE_POOL_2D(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        return self._pool(op, ins, outs, where, "avgpool2d")

    def op_MAX_POOL_2D(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        return self._pool(op, ins, outs, where, "maxpool2d")

    def op_RESHAPE(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        name = self.tname(outs[0])
        x = self.to_nhwc(self.act(ins[0]), name)
        target = self.shape(outs[0])
        new = self.const(ins[1]) if len(ins) > 1 and ins[1] >= 0 else None
        if new is not None:
            target = tuple(int(v) for v in new.reshape(-1))
        rest = [int(v) for v in target[1:]]
        if -1 in rest:
            known = int(np.prod([v for v in rest if v != -1]))
            rest[rest.index(-1)] = int(np.prod(self.b.shapes[x][1:])) // max(known, 1)
        y = self.b.reshape(x, (self.b.batch, *rest), name=name, origin=where)
        if len(rest) == 3:  # a 4-D result is NHWC in TFLite: back to NCHW
            y = self.emit("transpose", [y], {"perm": [0, 3, 1, 2]}, name=f"{name}.nchw", where=where)
        return y

    def op_SOFTMAX(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        x = self.act(ins[0])
        opts = self.options(op, "SoftmaxOptions")
        beta = float(opts.Beta()) if opts is not None else 1.0
        name = self.tname(outs[0])
        if beta != 1.0:
            x = self.b.affine(x, weight=np.array(beta), bias=None, axis=1, name=f"{name}.beta", origin=where)
        return self.emit("softmax", [x], {"axis": 1}, name=name, where=where)  # TFLite's last axis: the channels

    def op_MEAN(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        x = self.act(ins[0])
        axes = self.const(ins[1])
        if len(self.b.shapes[x]) != 4 or axes is None or sorted(int(a) % 4 for a in axes.reshape(-1)) != [1, 2]:
            raise ImportProblem("MEAN other than over H and W of an NHWC value")
        name = self.tname(outs[0])
        y = self.emit("global_avgpool", [x], name=name, where=where)
        opts = self.options(op, "ReducerOptions")
        if opts is None or not opts.KeepDims():
            y = self.b.reshape(y, (self.b.batch, self.b.shapes[y][1]), name=f"{name}.squeeze", origin=where)
        return y

    def op_PAD(self, op: Any, ins: list[int], outs: list[int], where: str) -> None:
        self.act(ins[0])
        pads = self.const(ins[1])
        if pads is None or pads.shape != (4, 2) or pads[0].any() or pads[3].any() or pads[1, 0] != pads[1, 1] \
                or pads[2, 0] != pads[2, 1]:
            raise ImportProblem("PAD other than symmetric zero padding of H and W")
        consumers = [j for j in range(self.sg.OperatorsLength())
                     if outs[0] in [int(i) for i in self.sg.Operators(j).InputsAsNumpy()]]
        kinds = {self.names.get(max(int(self.model.OperatorCodes(self.sg.Operators(j).OpcodeIndex()).BuiltinCode()),
                                    int(self.model.OperatorCodes(self.sg.Operators(j).OpcodeIndex())
                                        .DeprecatedBuiltinCode()))) for j in consumers}
        if len(consumers) != 1 or not kinds <= {"CONV_2D", "DEPTHWISE_CONV_2D"}:
            raise ImportProblem("PAD that does not feed one convolution (it is folded into its padding)")
        self.pads[outs[0]] = (ins[0], (int(pads[1, 0]), int(pads[2, 0])))
        return None

    def op_LOGISTIC(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        return self.emit("sigmoid", [self.act(ins[0])], name=self.tname(outs[0]), where=where)

    def op_TANH(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        return self.emit("tanh", [self.act(ins[0])], name=self.tname(outs[0]), where=where)

    def op_DEQUANTIZE(self, op: Any, ins: list[int], outs: list[int], where: str) -> str:
        return self.act(ins[0])

    op_QUANTIZE = op_DEQUANTIZE


def from_tflite(model: str | Path | bytes, *, frac_bits: int = 16, optimize: bool = True) -> Graph:
    """Import a ``.tflite`` model (path or bytes); UnsupportedModelError lists every op
    that cannot be mapped."""
    from secureinfer.graph.passes import optimize as run_passes
    from secureinfer.graph.validate import validate

    if isinstance(model, (bytes, bytearray)):
        data = bytes(model)
    else:
        path = Path(model)
        if not path.is_file():
            raise InvalidArgumentError(f"TFLite model file {path} does not exist")
        if path.stat().st_size > MAX_TFLITE_BYTES:
            raise InvalidArgumentError(f"{path}: larger than {MAX_TFLITE_BYTES} bytes")
        data = path.read_bytes()
    try:
        builder, outputs = _Importer(data, frac_bits=frac_bits).run()
    except (struct.error, IndexError, ValueError, TypeError, UnicodeDecodeError, AttributeError) as exc:
        # the flatbuffer accessors read lazily: a truncated or corrupt file fails here
        raise InvalidArgumentError(f"not a readable TFLite model: {type(exc).__name__}: {exc}") from None
    graph = builder.finish(outputs)
    if optimize:
        graph = run_passes(graph)
    validate(graph, strict=True, origin=dict(builder.origin))
    return graph
