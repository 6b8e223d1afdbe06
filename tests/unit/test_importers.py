"""PyTorch and ONNX importers: coverage, semantics (float64 reference vs torch / ONNX
reference), one error listing every unsupported layer, safe model-file loading."""

from __future__ import annotations

import copy
import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secureinfer.engine.ops import OPS
from secureinfer.engine.plan import compile_plan
from secureinfer.errors import InvalidArgumentError, UnsupportedModelError
from secureinfer.graph.load import load_model_file
from secureinfer.graph.onnx_import import from_onnx
from secureinfer.graph.passes import evaluate
from secureinfer.graph.torch_import import from_torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)  # non-secret: test weights
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _ref(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double()).numpy()


def _onnx_bytes(model: nn.Module, x: torch.Tensor, **kw: object) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, **kw)
    return buf.getvalue()


class LeNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 100), nn.ReLU(), nn.Linear(100, 10))


class BasicBlock(nn.Module):
    """ResNet basic block with a strided 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer1(self.stem(x))), 1))


class MixedCNN(nn.Module):
    """BN (after an add, so the ONNX exporter cannot fuse it), residual add, maxpool, avgpool, concat."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(12 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        y = self.bn(y + self.c2(y))
        z = torch.cat([F.max_pool2d(y, 2), F.avg_pool2d(y, 2, padding=0)], dim=1)
        z = F.avg_pool2d(z, 2)
        return self.fc(z.view(z.size(0), -1))


# ----------------------------------------------------------------------------- one error, every layer


def test_three_unsupported_layers_yield_one_error_naming_all() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ELU(), nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 1),
                          nn.Softplus(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2), nn.ReLU()).eval()
    with pytest.raises(UnsupportedModelError) as err:
        from_torch(model, (1, 1, 9, 9))  # 7x7 -> ceil_mode gives 4x4 instead of 3x3
    probs = err.value.problems
    assert len(probs) == 3, probs
    text = str(err.value)
    assert "ELU" in text and "Softplus" in text and "ceil_mode" in text
    assert all("->" in p for p in probs)  # each with a suggested rewrite
    assert "nn.ReLU or nn.GELU" in text


def test_engine_gaps_are_listed_with_import_problems() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Hardswish(), nn.Linear(4, 2)).eval()
    with pytest.raises(UnsupportedModelError) as err:
        from_torch(model, (1, 4))
    gaps = 0 if "sigmoid" in OPS else 1
    assert len(err.value.problems) == 1 + gaps
    g = from_torch(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()).eval(), (1, 4), strict=False)
    assert [n.op for n in g.nodes] == ["linear", "sigmoid"]


def test_batch_axis_mixing_is_reported() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1)

    with pytest.raises(UnsupportedModelError, match="batch axis"):
        from_torch(Bad(), (1, 3))


# ----------------------------------------------------------------------------- reference models


def test_lenet_imports_and_matches_torch() -> None:
    torch.manual_seed(0)
    model = LeNet().eval()
    g = from_torch(model, (1, 1, 28, 28))
    assert [n.op for n in g.nodes] == ["conv2d", "relu", "maxpool2d", "conv2d", "relu", "maxpool2d", "flatten",
                                       "linear", "relu", "linear"]
    assert g.params["0.weight"].shape == (16, 1, 5, 5) and g.params["7.weight"].shape == (100, 256)
    x = torch.randn(3, 1, 28, 28)
    np.testing.assert_allclose(evaluate(g, x.numpy()), _ref(model, x), atol=1e-9)
    plan = compile_plan(g, batch=1, n_parties=2)
    assert plan.output_shape == (1, 10)


def test_small_resnet_folds_batchnorm_and_matches_torch() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(SmallResNet())
    g = from_torch(model, (1, 3, 16, 16))
    ops = [n.op for n in g.nodes]
    assert "channel_affine" not in ops  # every BN folded into its conv
    assert ops.count("conv2d") == 4 and ops.count("add") == 1 and "global_avgpool" in ops
    x = torch.randn(4, 3, 16, 16)
    np.testing.assert_allclose(evaluate(g, x.numpy()), _ref(model, x), atol=1e-9)
    assert compile_plan(g, batch=2, n_parties=2).output_shape == (2, 10)


