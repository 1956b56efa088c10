"""Small ONNX models built inline for the tests (onnx.helper), with seeded random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value.astype(np.float32), name)


def small_cnn(seed: int = 0, trans_b: bool = True, batchnorm: bool = True) -> onnx.ModelProto:
    """x(N,3,8,8) → Conv3x3(8)+BN → Relu → depthwise Conv3x3 → Relu → Conv1x1(16, stride 2) → Relu
    → GlobalAveragePool → Flatten → Gemm(10). Dynamic batch."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("c1_w", rng.normal(0, 0.3, (8, 3, 3, 3))),
        _init("c1_b", rng.normal(0, 0.1, 8)),
        _init("dw_w", rng.normal(0, 0.4, (8, 1, 3, 3))),
        _init("dw_b", rng.normal(0, 0.1, 8)),
        _init("pw_w", rng.normal(0, 0.3, (16, 8, 1, 1))),
        _init("fc_w", rng.normal(0, 0.3, (10, 16) if trans_b else (16, 10))),
        _init("fc_b", rng.normal(0, 0.1, 10)),
    ]
    nodes = [helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    c1_out = "c1"
    if batchnorm:
        inits += [
            _init("bn_s", rng.uniform(0.5, 1.5, 8)),
            _init("bn_b", rng.normal(0, 0.2, 8)),
            _init("bn_m", rng.normal(0, 0.2, 8)),
            _init("bn_v", rng.uniform(0.5, 2.0, 8)),
        ]
        nodes.append(
            helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn1"], name="bn1")
        )
        c1_out = "bn1"
    nodes += [
        helper.make_node("Relu", [c1_out], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "dw_w", "dw_b"], ["dw"], name="dwconv", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["dw"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "pw_w"], ["pw"], name="pwconv", strides=[2, 2]),
        helper.make_node("Relu", ["pw"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=int(trans_b), alpha=1.0),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def no_conv_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def quantized_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q"),
            helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq"),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def transformer_block(seed: int = 0, hidden: int = 32, seq: int = 6) -> onnx.ModelProto:
    """x(N, seq, hidden) → MatMul(W_q, initializer) → Relu → MatMul(W from a Constant node via Transpose)
    → Add(x) → MatMul with the weight on the left (W_l @ h) → Relu → MatMul(shared W_q). Dynamic batch."""
    rng = np.random.default_rng(seed)
    wq = rng.normal(0, 0.2, (hidden, hidden)).astype(np.float32)
    w2_t = rng.normal(0, 0.2, (hidden, hidden)).astype(np.float32)  # stored transposed, Transpose node fixes it
    wl = rng.normal(0, 0.3, (seq, seq)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["h1"], name="mm_q"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu_q"),
        helper.make_node("Constant", [], ["w2_t"], name="const_w2", value=numpy_helper.from_array(w2_t, "w2_t_value")),
        helper.make_node("Transpose", ["w2_t"], ["w2"], name="transpose_w2", perm=[1, 0]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm_2"),
        helper.make_node("Add", ["h2", "x"], ["res"], name="residual"),
        helper.make_node("MatMul", ["wl", "res"], ["h3"], name="mm_left"),
        helper.make_node("Relu", ["h3"], ["r3"], name="relu_l"),
        helper.make_node("MatMul", ["r3", "wq"], ["y"], name="mm_shared"),
    ]
    graph = helper.make_graph(
        nodes,
        "transformer_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, hidden])],
        [_init("wq", wq), _init("wl", wl)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def deconv_model(seed: int = 0) -> onnx.ModelProto:
    """x(N,4,5,5) → ConvTranspose 4→6, 3x3, stride 2 (+bias) → Relu → Conv 1x1 6→3."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("ConvTranspose", ["x", "dw", "db"], ["d"], name="deconv", strides=[2, 2]),
            helper.make_node("Relu", ["d"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "cw"], ["y"], name="head"),
        ],
        "deconv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 11, 11])],
        [
            _init("dw", rng.normal(0, 0.3, (4, 6, 3, 3))),
            _init("db", rng.normal(0, 0.1, 6)),
            _init("cw", rng.normal(0, 0.3, (3, 6, 1, 1))),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mobilenet_v2_like(seed: int = 0, width: int = 16, size: int = 32) -> onnx.ModelProto:
    """A MobileNetV2-shaped network: stem Conv3x3/2 + BN + ReLU6, inverted residual blocks (1x1 expand +
    BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 project + BN, residual Add when shapes match), a 1x1 head
    conv, GlobalAveragePool, Flatten, Gemm. He-initialised random weights; dynamic batch."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = [_init("six", np.array(6.0)), _init("zero", np.array(0.0))]
    nodes: list[onnx.NodeProto] = []
    counter = [0]

    def conv_bn(x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, relu6: bool = True) -> str:
        i = counter[0] = counter[0] + 1
        fan_in = cin // group * k * k
        inits.append(_init(f"w{i}", rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k))))
        for name, value in (("s", rng.uniform(0.5, 1.5, cout)), ("b", rng.normal(0, 0.1, cout)),
                            ("m", rng.normal(0, 0.1, cout)), ("v", rng.uniform(0.5, 1.5, cout))):  # fmt: skip
            inits.append(_init(f"bn{i}_{name}", value))
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", strides=[stride, stride],
                                      pads=[pad] * 4, group=group))  # fmt: skip
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *(f"bn{i}_{n}" for n in "sbmv")], [f"n{i}"],
                                      name=f"bn{i}"))  # fmt: skip
        if not relu6:
            return f"n{i}"
        nodes.append(helper.make_node("Clip", [f"n{i}", "zero", "six"], [f"r{i}"], name=f"relu6_{i}"))
        return f"r{i}"

    x = conv_bn("x", 3, width, 3, stride=2)
    cin = width
    for cout, stride, expand in ((width, 1, 1), (24, 2, 4), (24, 1, 4), (32, 2, 4), (32, 1, 4)):
        h = conv_bn(x, cin, cin * expand, 1) if expand > 1 else x
        h = conv_bn(h, cin * expand, cin * expand, 3, stride=stride, group=cin * expand)
        h = conv_bn(h, cin * expand, cout, 1, relu6=False)
        if stride == 1 and cin == cout:
            counter[0] += 1
            nodes.append(helper.make_node("Add", [x, h], [f"res{counter[0]}"], name=f"add{counter[0]}"))
            h = f"res{counter[0]}"
        x, cin = h, cout
    x = conv_bn(x, cin, 64, 1)
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    inits += [_init("fc_w", rng.normal(0, np.sqrt(1.0 / 64), (10, 64))), _init("fc_b", rng.normal(0, 0.01, 10))]
    graph = helper.make_graph(
        nodes,
        "mobilenet_v2_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_relu_gemm(batch: int | str = "N", width: int | str = 8) -> onnx.ModelProto:
    """x[N,3,8,W] → Conv(4, 3x3, pad 1) + bias → Relu → Flatten → Gemm(→ 5), FP32."""
    rng = np.random.default_rng(0)
    w_width = width if isinstance(width, int) else 8
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "conv_w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "conv_b"),
        numpy_helper.from_array(rng.standard_normal((5, 4 * 8 * w_width)).astype(np.float32) * 0.1, "fc_w"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32) * 0.1, "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_relu_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=width == 8)
    return model


ORT_PROFILE = """\
name = "test-ort"
engine = "onnxruntime"
device = "CPU"

[parallel]
cores = 1
"""
"""A profile whose engine is onnxruntime (CPU): tests that build without OpenVINO write it to a file."""


def write_ort_profile(folder: Path) -> Path:
    """:data:`ORT_PROFILE` as ``folder/test-ort.toml``."""
    path = folder / "test-ort.toml"
    path.write_text(ORT_PROFILE, encoding="utf-8")
    return path

