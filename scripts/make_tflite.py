#!/usr/bin/env python3
"""Write small ``.tflite`` CNNs with int8 weights, without TensorFlow.

The tests build their TFLite files with this (at test time); run it to get a file:

    python scripts/make_tflite.py --out cnn.tflite [--seed 0] [--hybrid]

The file is a flatbuffer in the TFLite schema, written with the generated builder code of
the ``tflite`` package (the same schema the importer reads). The CNN (input
1x16x16x3 NHWC, float32; batch resizable)::

    CONV_2D 3x3 SAME +RELU (8)  -> MAX_POOL_2D 2x2 -> PAD 1 -> DEPTHWISE_CONV_2D 3x3 VALID +RELU6
    -> ADD (skip from the pool) -> AVERAGE_POOL_2D 2x2 -> CONV_2D 1x1 (4) -> RELU
    -> RESHAPE (64) -> FULLY_CONNECTED (10)  \\
    -> MEAN over H, W (4) -> FULLY_CONNECTED (10) -> ADD -> SOFTMAX

Weights are int8 with per-output-channel scales (zero point 0, like TFLite's own
quantizer); the float ops get them through DEQUANTIZE ops (weight-only quantization).
``--hybrid`` instead feeds the first FULLY_CONNECTED its int8 weights directly (the
"dynamic range" kernel, which quantizes its input on the fly). Biases are float32.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: int
    buffer: int
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int = 0


@dataclass
class _Op:
    code: int
    inputs: list[int]
    outputs: list[int]
    options_type: int = 0
    options: Callable[[Any], int] | None = None


@dataclass
class TfliteWriter:
    """Collects tensors and operators, then serializes one subgraph."""

    tensors: list[_Tensor] = field(default_factory=list)
    buffers: list[bytes] = field(default_factory=lambda: [b""])  # buffer 0: empty, by convention
    ops: list[_Op] = field(default_factory=list)

    def tensor(self, name: str, shape: tuple[int, ...], *, dtype: str = "float32", data: np.ndarray | None = None,
               scale: np.ndarray | None = None, zero_point: np.ndarray | None = None, axis: int = 0) -> int:
        import tflite

        code = {"float32": tflite.TensorType.FLOAT32, "int8": tflite.TensorType.INT8,
                "int32": tflite.TensorType.INT32}[dtype]
        buf = 0
        if data is not None:
            self.buffers.append(np.ascontiguousarray(data.astype(dtype)).tobytes())
            buf = len(self.buffers) - 1
        self.tensors.append(_Tensor(name, tuple(shape), code, buf, scale, zero_point, axis))
        return len(self.tensors) - 1

    def quantized(self, name: str, w: np.ndarray, *, axis: int = 0) -> int:
        """An int8 constant of ``w`` with one symmetric scale per slice along ``axis``."""
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        scale = np.maximum(np.abs(moved).max(axis=1), 1e-8) / 127.0
        view = [1] * w.ndim
        view[axis] = -1
        q = np.clip(np.round(w / scale.reshape(view)), -127, 127)
        return self.tensor(name, w.shape, dtype="int8", data=q, scale=scale, zero_point=np.zeros(len(scale)),
                           axis=axis)

    def op(self, code: int, inputs: list[int], outputs: list[int], options_type: int = 0,
           options: Callable[[Any], int] | None = None) -> None:
        self.ops.append(_Op(code, inputs, outputs, options_type, options))

    def finish(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers
        import tflite

        b = flatbuffers.Builder(1 << 16)

        def ivec(start: Callable[[Any, int], None], values: list[int], kind: str = "int32") -> int:
            start(b, len(values))
            for v in reversed(values):
                b.PrependInt32(int(v)) if kind == "int32" else b.PrependInt64(int(v))
            return b.EndVector()

        def fvec(start: Callable[[Any, int], None], values: np.ndarray) -> int:
            start(b, len(values))
            for v in reversed(values.tolist()):
                b.PrependFloat32(float(v))
            return b.EndVector()

        buf_offs = []
        for data in self.buffers:
            vec = b.CreateByteVector(data) if data else None
            tflite.BufferStart(b)
            if vec is not None:
                tflite.BufferAddData(b, vec)
            buf_offs.append(tflite.BufferEnd(b))
        t_offs = []
        for t in self.tensors:
            name = b.CreateString(t.name)
            shape = ivec(tflite.TensorStartShapeVector, list(t.shape))
            quant = None
            if t.scale is not None:
                sc = fvec(tflite.QuantizationParametersStartScaleVector, np.asarray(t.scale))
                zp = ivec(tflite.QuantizationParametersStartZeroPointVector, list(np.asarray(t.zero_point)), "int64")
                tflite.QuantizationParametersStart(b)
                tflite.QuantizationParametersAddScale(b, sc)
                tflite.QuantizationParametersAddZeroPoint(b, zp)
                tflite.QuantizationParametersAddQuantizedDimension(b, t.axis)
                quant = tflite.QuantizationParametersEnd(b)
            tflite.TensorStart(b)
            tflite.TensorAddShape(b, shape)
            tflite.TensorAddType(b, t.dtype)
            tflite.TensorAddBuffer(b, t.buffer)
            tflite.TensorAddName(b, name)
            if quant is not None:
                tflite.TensorAddQuantization(b, quant)
            t_offs.append(tflite.TensorEnd(b))
        codes = sorted({o.code for o in self.ops})
        o_offs = []
        for o in self.ops:
            opts = o.options(b) if o.options is not None else None
            ins = ivec(tflite.OperatorStartInputsVector, o.inputs)
            outs = ivec(tflite.OperatorStartOutputsVector, o.outputs)
            tflite.OperatorStart(b)
            tflite.OperatorAddOpcodeIndex(b, codes.index(o.code))
            tflite.OperatorAddInputs(b, ins)
            tflite.OperatorAddOutputs(b, outs)
            if opts is not None:
                tflite.OperatorAddBuiltinOptionsType(b, o.options_type)
                tflite.OperatorAddBuiltinOptions(b, opts)
            o_offs.append(tflite.OperatorEnd(b))
        c_offs = []
        for c in codes:
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(c, 127))
            tflite.OperatorCodeAddBuiltinCode(b, c)
            tflite.OperatorCodeAddVersion(b, 1)
            c_offs.append(tflite.OperatorCodeEnd(b))

        def tvec(start: Callable[[Any, int], None], offs: list[int]) -> int:
            start(b, len(offs))
            for off in reversed(offs):
                b.PrependUOffsetTRelative(off)
            return b.EndVector()

        tensors = tvec(tflite.SubGraphStartTensorsVector, t_offs)
        operators = tvec(tflite.SubGraphStartOperatorsVector, o_offs)
        sg_in = ivec(tflite.SubGraphStartInputsVector, inputs)
        sg_out = ivec(tflite.SubGraphStartOutputsVector, outputs)
        sg_name = b.CreateString("main")
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensors)
        tflite.SubGraphAddInputs(b, sg_in)
        tflite.SubGraphAddOutputs(b, sg_out)
        tflite.SubGraphAddOperators(b, operators)
        tflite.SubGraphAddName(b, sg_name)
        subgraph = tflite.SubGraphEnd(b)
        subgraphs = tvec(tflite.ModelStartSubgraphsVector, [subgraph])
        opcodes = tvec(tflite.ModelStartOperatorCodesVector, c_offs)
        buffers = tvec(tflite.ModelStartBuffersVector, buf_offs)
        desc = b.CreateString("secureinfer scripts/make_tflite.py")
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, opcodes)
        tflite.ModelAddSubgraphs(b, subgraphs)
        tflite.ModelAddDescription(b, desc)
        tflite.ModelAddBuffers(b, buffers)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def _conv_options(*, padding: int, stride: int = 1, act: int = 0, depthwise: bool = False) -> Callable[[Any], int]:
    import tflite

    def make(b: Any) -> int:
        if depthwise:
            tflite.DepthwiseConv2DOptionsStart(b)
            tflite.DepthwiseConv2DOptionsAddPadding(b, padding)
            tflite.DepthwiseConv2DOptionsAddStrideW(b, stride)
            tflite.DepthwiseConv2DOptionsAddStrideH(b, stride)
            tflite.DepthwiseConv2DOptionsAddDepthMultiplier(b, 1)
            tflite.DepthwiseConv2DOptionsAddFusedActivationFunction(b, act)
            tflite.DepthwiseConv2DOptionsAddDilationWFactor(b, 1)
            tflite.DepthwiseConv2DOptionsAddDilationHFactor(b, 1)
            return tflite.DepthwiseConv2DOptionsEnd(b)
        tflite.Conv2DOptionsStart(b)
        tflite.Conv2DOptionsAddPadding(b, padding)
        tflite.Conv2DOptionsAddStrideW(b, stride)
        tflite.Conv2DOptionsAddStrideH(b, stride)
        tflite.Conv2DOptionsAddFusedActivationFunction(b, act)
        tflite.Conv2DOptionsAddDilationWFactor(b, 1)
        tflite.Conv2DOptionsAddDilationHFactor(b, 1)
        return tflite.Conv2DOptionsEnd(b)

    return make


def _pool_options(k: int) -> Callable[[Any], int]:
    import tflite

    def make(b: Any) -> int:
        tflite.Pool2DOptionsStart(b)
        tflite.Pool2DOptionsAddPadding(b, tflite.Padding.VALID)
        tflite.Pool2DOptionsAddStrideW(b, k)
        tflite.Pool2DOptionsAddStrideH(b, k)
        tflite.Pool2DOptionsAddFilterWidth(b, k)
        tflite.Pool2DOptionsAddFilterHeight(b, k)
        return tflite.Pool2DOptionsEnd(b)

    return make


def _simple(start: Callable[[Any], None], end: Callable[[Any], int],
            *adds: tuple[Callable[[Any, Any], None], Any]) -> Callable[[Any], int]:
    def make(b: Any) -> int:
        start(b)
        for fn, value in adds:
            fn(b, value)
        return end(b)

    return make


def cnn_tflite(*, seed: int = 0, hybrid: bool = False) -> bytes:
    """The CNN of the module docstring with random weights from ``seed``."""
    import tflite

    op, opt = tflite.BuiltinOperator, tflite.BuiltinOptions
    rng = np.random.default_rng(seed)
    w = TfliteWriter()

    def weight(name: str, shape: tuple[int, ...], *, axis: int = 0, fan_in: int) -> int:
        q = w.quantized(f"{name}_int8", rng.normal(0, np.sqrt(2.0 / fan_in), shape), axis=axis)
        f = w.tensor(name, shape)
        w.op(op.DEQUANTIZE, [q], [f])
        return f

    def bias(name: str, n: int, mean: float = 0.0) -> int:
        return w.tensor(name, (n,), data=rng.normal(mean, 0.1, n))

    def act(name: str, shape: tuple[int, ...]) -> int:
        return w.tensor(name, shape)

    x = act("input", (1, 16, 16, 3))
    c1 = act("conv1", (1, 16, 16, 8))
    w.op(op.CONV_2D, [x, weight("conv1_w", (8, 3, 3, 3), fan_in=27), bias("conv1_b", 8)], [c1],
         opt.Conv2DOptions, _conv_options(padding=tflite.Padding.SAME, act=tflite.ActivationFunctionType.RELU))
    p1 = act("pool1", (1, 8, 8, 8))
    w.op(op.MAX_POOL_2D, [c1], [p1], opt.Pool2DOptions, _pool_options(2))
    pads = w.tensor("pads", (4, 2), dtype="int32", data=np.array([[0, 0], [1, 1], [1, 1], [0, 0]]))
    pd = act("padded", (1, 10, 10, 8))
    w.op(op.PAD, [p1, pads], [pd], opt.PadOptions, _simple(tflite.PadOptionsStart, tflite.PadOptionsEnd))
    d1 = act("dw", (1, 8, 8, 8))
    w.op(op.DEPTHWISE_CONV_2D, [pd, weight("dw_w", (1, 3, 3, 8), axis=3, fan_in=9), bias("dw_b", 8)], [d1],
         opt.DepthwiseConv2DOptions,
         _conv_options(padding=tflite.Padding.VALID, act=tflite.ActivationFunctionType.RELU6, depthwise=True))
    s1 = act("skip", (1, 8, 8, 8))
    w.op(op.ADD, [d1, p1], [s1], opt.AddOptions, _simple(tflite.AddOptionsStart, tflite.AddOptionsEnd))
    a1 = act("avg", (1, 4, 4, 8))
    w.op(op.AVERAGE_POOL_2D, [s1], [a1], opt.Pool2DOptions, _pool_options(2))
    c2 = act("conv2", (1, 4, 4, 4))
    w.op(op.CONV_2D, [a1, weight("conv2_w", (4, 1, 1, 8), fan_in=8), bias("conv2_b", 4, mean=0.5)], [c2],
         opt.Conv2DOptions, _conv_options(padding=tflite.Padding.VALID))
    r2 = act("relu2", (1, 4, 4, 4))
    w.op(op.RELU, [c2], [r2])
    shape = w.tensor("flat_shape", (2,), dtype="int32", data=np.array([-1, 64]))
    flat = act("flat", (1, 64))
    w.op(op.RESHAPE, [r2, shape], [flat])
    fc1_w = (w.quantized("fc1_w_int8", rng.normal(0, np.sqrt(1.0 / 64), (10, 64))) if hybrid
             else weight("fc1_w", (10, 64), fan_in=64))
    f1 = act("fc1", (1, 10))
    w.op(op.FULLY_CONNECTED, [flat, fc1_w, bias("fc1_b", 10)], [f1], opt.FullyConnectedOptions,
         _simple(tflite.FullyConnectedOptionsStart, tflite.FullyConnectedOptionsEnd))
    axes = w.tensor("mean_axes", (2,), dtype="int32", data=np.array([1, 2]))
    m = act("mean", (1, 4))
    w.op(op.MEAN, [r2, axes], [m], opt.ReducerOptions,
         _simple(tflite.ReducerOptionsStart, tflite.ReducerOptionsEnd, (tflite.ReducerOptionsAddKeepDims, False)))
    f2 = act("fc2", (1, 10))
    w.op(op.FULLY_CONNECTED, [m, weight("fc2_w", (10, 4), fan_in=4), bias("fc2_b", 10)], [f2],
         opt.FullyConnectedOptions, _simple(tflite.FullyConnectedOptionsStart, tflite.FullyConnectedOptionsEnd))
    logits = act("logits", (1, 10))
    w.op(op.ADD, [f1, f2], [logits], opt.AddOptions, _simple(tflite.AddOptionsStart, tflite.AddOptionsEnd))
    out = act("probs", (1, 10))
    w.op(op.SOFTMAX, [logits], [out], opt.SoftmaxOptions,
         _simple(tflite.SoftmaxOptionsStart, tflite.SoftmaxOptionsEnd, (tflite.SoftmaxOptionsAddBeta, 1.0)))
    return w.finish([x], [out])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hybrid", action="store_true", help="int8 weights straight into the first FULLY_CONNECTED")
    args = ap.parse_args()
    args.out.write_bytes(cnn_tflite(seed=args.seed, hybrid=args.hybrid))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
