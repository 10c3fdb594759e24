"""int4 blocks (scale * q + low, export/blocks.py): exact on Q4_1-grid weights, what onnxruntime computes with them,
and the 8da4w program's int4 tensors (export/quantize.py)."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.blocks import q4_1_blocks
from export.onnx import block_sum_constants, block_sum_nodes, int4_blocks
from export.quantize import BlockOffsetLinear, block_sums, quantize_program

from ...conftest import make_model


def _q4_1_weight(k=64, n=24, block=32, seed=0):
    """A (K, N) weight built like a dequantised GGUF Q4_1 tensor: per block d * q + m, q in 0..15 (0 and 15 used)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.005, 0.05, (n, k // block, 1)).astype(np.float32)
    m = rng.uniform(-0.4, 0.0, (n, k // block, 1)).astype(np.float32)
    q = rng.integers(0, 16, (n, k // block, block))
    q[..., 3], q[..., 7] = 0, 15
    return (q * d + m).astype(np.float32).reshape(n, k).T.copy()


def _dequantize(packed, scales, lows, k, n, block):
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k // block, block).astype(np.float32)
    w = q * scales.reshape(n, -1, 1) + lows.T[..., None]
    return w.reshape(n, k).T


def test_q4_1_grid_weights_are_represented_exactly():
    w = _q4_1_weight()
    packed, scales, zp = int4_blocks(w, 32)
    assert packed.shape == (24, 2, 16) and packed.dtype == np.uint8 and scales.shape == (48,) and zp.shape == (2, 24)
    assert np.abs(_dequantize(packed, scales, zp, 64, 24, 32) - w).max() < 1e-6


def test_other_weights_round_to_within_half_a_step_and_constant_blocks_survive():
    w = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    w[:32, 0] = 0.25  # a constant block
    packed, scales, zp = int4_blocks(w, 32)
    err = np.abs(_dequantize(packed, scales, zp, 64, 8, 32) - w)
    step = np.repeat(scales.reshape(8, 2), 32, axis=1).T  # (64, 8) scale of each weight's block
    assert (err <= step / 2 + 1e-6).all()
    assert np.abs(_dequantize(packed, scales, zp, 64, 8, 32)[:32, 0] - 0.25).max() < 1e-6


@pytest.mark.parametrize("shape", [(2, 3, 64), (5, 64)])
def test_onnxruntime_computes_the_exact_product_from_int4_and_block_offsets(shape):
    """The int4 product plus the block sums (reshape, ReduceSum, reshape back to the input's leading shape) times
    the block offsets is the Q4_1 weight's product, for inputs of rank 3 and 2."""
    w = _q4_1_weight(k=64, n=16)
    packed, scales, lows = int4_blocks(w, 32)
    zeros = np.zeros((16, 1), dtype=np.uint8)
    summing, sums = block_sum_nodes(helper, "A", 32, 64, "p")
    nodes = [helper.make_node("MatMulNBits", ["A", "B", "s", "z"], ["Y0"], domain="com.microsoft", K=64, N=16, bits=4,
                              block_size=32),
             *summing, helper.make_node("MatMul", [sums, "L"], ["Y1"]), helper.make_node("Add", ["Y0", "Y1"], ["Y"])]
    inits = [numpy_helper.from_array(a, name) for a, name in ((packed, "B"), (scales, "s"), (zeros, "z"), (lows, "L"))]
    inits += block_sum_constants(numpy_helper, 32, {64})
    lead = [f"d{i}" for i in range(len(shape) - 1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [*lead, 64])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*lead, 16])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    out = session.run(None, {"A": a})[0]
    assert out.shape == (*shape[:-1], 16) and np.abs(out - a @ w).max() < 1e-4


def _q4_1_grid(model: torch.nn.Module) -> None:
    """Put every base projection of ``model`` on a Q4_1 grid (as SmolLM2's GGUF weights are)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(".base"):
                k, n = module.in_features, module.out_features
                module.weight.copy_(torch.from_numpy(_q4_1_weight(k=k, n=n, seed=len(name)).T.copy()) * 2)


def test_symmetric_form_of_the_blocks_is_the_weight():
    w = torch.from_numpy(_q4_1_weight().T.copy())  # (N, K)
    blocks = q4_1_blocks(w, 32)
    q, offsets = blocks.symmetric()
    assert q.dtype == torch.int8 and int(q.min()) == -8 and int(q.max()) == 7
    rebuilt = (q.float().view(24, 2, 32) * blocks.scales[..., None] + offsets[..., None]).reshape(24, 64)
    torch.testing.assert_close(rebuilt, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(blocks.dequantize(), w, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="divisible by 32"):
        q4_1_blocks(w[:, :40], 32)


def test_8da4w_keeps_q4_1_weights_exactly_where_symmetric_int4_rounds_them_again():
    """The 8da4w program's int4 tensors plus block offsets are the Q4_1 weights; its output is closer to fp32 than
    torchao's plain symmetric int4 (the form before), whose only other difference is the weight grid."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    model = make_model("tiny-llama", n_specialists=1).eval()
    _q4_1_grid(model)
    quantised, counts = quantize_program(model, "8da4w")
    wrapped = {n: m for n, m in quantised.named_modules() if isinstance(m, BlockOffsetLinear)}
    bases = {n: m for n, m in model.named_modules() if n.endswith(".base")}
    assert set(wrapped) == set(bases) and counts["linears"] == len(bases) + 1
    for name, module in wrapped.items():
        weight = module.linear.weight  # int4 in -8..7, zero point 0
        n, k = weight.qdata.shape
        assert int(weight.qdata.min()) >= -8 and int(weight.qdata.max()) <= 7 and not weight.zero_point.any()
        deq = (weight.qdata.float().view(n, k // 32, 32) * weight.scale[..., None]).reshape(n, k)
        torch.testing.assert_close(deq + module.offsets.repeat_interleave(32, dim=1), bases[name].weight,
                                   atol=1e-6, rtol=0)
    assert quantised.lm_head.weight.target_dtype == torch.int8  # the output projection stays 8-bit

    plain = copy.deepcopy(model)
    quantize_(plain, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
              filter_fn=lambda m, fqn: fqn.endswith(".base"))
    x = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        ours, before = (m(input_ids=x).logits for m in (quantised, plain))
    assert (ours - ref).abs().mean() < 0.5 * (before - ref).abs().mean()


@pytest.mark.parametrize("shape", [(1, 5, 96), (2, 3, 96), (7, 96)])
def test_block_sums_sum_each_block_of_inputs(shape):
    x = torch.randn(shape)
    ones = torch.ones(1, 32)
    torch.testing.assert_close(block_sums(x, ones), x.unflatten(-1, (3, 32)).sum(-1))