class Variants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
        self.b = nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.ap = nn.AvgPool2d(3, stride=1, padding=1)
        self.aap = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.a(x))
        return torch.relu(self.ap(self.b(y)) * 0.5 + 1.0) - 0.25

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        y = torch.cat([y.mean((2, 3)), torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)], 1)
        return self.fc(self.bn(self.drop(y)))


def test_module_and_function_variants_match_torch() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(Variants())
    g = from_torch(model, torch.randn(1, 4, 8, 6), strict=False)
    ops = [n.op for n in g.nodes]
    assert ops.count("conv2d") == 2 and "leaky_relu" in ops and ops.count("global_avgpool") == 2
    x = torch.randn(3, 4, 8, 6)
    np.testing.assert_allclose(evaluate(g, x.numpy()), _ref(model, x), atol=1e-9)


def test_expand_and_slicing_are_reported() -> None:
    class Net(Variants):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.features(x)
            return torch.cat([self.aap(y), y.mean((2, 3), keepdim=True).expand(-1, -1, 2, 2)], 1)[:, :8]

    with pytest.raises(UnsupportedModelError) as err:
        from_torch(Net().eval(), (1, 4, 8, 6), strict=False)
    # channel slicing [:, :8] maps (IR slice); the expand does not
    assert len(err.value.problems) == 1 and "expand" in str(err.value)

    class Strided(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, ::2]

    with pytest.raises(UnsupportedModelError, match="step other than 1"):
        from_torch(Strided(), (1, 4, 6), strict=False)


def test_attention_matmul_between_activations() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(4, 4)
            self.ln = nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 5, 4)
            s = torch.softmax(self.q(x) @ x.reshape(x.shape[0], 4, 5) / 2.0, dim=-1)
            return F.gelu(self.ln(torch.tanh(s @ x) + torch.sigmoid(x)))

    torch.manual_seed(0)
    model = Attn().eval()
    g = from_torch(model, (1, 5, 4), strict=False)
    ops = [n.op for n in g.nodes]
    assert ops.count("matmul") == 2 and {"softmax", "layernorm", "gelu", "tanh", "sigmoid"} <= set(ops)
    x = torch.randn(2, 5, 4)
    np.testing.assert_allclose(evaluate(g, x.numpy()), _ref(model, x), atol=1e-9)


# ----------------------------------------------------------------------------- ONNX


def test_torch_and_onnx_imports_give_the_same_reference_outputs() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(MixedCNN())
    x = torch.randn(1, 3, 8, 8)
    g_t = from_torch(model, x)
    g_o = from_onnx(_onnx_bytes(model, x, opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "n"}}))
    assert [n.op for n in g_t.nodes] == [n.op for n in g_o.nodes]
    assert {"add", "channel_affine", "maxpool2d", "avgpool2d", "concat"} <= {n.op for n in g_o.nodes}
    xs = torch.randn(4, 3, 8, 8)
    out_t, out_o = evaluate(g_t, xs.numpy()), evaluate(g_o, xs.numpy())
    np.testing.assert_allclose(out_o, out_t, atol=1e-5)  # ONNX stores float32 weights
    np.testing.assert_allclose(out_t, _ref(model, xs), atol=1e-9)
    assert compile_plan(g_o, batch=1, n_parties=2).rounds() == compile_plan(g_t, batch=1, n_parties=2).rounds()


