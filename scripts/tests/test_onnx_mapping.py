"""ONNX -> HF BERT name recovery on tiny graphs built with onnx.helper."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import convert_onnx_bert as c


@pytest.mark.parametrize(
    "name,hf",
    [
        ("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
        ("bert.embeddings.LayerNorm.weight", "embeddings.LayerNorm.weight"),
        ("model.0.auto_model.encoder.layer.2.output.dense.bias", "encoder.layer.2.output.dense.bias"),
        ("0.auto_model.pooler.dense.weight", "pooler.dense.weight"),
        ("onnx::MatMul_470", None),
        ("/model/Constant_output_0", None),
        ("classifier.weight", None),
    ],
)
def test_normalise_name(name, hf):
    assert c.normalise_name(name) == hf


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _linear_graph(bias_first=True, with_bias=True):
    """x -> LayerNorm -> MatMul(onnx::MatMul_7) -> Add(query.bias) -> out; plus a value branch with
    a Div by sqrt(head_dim) under /attention/self/."""
    rng = np.random.default_rng(0)
    w_in_out = rng.normal(size=(4, 6)).astype(np.float32)  # stored [in, out]
    w2 = rng.normal(size=(4, 6)).astype(np.float32)
    inits = [
        _init("bert.embeddings.LayerNorm.weight", np.ones(4)),
        _init("bert.embeddings.LayerNorm.bias", np.zeros(4)),
        _init("onnx::MatMul_7", w_in_out),
        _init("bert.encoder.layer.0.attention.self.query.bias", np.arange(6)),
        _init("onnx::MatMul_9", w2),
        _init("bert.encoder.layer.0.attention.self.key.bias", -np.arange(6)),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"], ["ln"], epsilon=1e-12, axis=-1),
        helper.make_node("MatMul", ["ln", "onnx::MatMul_7"], ["q_mm"], name="/encoder/layer.0/attention/self/query/MatMul"),
    ]
    ins = ["bert.encoder.layer.0.attention.self.query.bias", "q_mm"]
    if with_bias:
        nodes.append(helper.make_node("Add", ins if bias_first else ins[::-1], ["q"]))
    else:
        nodes.append(helper.make_node("Relu", ["q_mm"], ["q"]))
    nodes += [
        helper.make_node("MatMul", ["ln", "onnx::MatMul_9"], ["k_mm"]),
        helper.make_node("Add", ["k_mm", "bert.encoder.layer.0.attention.self.key.bias"], ["k"]),
        helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.array(np.sqrt(3.0), np.float32), "scale")),
        helper.make_node("Div", ["q", "scale"], ["out"], name="/encoder/layer.0/attention/self/Div"),
    ]
    g = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6]), helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 6])],
        initializer=inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w_in_out, w2


@pytest.mark.parametrize("bias_first", [True, False])
def test_matmul_weight_named_through_bias_add(bias_first):
    import onnx

    model, w, w2 = _linear_graph(bias_first=bias_first)
    onnx.checker.check_model(model)
    t, names = c.onnx_to_hf_tensors(model)
    assert set(t) == {
        "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias",
        "encoder.layer.0.attention.self.key.weight", "encoder.layer.0.attention.self.key.bias",
    }
    # transposed back to torch's [out, in]
    np.testing.assert_array_equal(t["encoder.layer.0.attention.self.query.weight"], w.T)
    np.testing.assert_array_equal(t["encoder.layer.0.attention.self.key.weight"], w2.T)
    assert t["encoder.layer.0.attention.self.query.weight"].shape == (6, 4)
    np.testing.assert_array_equal(t["encoder.layer.0.attention.self.query.bias"], np.arange(6))
    assert names["onnx::MatMul_7"] == "encoder.layer.0.attention.self.query.weight"
    assert names["onnx::MatMul_9"] == "encoder.layer.0.attention.self.key.weight"


def test_mapping_agrees_with_onnxruntime():
    """Run the tiny graph and the mapped weights in numpy: same output."""
    import onnxruntime as ort

    model, w, _ = _linear_graph()
    t, _ = c.onnx_to_hf_tensors(model)
    x = np.random.default_rng(1).normal(size=(1, 4)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(["out"], {"x": x})[0]
    ln = (x - x.mean()) / np.sqrt(x.var() + 1e-12)
    ours = (ln @ t["encoder.layer.0.attention.self.query.weight"].T + t["encoder.layer.0.attention.self.query.bias"]) / np.sqrt(3.0)
    np.testing.assert_allclose(out, ours, rtol=1e-5, atol=1e-5)


def test_unnameable_matmul_raises():
    model, _, _ = _linear_graph(with_bias=False)
    with pytest.raises(ValueError, match="onnx::MatMul_7"):
        c.onnx_to_hf_tensors(model)


def test_graph_hyperparameters():
    model, _, _ = _linear_graph()
    hp = c.graph_hyperparameters(model)
    assert hp["layer_norm_eps"] == [float(np.float32(1e-12))]
    assert hp["head_dim"] == [3]
    assert hp["gelu_erf"] is False


def test_make_config_checks_expectations():
    t = {
        "embeddings.word_embeddings.weight": np.zeros((10, 6)),
        "embeddings.position_embeddings.weight": np.zeros((8, 6)),
        "embeddings.token_type_embeddings.weight": np.zeros((2, 6)),
        "encoder.layer.0.intermediate.dense.weight": np.zeros((12, 6)),
        "encoder.layer.1.intermediate.dense.weight": np.zeros((12, 6)),
    }
    hp = {"layer_norm_eps": [float(np.float32(1e-12))], "head_dim": [3], "gelu_erf": True}
    cfg = c.make_config(t, hp)
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (10, 6, 2, 2)
    assert (cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"]) == (12, 8, 2)
    assert cfg["layer_norm_eps"] == 1e-12 and cfg["model_type"] == "bert"
    with pytest.raises(ValueError):
        c.make_config(t, hp, expect={"num_hidden_layers": 3})
    with pytest.raises(ValueError):
        c.make_config(t, dict(hp, gelu_erf=False))


def test_expected_names():
    n = c.expected_names(3)
    assert len(n) == 5 + 3 * 16 and "pooler.dense.weight" not in n
    assert len(c.expected_names(6, pooler=True)) == 5 + 6 * 16 + 2
