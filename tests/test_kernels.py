"""The Triton kernels and the C++ CPU kernels against their torch references, the references
against a naive oracle, and the dispatch in litmus_kernels.ops.

Where the kernel tests run: without a GPU, Triton runs only through its interpreter, and
whether it interprets is fixed when triton is first imported (its own tl.sum, tl.max... are
built then). torch imports triton as a side effect (torch._dynamo), so setting
TRITON_INTERPRET inside a running pytest is unreliable. The `test_triton_*` tests therefore
run in-process only when TRITON_INTERPRET=1 was in the environment at start (or on a GPU,
compiled); in any other run they are skipped here and
`test_kernels_in_interpreter_subprocess` runs them in a child pytest started with
TRITON_INTERPRET=1, failing with the child's report if any of them fails.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.layers.attention import Attention, AttentionMetadata, PrefillChunk, get_alibi_slopes
from litmus_kernels import cpu, ops
from litmus_kernels import reference as ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = ops.triton_available()
KERNELS_RUN_HERE = HAVE_TRITON and (INTERPRETED or torch.cuda.is_available())
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"

triton_kernel = pytest.mark.skipif(
    not KERNELS_RUN_HERE,
    reason="triton is not installed" if not HAVE_TRITON else
    "no GPU and TRITON_INTERPRET=1 was not set at process start: "
    "test_kernels_in_interpreter_subprocess runs these in a child that has it",
)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Few examples per kernel: the interpreter is slow and this file is in the default test run.
kernel_settings = settings(max_examples=12, deadline=None)

HEAD_DIMS = st.sampled_from([16, 32, 64])
BLOCK_SIZES = st.sampled_from([4, 8, 16])
GQA = st.sampled_from([1, 2, 4])
WINDOWS = st.none() | st.integers(1, 8)
SOFT_CAPS = st.none() | st.floats(5.0, 50.0)


@pytest.fixture(scope="module")
def tk():
    """litmus_kernels.triton: interpreted in the child process, compiled on a GPU."""
    return ops.triton_kernels()


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32,
           rtol: float | None = None) -> None:
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol if rtol is None else rtol)


# ---------------------------------------------------------------- paged attention fixtures


def _paged_cache(context_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, seed: int,
                 dtype: torch.dtype = torch.float32, head_major: bool = False):
    """A random cache with each sequence's blocks scattered over it, and the padded block tables.

    head_major: see _kv_cache.
    """
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 2  # spare blocks: unread garbage a bug would pick up
    k_cache, v_cache = (_kv_cache((num_blocks, block_size, num_kv_heads, head_dim), seed + i, dtype, head_major)
                        for i in (0, 1))
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, width, used = [], max(needed), 0
    for n in needed:
        tables.append(order[used:used + n] + [0] * (width - n))
        used += n
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.long, device=DEVICE)


def _kv_cache(shape: tuple[int, int, int, int], seed: int, dtype: torch.dtype = torch.float32,
              head_major: bool = False) -> torch.Tensor:
    """A random cache of logical shape [blocks, block_size, heads, D]; head_major stores it as the
    model runner does ([heads, blocks, block_size, D] memory behind that view)."""
    if not head_major:
        return _randn(*shape, seed=seed, dtype=dtype)
    blocks, block_size, heads, head_dim = shape
    return _randn(heads, blocks, block_size, head_dim, seed=seed, dtype=dtype).permute(1, 2, 0, 3)


def _sequence_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, length: int):
    """The oracle's gather: token p of a sequence is at block table[p // block_size]."""
    block_size = k_cache.shape[1]
    slots = [(int(table[p // block_size]), p % block_size) for p in range(length)]
    return torch.stack([k_cache[b, o] for b, o in slots]), torch.stack([v_cache[b, o] for b, o in slots])


def _slopes(alibi: bool, num_heads: int) -> torch.Tensor | None:
    return get_alibi_slopes(num_heads).to(DEVICE) if alibi else None


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int], scale: float,
                     window: int | None, soft_cap: float | None, slopes: torch.Tensor | None) -> torch.Tensor:
    """The oracle: one query row, one head at a time, straight from the definitions."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for row, pos in enumerate(q_pos):
        keys = [j for j in range(pos + 1) if window is None or j > pos - window]
        for h in range(q.shape[1]):
            s = torch.stack([(q[row, h] @ k[j, h // group]) * scale for j in keys])
            if soft_cap is not None:
                s = soft_cap * torch.tanh(s / soft_cap)
            if slopes is not None:
                s = s + slopes[h] * torch.tensor([j - pos for j in keys], dtype=s.dtype)
            out[row, h] = torch.softmax(s, 0) @ v[keys, h // group]
    return out


@st.composite
def attention_options(draw) -> dict:
    return dict(sliding_window=draw(WINDOWS), soft_cap=draw(SOFT_CAPS), alibi=draw(st.booleans()))


@st.composite
def decode_case(draw) -> dict:
    return dict(context_lens=draw(st.lists(st.integers(1, 40), min_size=1, max_size=4)),
                num_kv_heads=draw(st.integers(1, 4)), group=draw(GQA), head_dim=draw(HEAD_DIMS),
                block_size=draw(BLOCK_SIZES), head_major=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                **draw(attention_options()))


@st.composite
def prefill_case(draw) -> dict:
    # Each chunk: (tokens already cached, new tokens); a cached prefix makes it a chunked prefill.
    chunks = draw(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40)), min_size=1, max_size=3))
    return dict(chunks=chunks, num_kv_heads=draw(st.integers(1, 4)), group=draw(GQA), head_dim=draw(HEAD_DIMS),
                block_size=draw(BLOCK_SIZES), head_major=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                **draw(attention_options()))


def _decode_inputs(c: dict, dtype: torch.dtype = torch.float32):
    num_heads = c["num_kv_heads"] * c["group"]
    k_cache, v_cache, tables = _paged_cache(c["context_lens"], c["block_size"], c["num_kv_heads"], c["head_dim"],
                                            c["seed"], dtype, c["head_major"])
    q = _randn(len(c["context_lens"]), num_heads, c["head_dim"], seed=c["seed"] + 2, dtype=dtype)
    lens = torch.tensor(c["context_lens"], dtype=torch.long, device=DEVICE)
    options = dict(sliding_window=c["sliding_window"], soft_cap=c["soft_cap"],
                   alibi_slopes=_slopes(c["alibi"], num_heads))
    return (q, k_cache, v_cache, tables, lens, c["head_dim"] ** -0.5), options


def _prefill_inputs(c: dict, dtype: torch.dtype = torch.float32):
    num_heads = c["num_kv_heads"] * c["group"]
    computed = [p for p, _ in c["chunks"]]
    lens = [n for _, n in c["chunks"]]
    k_cache, v_cache, tables = _paged_cache([p + n for p, n in c["chunks"]], c["block_size"], c["num_kv_heads"],
                                            c["head_dim"], c["seed"], dtype, c["head_major"])
    q = _randn(sum(lens), num_heads, c["head_dim"], seed=c["seed"] + 2, dtype=dtype)
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.long, device=DEVICE)
    options = dict(sliding_window=c["sliding_window"], soft_cap=c["soft_cap"],
                   alibi_slopes=_slopes(c["alibi"], num_heads))
    args = (q, k_cache, v_cache, starts, torch.tensor(computed, dtype=torch.long, device=DEVICE), tables)
    return args, max(lens), c["head_dim"] ** -0.5, options


# ---------------------------------------------------------------- references vs the oracle (torch only)


@settings(max_examples=25, deadline=None)
@given(decode_case())
def test_reference_decode_matches_naive_attention(c: dict) -> None:
    (q, k_cache, v_cache, tables, lens, scale), options = _decode_inputs(c)
    out = ref.decode_attention(q, k_cache, v_cache, tables, lens, scale, **options)
    for i, n in enumerate(c["context_lens"]):
        k, v = _sequence_kv(k_cache, v_cache, tables[i], n)
        expected = _naive_attention(q[i:i + 1], k, v, [n - 1], scale, options["sliding_window"],
                                    options["soft_cap"], options["alibi_slopes"])
        _close(out[i:i + 1], expected)


@settings(max_examples=25, deadline=None)
@given(num_tokens=st.integers(1, 40), num_kv_heads=st.integers(1, 4), block_size=BLOCK_SIZES, head_major=st.booleans(),
       seed=st.integers(0, 2**16))
def test_reference_write_kv_cache_stores_each_token_at_its_slot(num_tokens: int, num_kv_heads: int, block_size: int,
                                                              head_major: bool, seed: int) -> None:
    shape = (-(-num_tokens // block_size) + 2, block_size, num_kv_heads, 16)
    k_cache, v_cache = (_kv_cache(shape, seed + i, head_major=head_major) for i in (0, 1))
    untouched = k_cache.clone()
    k, v = (_randn(num_tokens, num_kv_heads, 16, seed=seed + i) for i in (2, 3))
    slots = torch.randperm(shape[0] * block_size, generator=torch.Generator().manual_seed(seed))[:num_tokens]
    ref.write_kv_cache(k, v, k_cache, v_cache, slots.to(DEVICE))
    for t, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, block_size)
        assert torch.equal(k_cache[block, offset], k[t]) and torch.equal(v_cache[block, offset], v[t])
        untouched[block, offset] = k_cache[block, offset]
    assert torch.equal(k_cache, untouched)  # nothing else changed


@settings(max_examples=25, deadline=None)
@given(prefill_case())
def test_reference_prefill_matches_naive_attention(c: dict) -> None:
    args, _, scale, options = _prefill_inputs(c)
    q, k_cache, v_cache, starts, computed, tables = args
    out = ref.prefill_attention(*args, scale, **options)
    for i, (cached, n) in enumerate(c["chunks"]):
        s, e = starts[i], starts[i + 1]
        k, v = _sequence_kv(k_cache, v_cache, tables[i], cached + n)
        expected = _naive_attention(q[s:e], k, v, list(range(cached, cached + n)), scale,
                                    options["sliding_window"], options["soft_cap"], options["alibi_slopes"])
        _close(out[s:e], expected)


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 40])
def test_alibi_slopes_match_transformers(num_heads: int) -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # BLOOM's bias for key j is slope * j: its slopes are the bias at key 1.
    hf = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(get_alibi_slopes(num_heads), hf)


def test_attention_rejects_wrong_alibi_shape() -> None:
    with pytest.raises(ValueError, match="alibi_slopes"):
        Attention(4, 16, 0.25, 2, alibi_slopes=torch.ones(3))


# ---------------------------------------------------------------- dispatch


def test_dispatch_uses_the_cpu_kernels_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LITMUS_KERNELS", raising=False)
    assert ops.backend(torch.zeros(1)) == "cpp"


@pytest.mark.parametrize("forced", ["torch", "triton", "cpp", " Triton "])
def test_dispatch_can_be_forced(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    monkeypatch.setenv("LITMUS_KERNELS", forced)
    assert ops.backend(torch.zeros(1)) == forced.strip().lower()


def test_dispatch_rejects_unknown_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITMUS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LITMUS_KERNELS"):
        ops.backend(torch.zeros(1))


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the test_triton_* tests run directly in this process")
def test_kernels_in_interpreter_subprocess() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("LITMUS_KERNELS", None)
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "test_triton_"]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=840)
    report = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, report


# ---------------------------------------------------------------- C++ CPU kernel vs reference


def _cpp_decode(args, options):
    cpu.load()
    q, k_cache, v_cache, tables, lens, scale = args
    return torch.ops.litmus.decode_attention(q, k_cache, v_cache, tables, lens, scale, options["sliding_window"] or 0,
                                             options["soft_cap"] or 0.0, options["alibi_slopes"])


@settings(max_examples=40, deadline=None)
@given(decode_case(), st.sampled_from([8, 20, 64, 80, 128]), st.sampled_from([torch.float32, torch.bfloat16]))
def test_cpp_decode_attention_matches_reference(c: dict, head_dim: int, dtype: torch.dtype) -> None:
    # Head dims beyond HEAD_DIMS: below, at and past the kernel's 16-lane dot product, with
    # remainders, and the two it compiles with a constant head size (64, 128).
    args, options = _decode_inputs({**c, "head_dim": head_dim}, dtype)
    # bfloat16: the kernel rounds once at the end, the reference after its product with v too.
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(_cpp_decode(args, options).float(), ref.decode_attention(*args, **options).float(),
                               atol=tol, rtol=tol)


@settings(max_examples=15, deadline=None)
@given(decode_case())
def test_cpp_decode_attention_gives_each_sequence_the_same_bits_in_any_batch(c: dict) -> None:
    (q, k_cache, v_cache, tables, lens, scale), options = _decode_inputs(c)
    together = _cpp_decode((q, k_cache, v_cache, tables, lens, scale), options)
    for i in range(len(lens)):
        alone = _cpp_decode((q[i:i + 1], k_cache, v_cache, tables[i:i + 1], lens[i:i + 1], scale), options)
        assert torch.equal(alone, together[i:i + 1])


def test_engine_decode_runs_the_cpp_kernel_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LITMUS_KERNELS", raising=False)
    c = dict(context_lens=[5, 17], num_kv_heads=2, group=2, head_dim=20, block_size=4, head_major=True, seed=3,
             sliding_window=None, soft_cap=None, alibi=False)
    args, options = _decode_inputs(c)
    assert torch.equal(ops.decode_attention(*args, **options), _cpp_decode(args, options))
    monkeypatch.setenv("LITMUS_KERNELS", "torch")
    assert torch.equal(ops.decode_attention(*args, **options), ref.decode_attention(*args, **options))


def test_cpp_decode_attention_names_bad_input() -> None:
    c = dict(context_lens=[5], num_kv_heads=2, group=2, head_dim=16, block_size=4, head_major=False, seed=0,
             sliding_window=None, soft_cap=None, alibi=False)
    (q, k_cache, v_cache, tables, lens, scale), options = _decode_inputs(c)
    with pytest.raises(RuntimeError, match="share a dtype"):
        _cpp_decode((q.double(), k_cache, v_cache, tables, lens, scale), options)
    with pytest.raises(RuntimeError, match="does not match the cache"):
        _cpp_decode((q[:, :3], k_cache, v_cache, tables, lens, scale), options)
    with pytest.raises(RuntimeError, match="one slope per query head"):
        _cpp_decode((q, k_cache, v_cache, tables, lens, scale), {**options, "alibi_slopes": torch.ones(3)})


def _cpp_prefill(args, scale, options):
    cpu.load()
    return torch.ops.litmus.prefill_attention(*args, scale, options["sliding_window"] or 0, options["soft_cap"] or 0.0,
                                              options["alibi_slopes"])


@settings(max_examples=40, deadline=None)
@given(prefill_case(), st.sampled_from([8, 20, 64, 80, 128]), st.sampled_from([torch.float32, torch.bfloat16]))
def test_cpp_prefill_attention_matches_reference(c: dict, head_dim: int, dtype: torch.dtype) -> None:
    args, _, scale, options = _prefill_inputs({**c, "head_dim": head_dim}, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(_cpp_prefill(args, scale, options).float(),
                               ref.prefill_attention(*args, scale, **options).float(), atol=tol, rtol=tol)


@settings(max_examples=15, deadline=None)
@given(prefill_case())
def test_cpp_prefill_gives_each_token_the_bits_of_its_decode(c: dict) -> None:
    # A token's attention must not depend on how its prompt was chunked or whether it was decoded:
    # the engine's chunked prefill and preemption rely on it.
    args, _, scale, options = _prefill_inputs(c)
    q, k_cache, v_cache, starts, computed, tables = args
    prefilled = _cpp_prefill(args, scale, options)
    for i, (cached, n) in enumerate(c["chunks"]):
        rows = slice(int(starts[i]), int(starts[i + 1]))
        lens = torch.arange(cached + 1, cached + n + 1, device=DEVICE)
        decoded = _cpp_decode((q[rows], k_cache, v_cache, tables[i].expand(n, -1), lens, scale), options)
        assert torch.equal(prefilled[rows], decoded)


def test_engine_prefill_runs_the_cpp_kernel_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LITMUS_KERNELS", raising=False)
    c = dict(chunks=[(3, 9), (0, 4)], num_kv_heads=2, group=3, head_dim=20, block_size=4, head_major=True, seed=5,
             sliding_window=None, soft_cap=None, alibi=False)
    args, max_len, scale, options = _prefill_inputs(c)
    assert torch.equal(ops.prefill_attention(*args, max_len, scale, **options), _cpp_prefill(args, scale, options))
    monkeypatch.setenv("LITMUS_KERNELS", "torch")
    assert torch.equal(ops.prefill_attention(*args, max_len, scale, **options),
                       ref.prefill_attention(*args, scale, **options))


def test_cpp_attention_reads_no_block_before_a_sliding_window() -> None:
    # A window's earlier blocks may have been let go: their table entries must not be read, nor
    # rejected as outside the cache.
    c = dict(context_lens=[30, 9], num_kv_heads=2, group=2, head_dim=16, block_size=4, head_major=True, seed=1,
             sliding_window=8, soft_cap=None, alibi=False)
    (q, k_cache, v_cache, tables, lens, scale), options = _decode_inputs(c)
    expected = _cpp_decode((q, k_cache, v_cache, tables, lens, scale), options)
    released = tables.clone()
    released[0, :(30 - 8) // 4] = -1
    assert torch.equal(_cpp_decode((q, k_cache, v_cache, released, lens, scale), options), expected)
    with pytest.raises(RuntimeError, match="block -1 is outside the cache"):
        _cpp_decode((q, k_cache, v_cache, released, lens, scale), {**options, "sliding_window": None})


def test_cpp_prefill_attention_names_bad_input() -> None:
    c = dict(chunks=[(2, 5), (0, 3)], num_kv_heads=1, group=2, head_dim=16, block_size=4, head_major=False, seed=0,
             sliding_window=None, soft_cap=None, alibi=False)
    args, _, scale, options = _prefill_inputs(c)
    q, k_cache, v_cache, starts, computed, tables = args
    with pytest.raises(RuntimeError, match="query_start_loc must run from 0 to the 8 query rows"):
        _cpp_prefill((q, k_cache, v_cache, starts + 1, computed, tables), scale, options)
    with pytest.raises(RuntimeError, match="one more entry than num_computed"):
        _cpp_prefill((q, k_cache, v_cache, starts[:-1], computed, tables), scale, options)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        _cpp_prefill((q, k_cache, v_cache, starts, computed + 40, tables), scale, options)
    outside = tables.clone()
    outside[0, 0] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match=f"block {k_cache.shape[0]} is outside the cache"):
        _cpp_prefill((q, k_cache, v_cache, starts, computed, outside), scale, options)


# ---------------------------------------------------------------- C++ CPU per-token kernels vs references

CPP_DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


@pytest.fixture(scope="module")
def litmus_ops():
    cpu.load()
    return torch.ops.litmus


def _rows_alone_match(op, x: torch.Tensor, *args) -> None:
    """op on the whole batch gives each row the bits it gives that row alone (args shaped like x
    are per-row too)."""
    together = op(x, *args)
    together = together if isinstance(together, tuple) else (together,)
    for i in range(len(x)):
        alone = op(x[i:i + 1], *(a[i:i + 1] if isinstance(a, torch.Tensor) and a.shape == x.shape else a
                                 for a in args))
        for a, t in zip(alone if isinstance(alone, tuple) else (alone,), together):
            assert a is None or torch.equal(a, t[i:i + 1])


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), hidden=st.integers(1, 200), residual=st.booleans(), dtype=CPP_DTYPES,
       seed=st.integers(0, 2**16))
def test_cpp_rms_norm_matches_reference(litmus_ops, rows: int, hidden: int, residual: bool, dtype: torch.dtype,
                                        seed: int) -> None:
    x = _randn(rows, hidden, seed=seed, dtype=dtype)
    weight = _randn(hidden, seed=seed + 1, dtype=dtype)
    res = _randn(rows, hidden, seed=seed + 2, dtype=dtype) if residual else None
    out, summed = litmus_ops.rms_norm(x, weight, 1e-6, res)
    expected = ref.rms_norm(x, weight, 1e-6, res)
    if residual:
        assert torch.equal(summed, expected[1])  # one rounding of x + residual on both sides
        expected = expected[0]
    # float32: the mean of squares is summed in another order (an ulp or two). bfloat16: each side
    # sums in float32 and rounds once, and that order can put a result near a rounding boundary
    # one bfloat16 step (up to 2^-7 relative) apart.
    _close(out, expected, dtype, rtol=2 ** -7 if dtype == torch.bfloat16 else None)
    _rows_alone_match(litmus_ops.rms_norm, x, weight, 1e-6, res)


@settings(max_examples=30, deadline=None)
@given(num_tokens=st.integers(1, 20), num_heads=st.integers(1, 4), num_kv_heads=st.integers(1, 4),
       head_dim=st.sampled_from([8, 20, 64]), rotary_fraction=st.sampled_from([1, 2, 4]), neox=st.booleans(),
       dtype=CPP_DTYPES, seed=st.integers(0, 2**16))
def test_cpp_rotary_embedding_matches_reference(litmus_ops, num_tokens: int, num_heads: int, num_kv_heads: int,
                                                head_dim: int, rotary_fraction: int, neox: bool, dtype: torch.dtype,
                                                seed: int) -> None:
    rotary_dim = head_dim // rotary_fraction // 2 * 2
    max_position = 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_position).float(), inv_freq)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(num_tokens, q_size + 2 * kv_size, seed=seed, dtype=dtype)  # q, k: slices of a fused output
    q, k = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size]
    positions = torch.randint(0, max_position, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    args = (freqs.cos(), freqs.sin(), head_dim, neox)
    got = litmus_ops.rotary_embedding(positions, q, k, *args)
    expected = ref.rotary_embedding(positions, q, k, *args)
    for g, e in zip(got, expected):
        if dtype == torch.float32:  # the same products and sums, none fused: the same bits
            assert torch.equal(g, e)
        else:  # the reference rounds each product to bfloat16, the kernel only the result
            torch.testing.assert_close(g.float(), e.float(), atol=0.05, rtol=1.6e-2)
    for i in range(num_tokens):
        alone = litmus_ops.rotary_embedding(positions[i:i + 1], q[i:i + 1], k[i:i + 1], *args)
        assert torch.equal(alone[0], got[0][i:i + 1]) and torch.equal(alone[1], got[1][i:i + 1])


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), d=st.integers(1, 300), act=st.sampled_from(["silu", "gelu", "gelu_tanh"]),
       dtype=CPP_DTYPES, seed=st.integers(0, 2**16))
def test_cpp_gated_activations_match_reference(litmus_ops, rows: int, d: int, act: str, dtype: torch.dtype,
                                               seed: int) -> None:
    x = 3 * _randn(rows, 2 * d, seed=seed, dtype=dtype)
    x[0, 0] = -200.0  # exp's under- and overflow ends: silu(-200) is -0, gelu(-200) is 0
    x[-1, min(1, d - 1)] = 200.0
    if act == "silu":
        op, args = litmus_ops.silu_and_mul, ()
        expected = ref.silu_and_mul(x)
    else:
        approximate = "tanh" if act == "gelu_tanh" else "none"
        op, args = litmus_ops.gelu_and_mul, (approximate,)
        expected = ref.gelu_and_mul(x, approximate)
    _close(op(x, *args), expected, dtype)
    _rows_alone_match(op, x, *args)


@settings(max_examples=20, deadline=None)
@given(num_tokens=st.integers(1, 40), num_kv_heads=st.integers(1, 4), head_dim=st.sampled_from([8, 20, 64]),
       block_size=BLOCK_SIZES, head_major=st.booleans(), dtype=CPP_DTYPES, seed=st.integers(0, 2**16))
def test_cpp_write_kv_cache_matches_reference(litmus_ops, num_tokens: int, num_kv_heads: int, head_dim: int,
                                              block_size: int, head_major: bool, dtype: torch.dtype,
                                              seed: int) -> None:
    num_blocks = -(-num_tokens // block_size) + 3
    kv = _randn(num_tokens, 3 * num_kv_heads * head_dim, seed=seed, dtype=dtype)
    k = kv[:, :num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = kv[:, num_kv_heads * head_dim:2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(seed))[:num_tokens]
    caches = [_kv_cache((num_blocks, block_size, num_kv_heads, head_dim), seed + i, head_major=head_major).to(dtype)
              for i in (1, 2)]
    expected = [c.clone() for c in caches]
    litmus_ops.write_kv_cache(k, v, *caches, slots)
    ref.write_kv_cache(k, v, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 300), pattern=st.sampled_from(["random", "ties", "nan", "inf"]),
       seed=st.integers(0, 2**16))
def test_cpp_argmax_matches_torch(litmus_ops, rows: int, vocab: int, pattern: str, seed: int) -> None:
    """torch.argmax(dim=-1)'s answer: the first index of the maximum, a NaN being the maximum."""
    x = _randn(rows, vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    if pattern == "ties":
        x = x.round()
    elif pattern != "random":
        hits = torch.randint(0, rows * vocab, (3,), generator=gen)
        x.view(-1)[hits] = float("nan") if pattern == "nan" else float("inf")
        if pattern == "inf":
            x.view(-1)[torch.randint(0, rows * vocab, (rows,), generator=gen)] = float("-inf")
    assert torch.equal(litmus_ops.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(litmus_ops.argmax_rows(x[:, ::2]), x[:, ::2].argmax(dim=-1))


def test_cpp_per_token_kernels_name_bad_input(litmus_ops) -> None:
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="weight has shape"):
        litmus_ops.rms_norm(x, torch.ones(7), 1e-6, None)
    with pytest.raises(RuntimeError, match="residual must match"):
        litmus_ops.rms_norm(x, torch.ones(8), 1e-6, torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="position 9 is outside"):
        litmus_ops.rotary_embedding(torch.tensor([0, 9, 1]), x, x, torch.ones(9, 2), torch.ones(9, 2), 4, True)
    with pytest.raises(RuntimeError, match=r"not \[gate \| up\]"):
        litmus_ops.silu_and_mul(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="approximate must be"):
        litmus_ops.gelu_and_mul(x, "fast")
    k_cache = torch.zeros(2, 4, 1, 8)
    before = k_cache.clone()
    with pytest.raises(RuntimeError, match="slot 8 is outside"):  # checked before anything is written
        litmus_ops.write_kv_cache(x.view(3, 1, 8), x.view(3, 1, 8), k_cache, k_cache.clone(), torch.tensor([0, 8, 1]))
    assert torch.equal(k_cache, before)
    for logits in (torch.randn(3, 0), torch.randn(8), torch.ones(2, 8, dtype=torch.int64)):
        with pytest.raises(RuntimeError, match=r"argmax_rows: expected float32 CPU logits \[rows, vocab\]"):
            litmus_ops.argmax_rows(logits)


def _ran_op(name: str, fn) -> bool:
    """Whether calling fn ran the operator `name` (as torch's profiler records it)."""
    with torch.profiler.profile() as prof:
        fn()
    return any(event.name == name for event in prof.events())


def test_cpp_ops_have_schemas_and_shape_functions_torch_compile_can_trust(litmus_ops) -> None:
    # torch.library.opcheck runs each op for real and through its fake (kernels/cpu/fake.py): the
    # shapes, dtypes and strides must agree and the schema must declare what the op mutates.
    x, cos, sin = torch.randn(5, 40), torch.randn(8, 4), torch.randn(8, 4)
    weight = torch.randn(70, 40)
    packed, gated = ops.pack_linear_weight(weight), ops.pack_gated_linear_weight(weight)
    k_cache = torch.randn(2, 6, 4, 16).permute(1, 2, 0, 3)  # [blocks, block_size, kv_heads, head_dim]
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(3, 4, 16)
    tables = torch.tensor([[0, 2], [1, 3], [0, 4]])
    cases = [
        (litmus_ops.linear, (x, packed, torch.randn(70), 70)),
        (litmus_ops.linear, (x, packed, None, 70)),
        (litmus_ops.gated_linear, (x, gated, None, 35, "silu")),
        (litmus_ops.pack_linear_weight, (weight,)),
        (litmus_ops.pack_gated_linear_weight, (weight,)),
        (litmus_ops.rms_norm, (x, torch.randn(40), 1e-6, None)),
        (litmus_ops.rms_norm, (x, torch.randn(40), 1e-6, torch.randn(5, 40))),
        (litmus_ops.rotary_embedding, (torch.arange(5), torch.randn(5, 32), torch.randn(5, 16), cos, sin, 16, True)),
        (litmus_ops.silu_and_mul, (x,)),
        (litmus_ops.gelu_and_mul, (x, "tanh")),
        (litmus_ops.argmax_rows, (x,)),
        (litmus_ops.write_kv_cache, (torch.randn(3, 2, 16), torch.randn(3, 2, 16), k_cache.clone(), v_cache.clone(),
                                     torch.tensor([0, 7, 9]))),
        (litmus_ops.decode_attention, (q, k_cache, v_cache, tables, torch.tensor([3, 6, 2]), 0.25, 0, 0.0, None)),
        (litmus_ops.prefill_attention, (q, k_cache, v_cache, torch.tensor([0, 2, 3]), torch.tensor([0, 4]), tables[:2],
                                        0.25, 0, 0.0, None)),
    ]
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("litmus::")}
    assert {op._qualified_op_name for op, _ in cases} == registered  # every op is checked
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_engine_ops_run_the_cpp_kernels_by_default(monkeypatch: pytest.MonkeyPatch, litmus_ops) -> None:
    x, weight, residual = torch.randn(3, 40), torch.randn(40), torch.randn(3, 40)
    cos, sin = torch.randn(10, 4), torch.randn(10, 4)
    positions = torch.tensor([1, 5, 9])
    monkeypatch.delenv("LITMUS_KERNELS", raising=False)
    assert all(torch.equal(a, b) for a, b in zip(ops.rms_norm(x, weight, 1e-6, residual),
                                                 litmus_ops.rms_norm(x, weight, 1e-6, residual)))
    assert torch.equal(ops.silu_and_mul(x), litmus_ops.silu_and_mul(x))
    assert torch.equal(ops.gelu_and_mul(x, "tanh"), litmus_ops.gelu_and_mul(x, "tanh"))
    assert all(torch.equal(a, b) for a, b in zip(ops.rotary_embedding(positions, x, x, cos, sin, 8, True),
                                                 litmus_ops.rotary_embedding(positions, x, x, cos, sin, 8, True)))
    monkeypatch.setenv("LITMUS_KERNELS", "torch")
    assert all(torch.equal(a, b) for a, b in zip(ops.rms_norm(x, weight, 1e-6, residual),
                                                 ref.rms_norm(x, weight, 1e-6, residual)))
    assert torch.equal(ops.silu_and_mul(x), ref.silu_and_mul(x))


def test_greedy_argmax_runs_the_cpp_kernel_by_default(monkeypatch: pytest.MonkeyPatch, litmus_ops) -> None:
    logits = torch.randn(4, 1000)
    monkeypatch.delenv("LITMUS_KERNELS", raising=False)
    assert _ran_op("litmus::argmax_rows", lambda: ops.argmax(logits))
    assert torch.equal(ops.argmax(logits), logits.argmax(dim=-1))
    assert not _ran_op("litmus::argmax_rows", lambda: ops.argmax(logits.double()))  # float32 only
    monkeypatch.setenv("LITMUS_KERNELS", "torch")
    assert not _ran_op("litmus::argmax_rows", lambda: ops.argmax(logits))


# ---------------------------------------------------------------- Triton kernels vs references


@triton_kernel
@kernel_settings
@given(num_tokens=st.integers(1, 40), num_kv_heads=st.integers(1, 4), head_dim=HEAD_DIMS, block_size=BLOCK_SIZES,
       head_major=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_write_kv_cache(tk, num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int,
                               head_major: bool, seed: int) -> None:
    num_blocks = -(-num_tokens // block_size) + 3
    # k and v as the engine has them: column slices of one fused projection output.
    kv = _randn(num_tokens, 3 * num_kv_heads * head_dim, seed=seed)
    k = kv[:, :num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = kv[:, num_kv_heads * head_dim:2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(seed))[:num_tokens]
    slots = slots.to(DEVICE)
    caches = [_kv_cache((num_blocks, block_size, num_kv_heads, head_dim), seed + i, head_major=head_major)
              for i in (1, 2)]
    expected = [c.clone() for c in caches]
    tk.write_kv_cache(k, v, *caches, slots)
    ref.write_kv_cache(k, v, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@triton_kernel
@kernel_settings
@given(decode_case(), st.sampled_from([torch.float32, torch.float16]))
def test_triton_decode_attention(tk, c: dict, dtype: torch.dtype) -> None:
    args, options = _decode_inputs(c, dtype)
    _close(tk.decode_attention(*args, **options), ref.decode_attention(*args, **options), dtype)


@triton_kernel
@kernel_settings
@given(prefill_case(), st.sampled_from([torch.float32, torch.float16]))
def test_triton_prefill_attention(tk, c: dict, dtype: torch.dtype) -> None:
    args, max_query_len, scale, options = _prefill_inputs(c, dtype)
    expected = ref.prefill_attention(*args, scale, **options)
    _close(tk.prefill_attention(*args, max_query_len, scale, **options), expected, dtype)


@triton_kernel
@kernel_settings
@given(rows=st.integers(1, 8), hidden=st.integers(1, 200), residual=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_triton_rms_norm(tk, rows: int, hidden: int, residual: bool, dtype: torch.dtype, seed: int) -> None:
    x = _randn(rows, hidden, seed=seed, dtype=dtype)
    weight = _randn(hidden, seed=seed + 1, dtype=dtype)
    res = _randn(rows, hidden, seed=seed + 2, dtype=dtype) if residual else None
    got, expected = tk.rms_norm(x, weight, 1e-6, res), ref.rms_norm(x, weight, 1e-6, res)
    if residual:
        _close(got[0], expected[0], dtype)
        assert torch.equal(got[1], expected[1])  # the residual sum is one rounding on both sides
    else:
        _close(got, expected, dtype)


@triton_kernel
@kernel_settings
@given(num_tokens=st.integers(1, 40), num_heads=st.integers(1, 4), num_kv_heads=st.integers(1, 4),
       head_dim=HEAD_DIMS, rotary_fraction=st.sampled_from([1, 2, 4]), neox=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triton_rotary_embedding(tk, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                                 rotary_fraction: int, neox: bool, seed: int) -> None:
    rotary_dim = head_dim // rotary_fraction  # partial rotary: the other features pass through
    max_position = 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_position).float(), inv_freq)
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    # q and k as the engine has them: column slices of one fused qkv output.
    qkv = _randn(num_tokens, q_size + 2 * kv_size, seed=seed)
    q, k = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size]
    positions = torch.randint(0, max_position, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    positions = positions.to(DEVICE)
    got = tk.rotary_embedding(positions, q, k, cos, sin, head_dim, neox)
    expected = ref.rotary_embedding(positions, q, k, cos, sin, head_dim, neox)
    for g, e in zip(got, expected):
        _close(g, e)


@triton_kernel
@kernel_settings
@given(rows=st.integers(1, 8), d=st.integers(1, 300), act=st.sampled_from(["silu", "gelu", "gelu_tanh"]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_triton_gated_activations(tk, rows: int, d: int, act: str, dtype: torch.dtype, seed: int) -> None:
    x = 3 * _randn(rows, 2 * d, seed=seed, dtype=dtype)
    if act == "silu":
        got, expected = tk.silu_and_mul(x), ref.silu_and_mul(x)
    else:
        approximate = "tanh" if act == "gelu_tanh" else "none"
        got, expected = tk.gelu_and_mul(x, approximate), ref.gelu_and_mul(x, approximate)
    _close(got, expected, dtype)


@st.composite
def sampling_rows(draw, ties: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**16))
    logits = _randn(rows, vocab, seed=seed) * 3
    if ties:  # few distinct values, so the k-th largest is usually tied; a few banned tokens
        logits = logits.round()
        logits[torch.rand(rows, vocab, generator=torch.Generator().manual_seed(seed)).to(DEVICE) < 0.1] = -math.inf
    top_k = torch.tensor(draw(st.lists(st.integers(0, vocab + 2), min_size=rows, max_size=rows)), device=DEVICE)
    p = st.just(1.0) if ties else st.just(1.0) | st.floats(0.01, 0.999)
    top_p = torch.tensor(draw(st.lists(p, min_size=rows, max_size=rows)), dtype=torch.float32, device=DEVICE)
    return logits, top_k, top_p


@triton_kernel
@kernel_settings
@given(sampling_rows(ties=True))
def test_triton_top_k_keeps_ties_exactly(tk, case) -> None:
    logits, top_k, top_p = case
    assert torch.equal(tk.top_k_top_p(logits, top_k, top_p), ref.top_k_top_p(logits, top_k, top_p))


@triton_kernel
@kernel_settings
@given(sampling_rows(ties=False))
def test_triton_top_k_top_p(tk, case) -> None:
    logits, top_k, top_p = case
    got, expected = tk.top_k_top_p(logits, top_k, top_p), ref.top_k_top_p(logits, top_k, top_p)
    kept_got, kept_expected = got > -math.inf, expected > -math.inf
    assert torch.equal(got[kept_got], logits[kept_got])
    # The kernel sums probabilities in another order than the reference's sorted cumsum, so a
    # token whose mass-before lies within float error of p may go either way; nothing else may.
    after_k = ref.top_k_top_p(logits, top_k, torch.ones_like(top_p))
    probs = after_k.softmax(dim=1)
    mass_before = torch.stack([(probs[r] * (after_k[r] > after_k[r][:, None])).sum(1) for r in range(len(probs))])
    ambiguous = (mass_before - top_p[:, None]).abs() < 1e-5
    assert torch.equal(kept_got | ambiguous, kept_expected | ambiguous)


@triton_kernel
# monkeypatch is function-scoped, but each example sets the variable it reads afresh.
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 20), st.just(1) | st.integers(1, 12)), min_size=1, max_size=4),
       attention_options(), BLOCK_SIZES, st.booleans(), st.integers(0, 2**16))
def test_triton_attention_layer_matches_torch(tk, monkeypatch: pytest.MonkeyPatch, seqs, options: dict,
                                              block_size: int, head_major: bool, seed: int) -> None:
    """The engine's Attention layer over a batch mixing decodes and prefill chunks in any order:
    the same output and cache with LITMUS_KERNELS=triton as with torch."""
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    layer = Attention(num_heads, head_dim, head_dim ** -0.5, num_kv_heads, sliding_window=options["sliding_window"],
                      logits_soft_cap=options["soft_cap"], alibi_slopes=_slopes(options["alibi"], num_heads))
    # A sequence with a 1-token step after a cached prefix is a decode, any other a prefill chunk.
    meta = _metadata(seqs, block_size)
    num_tokens = sum(n for _, n in seqs)
    q = _randn(num_tokens, num_heads * head_dim, seed=seed)
    k, v = (_randn(num_tokens, num_kv_heads * head_dim, seed=seed + i) for i in (1, 2))
    cache_shape = (sum(-(-(c + n) // block_size) for c, n in seqs), block_size, num_kv_heads, head_dim)
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LITMUS_KERNELS", backend)
        layer.k_cache, layer.v_cache = (_kv_cache(cache_shape, seed + i, head_major=head_major) for i in (3, 4))
        results.append((layer(q, k, v, meta), layer.k_cache, layer.v_cache))
    for got, expected in zip(results[1], results[0]):
        _close(got, expected)


def _metadata(seqs: list[tuple[int, int]], block_size: int) -> AttentionMetadata:
    slots, prefills, decode_idx, decode_tables, decode_lens = [], [], [], [], []
    start, next_block = 0, 0
    for cached, n in seqs:
        end = cached + n
        table = list(range(next_block, next_block + -(-end // block_size)))
        next_block += len(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, end)]
        if n == 1 and cached > 0:
            decode_idx.append(start)
            decode_tables.append(table)
            decode_lens.append(end)
        else:
            prefills.append(PrefillChunk(start, start + n, cached, torch.tensor(table, device=DEVICE)))
        start += n
    width = max((len(t) for t in decode_tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in decode_tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEVICE), prefills=prefills,
        decode_token_idx=torch.tensor(decode_idx, dtype=torch.long, device=DEVICE),
        decode_block_tables=torch.tensor(padded, dtype=torch.long, device=DEVICE).view(len(padded), width),
        decode_context_lens=torch.tensor(decode_lens, dtype=torch.long, device=DEVICE), block_size=block_size,
    )