def _secure(g, x: torch.Tensor, n: int) -> np.ndarray:  # noqa: ANN001
    """The graph run by the secure engine on n in-process parties."""
    from secureinfer import ring
    from secureinfer.dealer.material import BundleBuilder
    from secureinfer.engine.plan import fixed_operand_shapes, generate_request_material
    from secureinfer.engine.runner import PartyModel, encode_params, open_masks, run_plan
    from secureinfer.prg import Prg
    from secureinfer.sharing import reconstruct, share

    from .mpc import run_parties

    prg = Prg.from_os()
    param_shares = {k: share(v, n, prg=prg) for k, v in encode_params(g).items()}
    model_b = BundleBuilder(n)
    masks = {k: model_b.random(f"{k}/B", s) for k, s in fixed_operand_shapes(g).items()}
    plan = compile_plan(g, batch=x.shape[0], n_parties=n)
    req_b = BundleBuilder(n)
    generate_request_material(plan, req_b, masks)
    xs = share(ring.encode(x, frac_bits=g.frac_bits), n, prg=prg)

    def party(s, bundle):  # noqa: ANN001, ANN202
        mine = {k: v[s.party_id] for k, v in param_shares.items()}
        m, d = open_masks(s, g, mine, model_b.party_bundle(s.party_id))
        pm = PartyModel(g, party_id=s.party_id, shares=mine, masks=m, diffs=d)
        return run_plan(s, plan, pm, bundle, xs[s.party_id])["logits"]

    res, _ = run_parties(n, party, builder=req_b)
    return ring.decode(reconstruct(res), frac_bits=plan.output_scale).numpy()


def test_torch_and_onnx_imports_give_the_same_secure_outputs() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(MixedCNN())
    x = torch.randn(4, 3, 8, 8)
    g_t = from_torch(model, x[:1])
    g_o = from_onnx(_onnx_bytes(model, x[:1], opset_version=17))
    ref = _ref(model, x)
    out_t, out_o = _secure(g_t, x, 2), _secure(g_o, x, 2)
    assert np.abs(out_t - ref).max() < 1e-3 and np.abs(out_o - ref).max() < 1e-3
    assert (out_t.argmax(1) == ref.argmax(1)).all() and (out_o.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("opset", [13, 17])
def test_onnx_gelu_layernorm_patterns_and_shape_folding(opset: int) -> None:
    class T(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 8)
            self.ln = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.view(x.size(0), -1)
            return torch.softmax(F.gelu(self.ln(self.fc(x))), dim=-1)

    torch.manual_seed(0)
    model = T().eval()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 2.0)
        model.ln.bias.uniform_(-1.0, 1.0)
    x = torch.randn(1, 3, 4)
    g = from_onnx(_onnx_bytes(model, x, opset_version=opset, input_names=["x"], dynamic_axes={"x": {0: "n"}}),
                  strict=False)
    # LayerNorm's gamma/beta follow it as one channel_affine (the engine's convention)
    assert [n.op for n in g.nodes] == ["flatten", "linear", "layernorm", "channel_affine", "gelu", "softmax"]
    xs = torch.randn(3, 3, 4)
    np.testing.assert_allclose(evaluate(g, xs.numpy()), _ref(model, xs), atol=1e-5)


def _model(nodes: list, inits: dict[str, np.ndarray], in_shape: list, out_name: str, opset: int = 18) -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.int64 if v.dtype.kind == "i" else np.float32), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return m.SerializeToString()


