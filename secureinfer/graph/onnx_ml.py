"""Handlers of the ONNX-ML (``ai.onnx.ml``) operators that scikit-learn pipelines emit
through skl2onnx, and of the *label* values of a classifier.

ONNX-ML op -> IR:

=====================================  ===============================================
``Scaler`` (offset, scale)             ``channel_affine``: ``(x - offset) * scale``
``LinearClassifier``                   ``linear`` (the scores; label = classes[argmax])
  post_transform NONE / SOFTMAX /        + nothing / ``softmax`` / ``sigmoid``
  LOGISTIC
``LinearRegressor`` (NONE)             ``linear``
``Normalizer`` (L1) of a softmax       nothing (a softmax already sums to 1)
``ZipMap``                             nothing: the probabilities stay a (batch,
                                       classes) tensor, columns in label order
``ArrayFeatureExtractor`` (constant    a relabelling of the classes (labels[i] =
  int labels, label indices)             table[old label i])
=====================================  ===============================================

A classifier has two outputs, a label and probabilities (or scores). The label is not an
activation: it is recorded in ``labels_of`` as *(IR value of the scores, class labels)*
and the engine computes it as ``labels[argmax(scores)]`` inside the MPC (a secure argmax
and a local dot product with the public labels). ``ArgMax`` over a softmax (or sigmoid)
takes the softmax's input as the scores: the same argmax, and no approximation error
between the label and what a plaintext runtime computes. ``Cast``, ``Reshape``,
``Squeeze``, ``Unsqueeze``, ``Flatten`` and ``Identity`` pass a label through.

Refused, with the reason: string class labels, ``SOFTMAX_ZERO`` and ``PROBIT``
post-transforms, a ``Normalizer`` anywhere but after a softmax (it needs a secure
division), one-row binary ``LinearClassifier`` coefficients.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from secureinfer.graph.builder import Builder, ImportProblem

__all__ = ["LABEL_PASS_THROUGH", "ML_DOMAIN", "OnnxMlOps"]

ML_DOMAIN = "ai.onnx.ml"
#: default-domain ops that carry a label value through unchanged
LABEL_PASS_THROUGH = frozenset({"Cast", "CastLike", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class OnnxMlOps:
    """ONNX-ML handlers (``ml_<OpType>``) and ``ArgMax``; mixed into the importer."""

    b: Builder
    labels_of: dict[str, tuple[str, tuple[int, ...]]]

    def const(self, name: str) -> np.ndarray | None:
        raise NotImplementedError

    def act(self, name: str) -> str | None:
        raise NotImplementedError

    def x(self, node: Any, k: int = 0) -> str:
        raise NotImplementedError

    def where(self, node: Any) -> str:
        raise NotImplementedError

    def base_name(self, node: Any) -> str:
        raise NotImplementedError

    def emit(self, node: Any, op: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             params: dict[str, np.ndarray | None] | None = None) -> str:
        raise NotImplementedError

    def _producer(self, value: str) -> Any:
        return next((n for n in reversed(self.b.nodes) if n.name == value), None)

    def _features(self, x: str) -> int:
        shape = self.b.shapes[x]
        if len(shape) != 2:
            raise ImportProblem(f"input of shape {shape}: ONNX-ML linear models take (batch, features)")
        return int(shape[1])

    def _weights(self, node: Any, a: dict[str, Any], x: str) -> tuple[np.ndarray, np.ndarray]:
        feats = self._features(x)
        coef = np.asarray(a.get("coefficients", []), dtype=np.float64)
        if coef.size == 0 or coef.size % feats:
            raise ImportProblem(f"{coef.size} coefficients for {feats} input features")
        w = coef.reshape(-1, feats)  # (outputs, features)
        bias = np.asarray(a.get("intercepts", np.zeros(w.shape[0])), dtype=np.float64).reshape(-1)
        if bias.size != w.shape[0]:
            raise ImportProblem(f"{bias.size} intercepts for {w.shape[0]} outputs")
        return w, bias

    def _scores(self, node: Any, x: str, w: np.ndarray, bias: np.ndarray) -> str:
        attrs = {"in_features": int(w.shape[1]), "out_features": int(w.shape[0])}
        # not self.emit: its shape cross-check is against output 0, a classifier's label
        return self.b.emit("linear", [x], attrs, name=self.base_name(node), origin=self.where(node),
                           params={"weight": w, "bias": bias if bias.any() else None})

    # ------------------------------------------------------------------ handlers
    def ml_Scaler(self, node: Any, a: dict[str, Any]) -> str:
        x = self.x(node)
        offset = np.asarray(a.get("offset", [0.0]), dtype=np.float64).reshape(-1)
        scale = np.asarray(a.get("scale", [1.0]), dtype=np.float64).reshape(-1)
        feats = self._features(x)
        for what, v in (("offset", offset), ("scale", scale)):
            if v.size not in (1, feats):
                raise ImportProblem(f"Scaler {what} has {v.size} values for {feats} features")
        return self.b.affine(x, weight=scale, bias=-offset * scale, axis=1, name=self.base_name(node),
                             origin=self.where(node))

    def ml_LinearClassifier(self, node: Any, a: dict[str, Any]) -> dict[str, str]:
        x = self.x(node)
        if "classlabels_strings" in a:
            raise ImportProblem("string class labels (a label must be a ring integer); train on integer "
                                "labels or map them after inference", "labels")
        classes = tuple(int(c) for c in a.get("classlabels_ints", []))
        w, bias = self._weights(node, a, x)
        if w.shape[0] != len(classes):
            raise ImportProblem(f"{w.shape[0]} coefficient rows for {len(classes)} classes (the one-row binary "
                                "form is not supported; skl2onnx emits one row per class)")
        scores = self._scores(node, x, w, bias)
        post = _text(a.get("post_transform", "NONE"))
        name = self.base_name(node)
        if post == "NONE":
            probs = scores
        elif post == "SOFTMAX":
            probs = self.b.emit("softmax", [scores], {"axis": 1}, name=f"{name}.softmax", origin=self.where(node))
        elif post == "LOGISTIC":
            probs = self.b.emit("sigmoid", [scores], name=f"{name}.sigmoid", origin=self.where(node))
        else:
            raise ImportProblem(f"post_transform {post} (supported: NONE, SOFTMAX, LOGISTIC)")
        self.labels_of[node.output[0]] = (scores, classes)
        return {node.output[1]: probs} if len(node.output) > 1 and node.output[1] else {}

    def ml_LinearRegressor(self, node: Any, a: dict[str, Any]) -> str:
        x = self.x(node)
        post = _text(a.get("post_transform", "NONE"))
        if post != "NONE":
            raise ImportProblem(f"LinearRegressor post_transform {post} (supported: NONE)")
        w, bias = self._weights(node, a, x)
        targets = int(a.get("targets", w.shape[0]))
        if targets != w.shape[0]:
            raise ImportProblem(f"targets={targets} but {w.shape[0]} coefficient rows")
        return self._scores(node, x, w, bias)

    def ml_Normalizer(self, node: Any, a: dict[str, Any]) -> str:
        x = self.x(node)
        norm = _text(a.get("norm", "MAX"))
        prod = self._producer(x)
        if norm == "L1" and prod is not None and prod.op == "softmax":
            return x  # a softmax sums to 1 along its axis: L1 normalization leaves it as it is
        raise ImportProblem(f"Normalizer(norm={norm}) of a value that is not a softmax: it needs a secure "
                            "division (not supported)", "normalizer")

    def ml_ZipMap(self, node: Any, a: dict[str, Any]) -> str:
        return self.x(node)  # the client gets the (batch, classes) tensor; columns in label order

    def ml_ArrayFeatureExtractor(self, node: Any, a: dict[str, Any]) -> dict[str, str]:
        table, idx = self.const(node.input[0]), node.input[1]
        if table is None or idx not in self.labels_of:
            raise ImportProblem("ArrayFeatureExtractor other than a class-label lookup (constant labels, "
                                "indices from an ArgMax)")
        if not np.issubdtype(table.dtype, np.integer):
            raise ImportProblem(f"class labels of type {table.dtype} (a label must be a ring integer)", "labels")
        src, classes = self.labels_of[idx]
        flat = table.reshape(-1)
        if any(not 0 <= c < flat.size for c in classes):
            raise ImportProblem(f"label indices {classes} outside the {flat.size}-entry table")
        self.labels_of[node.output[0]] = (src, tuple(int(flat[c]) for c in classes))
        return {}

    def op_ArgMax(self, node: Any, a: dict[str, Any]) -> dict[str, str]:
        x = self.x(node)
        nd = len(self.b.shapes[x])
        if int(a.get("axis", 0)) % nd != nd - 1 or nd != 2:
            raise ImportProblem("ArgMax other than over the classes of (batch, classes) scores")
        if int(a.get("select_last_index", 0)):
            raise ImportProblem("ArgMax with select_last_index=1")
        prod = self._producer(x)
        src = prod.inputs[0] if prod is not None and prod.op in ("softmax", "sigmoid") else x
        self.labels_of[node.output[0]] = (src, tuple(range(int(self.b.shapes[x][-1]))))
        return {}

    def pass_label(self, node: Any) -> bool:
        """Carry a label value through a shape or type op; True if ``node`` was one."""
        if node.op_type in LABEL_PASS_THROUGH and node.input and node.input[0] in self.labels_of:
            self.labels_of[node.output[0]] = self.labels_of[node.input[0]]
            return True
        return False
