"""engine/layers/linear.py: nn.Linear with packed weights (kernels/cpu's GEMM for float32, oneDNN for
bfloat16 and without the C++ kernels), against nn.Linear itself."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.layers.linear import PackedLinear, pack_linears
from harness.runners import torch_threads
from litmus_kernels import cpu, ops

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN"),
]


def _pair(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(in_features * 1000 + out_features)
    plain = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    packed = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    packed.load_state_dict(plain.state_dict())
    assert pack_linears(packed) == 1 and isinstance(packed, PackedLinear)
    return plain, packed


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,out_features", [((1, 40), 24), ((7, 40), 24), ((2, 3, 40), 24), ((30, 40), 70),
                                                ((300, 40), 33)])
def test_packed_linear_matches_nn_linear(monkeypatch: pytest.MonkeyPatch, kernels: str, dtype: torch.dtype,
                                         bias: bool, shape: tuple[int, ...], out_features: int) -> None:
    # Rows past one 6-row tile and one 256-row chunk; features past one 64-wide panel, and short of one.
    monkeypatch.setenv("LITMUS_KERNELS", kernels)
    plain, packed = _pair(40, out_features, bias, dtype)
    x = torch.randn(shape).to(dtype)
    with torch.inference_mode():
        got, expected = packed(x), plain(x)
    assert got.shape == expected.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


def test_float32_rows_get_the_same_bits_alone_and_in_any_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LITMUS_KERNELS", raising=False)
    _, packed = _pair(96, 80, True, torch.float32)
    x = torch.randn(40, 96)
    with torch.inference_mode():
        together = packed(x)
        for rows in (slice(0, 1), slice(3, 4), slice(5, 17), slice(13, 40)):
            assert torch.equal(packed(x[rows]), together[rows])


@pytest.mark.parametrize("out_features", [20, 150, 576, 600])
def test_float32_gemm_gives_the_same_bits_on_one_thread_and_two(out_features: int) -> None:
    # Two threads split the panels into halves of 32 features: a thread's share starts or ends
    # mid-panel (150, and 576's 9 panels), the last panel's second half lies past the features
    # (20, 150, 600) and its first half is partial (150, 600).
    cpu.load()
    torch.manual_seed(out_features)
    weight, bias, x = torch.randn(out_features, 96), torch.randn(out_features), torch.randn(64, 96)
    packed = ops.pack_linear_weight(weight)
    with torch_threads(1):
        one = ops.linear(x, packed, bias, out_features)
    with torch_threads(2):
        two = ops.linear(x, packed, bias, out_features)
    assert torch.equal(one, two)
    torch.testing.assert_close(two, torch.addmm(bias, x, weight.T), atol=1e-4, rtol=1e-5)


def test_gemm_names_bad_input() -> None:
    cpu.load()
    weight = torch.randn(24, 40)
    packed = ops.pack_linear_weight(weight)
    with pytest.raises(RuntimeError, match="does not match input"):
        ops.linear(torch.randn(3, 41), packed, None, 24)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        ops.linear(torch.randn(3, 40), packed, torch.zeros(23), 24)
    with pytest.raises(RuntimeError, match="expected a float32 CPU weight"):
        ops.pack_linear_weight(weight.double())


def test_non_contiguous_input() -> None:
    plain, packed = _pair(40, 24, True, torch.float32)
    x = torch.randn(5, 80)[:, ::2]
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)


def test_an_edited_or_replaced_weight_takes_effect_and_restoring_it_restores_the_output() -> None:
    plain, packed = _pair(16, 8, False, torch.float32)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        before = packed(x)
    with torch.no_grad():
        packed.weight.mul_(2.0)  # in place, as a planted fault edits
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), 2 * before)
    original = packed.weight
    packed.weight = nn.Parameter(torch.zeros_like(original))  # replaced, as an untied head is
    with torch.inference_mode():
        assert torch.equal(packed(x), torch.zeros(3, 8))
    packed.weight = original
    with torch.no_grad():
        original.div_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), before)


def test_autograd_still_flows() -> None:
    plain, packed = _pair(16, 8, True, torch.float32)
    x = torch.randn(3, 16, requires_grad=True)
    packed(x).sum().backward()
    assert packed.weight.grad is not None and x.grad is not None
    expected = torch.autograd.grad(plain(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_pack_linears_converts_float32_and_bfloat16_linears_only() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4).double(),
                          nn.Embedding(5, 4))
    assert pack_linears(model) == 2
    assert [type(m) for m in model] == [PackedLinear, PackedLinear, nn.Linear, nn.Embedding]
    assert pack_linears(model) == 0  # already converted


def test_tied_weight_stays_tied() -> None:
    embedding = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    pack_linears(model)
    assert model["head"].weight is model["embedding"].weight
    with torch.inference_mode():
        hidden = embedding(torch.tensor([3]))
        torch.testing.assert_close(model["head"](hidden), hidden @ embedding.weight.T, atol=1e-5, rtol=1e-5)


_GATED_OPS = {
    "silu": ops.silu_and_mul,
    "gelu": lambda y: ops.gelu_and_mul(y, approximate="none"),
    "gelu_tanh": lambda y: ops.gelu_and_mul(y, approximate="tanh"),
}


@pytest.mark.parametrize("act", sorted(_GATED_OPS))
@pytest.mark.parametrize("rows,d,bias", [(1, 16, False), (7, 40, True), (64, 96, False), (300, 70, True)])
def test_gated_gemm_gives_the_bits_of_the_gemm_then_the_activation(act: str, rows: int, d: int, bias: bool) -> None:
    # d: a whole gated panel (32 pairs), three (96), and partial last panels (16, 40, 70); rows past
    # one tile and one 256-row chunk; one thread and two.
    cpu.load()
    torch.manual_seed(rows * 100 + d)
    weight, x = torch.randn(2 * d, 48), torch.randn(rows, 48)
    b = torch.randn(2 * d) if bias else None
    expected = _GATED_OPS[act](ops.linear(x, ops.pack_linear_weight(weight), b, 2 * d))
    for threads in (1, 2):
        with torch_threads(threads):
            got = ops.gated_linear(x, ops.pack_gated_linear_weight(weight), b, d, act)
        assert torch.equal(got, expected), threads


def test_gated_gemm_names_bad_input() -> None:
    cpu.load()
    packed = ops.pack_gated_linear_weight(torch.randn(80, 40))
    with pytest.raises(RuntimeError, match="are not \\[gate \\| up\\]"):
        ops.pack_gated_linear_weight(torch.randn(81, 40))
    with pytest.raises(RuntimeError, match="act must be 'silu', 'gelu' or 'gelu_tanh', got 'relu'"):
        ops.gated_linear(torch.randn(3, 40), packed, None, 40, "relu")
    with pytest.raises(RuntimeError, match="bias must be float32 \\[80\\]"):
        ops.gated_linear(torch.randn(3, 40), packed, torch.zeros(40), 40, "silu")
    with pytest.raises(RuntimeError, match="does not match input"):
        ops.gated_linear(torch.randn(3, 40), packed, None, 80, "silu")


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "relu"])
def test_gated_activation_projects_as_it_applies(monkeypatch: pytest.MonkeyPatch, act: str) -> None:
    # With a kernel for the activation the projection is marked and packed for the gated GEMM, and
    # project() equals the activation of the projection; without one (relu) nothing changes.
    monkeypatch.delenv("LITMUS_KERNELS", raising=False)
    from engine.layers.activation import GatedActivation

    projection = nn.Linear(24, 2 * 40)
    gated = GatedActivation(act, projection)
    assert getattr(projection, "gated_projection", False) == (act != "relu")
    pack_linears(projection)
    x = torch.randn(2, 5, 24)
    with torch.inference_mode():
        fused = gated.project(projection, x)
        layout = projection.weight._litmus_pack[1]  # what project() multiplied by
        separate = gated(projection(x))
    assert layout == ("gemm" if act == "relu" else "gated")
    assert fused.shape == (2, 5, 40) and torch.equal(fused, separate)