def test_onnx_ops_match_the_onnx_reference_evaluator() -> None:
    rng = np.random.default_rng(0)  # non-secret: test weights

    def r(*s: int) -> np.ndarray:
        return rng.standard_normal(s).astype(np.float32)

    inits = {"w": r(4, 3, 3, 3), "cb": r(4), "s": r(4) + 2, "b": r(4), "m": r(4), "v": np.abs(r(4)) + 0.5,
             "g": r(16, 5), "gc": r(5), "mm": r(5, 6), "ad": r(6), "zero": np.zeros(1, np.float32),
             "ax": np.array([2, 3]), "uq": np.array([1]), "half": np.array(0.5, np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "cb"], ["c"], auto_pad="SAME_UPPER", strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("Clip", ["bn", "zero"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["p"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
        helper.make_node("Mul", ["ap", "half"], ["h"]),
        helper.make_node("Flatten", ["h"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "g", "gc"], ["gm"], alpha=0.5, beta=2.0),
        helper.make_node("Unsqueeze", ["gm", "uq"], ["u"]),
        helper.make_node("MatMul", ["u", "mm"], ["mmo"]),
        helper.make_node("Add", ["mmo", "ad"], ["ma"]),
        helper.make_node("LeakyRelu", ["ma"], ["lr"], alpha=0.1),
        helper.make_node("Squeeze", ["lr", "uq"], ["out"]),
    ]
    data = _model(nodes, inits, ["N", 3, 4, 4], "out")
    g = from_onnx(data, strict=False)
    ops = [n.op for n in g.nodes]
    # BN folds into the conv, the Add into the MatMul's linear; x * 0.5 after pooling stays an affine
    assert ops == ["conv2d", "relu", "maxpool2d", "avgpool2d", "channel_affine", "flatten", "linear", "reshape",
                   "linear", "leaky_relu", "flatten"]
    x = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
    want = ReferenceEvaluator(onnx.load_from_string(data)).run(None, {"x": x})[0]
    np.testing.assert_allclose(evaluate(g, x), want, atol=1e-4)


def test_onnx_unsupported_nodes_are_all_listed() -> None:
    nodes = [
        helper.make_node("Elu", ["x"], ["e"]),
        helper.make_node("Transpose", ["e"], ["t"], perm=[0, 1, 3, 2]),  # fine: the batch stays first
        helper.make_node("MaxPool", ["t"], ["p"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        helper.make_node("Transpose", ["p"], ["q"], perm=[1, 0, 2, 3]),  # moves the batch axis
        helper.make_node("Relu", ["q"], ["out"]),
    ]
    with pytest.raises(UnsupportedModelError) as err:
        from_onnx(_model(nodes, {}, [1, 2, 6, 6], "out"))
    assert len(err.value.problems) == 3
    text = str(err.value)
    assert "Elu" in text and "Transpose" in text and "ceil_mode" in text
    # below opset 13 the model is converted first (onnx.version_converter: skl2onnx picks
    # the lowest opset that will do); below 7 it is refused with the advice
    assert [n.op for n in from_onnx(_model([helper.make_node("Relu", ["x"], ["out"])], {}, [1, 2], "out",
                                           opset=11)).nodes] == ["relu"]
    with pytest.raises(UnsupportedModelError, match="opset"):
        from_onnx(_model([helper.make_node("Relu", ["x"], ["out"])], {}, [1, 2], "out", opset=6))


# ----------------------------------------------------------------------------- model files


def test_model_files_pt2_onnx_and_pickles_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(SmallResNet())
    x = torch.randn(2, 3, 16, 16)
    p = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(p))
    g = load_model_file(p)
    np.testing.assert_allclose(evaluate(g, x.numpy()), _ref(model, x), atol=1e-6)

    q = tmp_path / "m.onnx"
    q.write_bytes(_onnx_bytes(model, x[:1], opset_version=17))
    assert [n.op for n in load_model_file(q).nodes] == [n.op for n in g.nodes]

    # a .pt2 whose weight config asks for pickle is refused before torch sees it
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(p) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("_weights_config.json"):
                cfg = json.loads(data)
                next(iter(cfg["config"].values()))["use_pickle"] = True
                data = json.dumps(cfg).encode()
            zout.writestr(info.filename, data)
    with pytest.raises(InvalidArgumentError, match="unpickled"):
        load_model_file(bad)

    # a pickled object is never loaded: its payload would create the marker file
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InvalidArgumentError, match="pickled"):
        load_model_file(evil)
    torch.save(model, str(tmp_path / "evil2.pt"))
    with pytest.raises(InvalidArgumentError, match="pickled"):
        load_model_file(tmp_path / "evil2.pt")
    assert not marker.exists()


@pytest.mark.slow
def test_torchscript_cnn_file(tmp_path: Path) -> None:
    """TorchScript archives go through torch's TorchScript->export converter (slow warm-up)."""
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                        nn.Flatten(), nn.Linear(4 * 3 * 3, 3)))
    p = tmp_path / "m.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(p))
    with pytest.raises(InvalidArgumentError, match="input_shape"):
        load_model_file(p)
    g = load_model_file(p, input_shape=(1, 8, 8))
    assert [n.op for n in g.nodes] == ["conv2d", "relu", "maxpool2d", "flatten", "linear"]
    x = torch.randn(2, 1, 8, 8)
    np.testing.assert_allclose(evaluate(g, x.numpy()), _ref(model, x), atol=1e-6)
