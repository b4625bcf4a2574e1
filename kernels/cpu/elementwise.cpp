// The per-token ops of a decoder layer on the CPU: RMSNorm (with the residual add fused),
// rotary embedding, the gated activations, and writing K/V into the paged cache. Their torch
// references (kernels/reference.py) are each a chain of small torch calls, and at batch 1 a layer
// is dozens of such calls on a few hundred numbers: their dispatch, not their arithmetic, was a
// third of a decode step. Each kernel here is one pass over its rows, a row's result depending on
// that row alone (the same bits in any batch).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace {

using litmus::kLanes;
using litmus::load_vec;
using litmus::store_vec;
using litmus::Vec;

// Rows per thread: below ~16k numbers a second thread costs more than it saves.
int64_t grain(int64_t row_size) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_size, 1)); }

void check_cpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "litmus::", op, " runs on CPU tensors");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "litmus::", op, ": expected a non-empty last dim, got shape ",
              x.sizes());
}

// ------------------------------------------------------------------ RMSNorm

// out = weight * to_dtype(h * rsqrt(mean(h^2) + eps)), h = float(x), as the reference computes it;
// with a residual, x is first replaced by to_dtype(x + residual), which is also returned.
template <typename scalar_t>
void rms_norm_rows(const scalar_t* x, const scalar_t* residual, const scalar_t* weight, float eps, int64_t rows,
                   int64_t hidden, scalar_t* out, scalar_t* summed) {
  const int64_t full = hidden / kLanes * kLanes;
  at::parallel_for(0, rows, grain(hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = r * hidden;
      Vec squares = {};
      for (int64_t i = 0; i < full; i += kLanes) {
        Vec v = load_vec(x + row + i);
        if (residual) {
          v = litmus::round_to<scalar_t>(v + load_vec(residual + row + i));
          store_vec(summed + row + i, v);
        }
        store_vec(h.data() + i, v);
        squares += v * v;
      }
      float rest = 0.f;
      for (int64_t i = full; i < hidden; ++i) {
        float v = static_cast<float>(x[row + i]);
        if (residual) {
          summed[row + i] = static_cast<scalar_t>(v + static_cast<float>(residual[row + i]));
          v = static_cast<float>(summed[row + i]);
        }
        h[i] = v;
        rest += v * v;
      }
      const float inv = 1.f / std::sqrt((litmus::sum(squares) + rest) / static_cast<float>(hidden) + eps);
      for (int64_t i = 0; i < full; i += kLanes) {
        const Vec normed = litmus::round_to<scalar_t>(load_vec(h.data() + i) * inv);
        store_vec(out + row + i, load_vec(weight + i) * normed);
      }
      for (int64_t i = full; i < hidden; ++i) {
        const float normed = static_cast<float>(static_cast<scalar_t>(h[i] * inv));
        out[row + i] = static_cast<scalar_t>(static_cast<float>(weight[i]) * normed);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual) {
  check_cpu(x, "rms_norm");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "litmus::rms_norm: weight has shape ",
              weight.sizes(), ", expected (", x.size(-1), ",)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "litmus::rms_norm: x and weight must share a dtype");
  const at::Tensor input = x.contiguous(), w = weight.contiguous();
  // Without a residual there is no sum to return: an empty tensor stands for it (a returned
  // Tensor must be one, for torch.compile's tracing of the op).
  at::Tensor res, summed = at::empty({0}, x.options());
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "litmus::rms_norm: the residual must match x in shape and dtype");
    res = residual->contiguous();
    summed = at::empty_like(input);
  }
  at::Tensor out = at::empty_like(input);
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "litmus_rms_norm", [&] {
    rms_norm_rows<scalar_t>(input.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
                            w.data_ptr<scalar_t>(), static_cast<float>(eps), rows, hidden, out.data_ptr<scalar_t>(),
                            res.defined() ? summed.data_ptr<scalar_t>() : nullptr);
  });
  return {out, summed};
}

// ------------------------------------------------------------------ rotary embedding

// Rotates the first rotary_dim features of each head of one token's rows; cos/sin (rotary_dim / 2
// each) already rounded to the dtype, as the reference rounds its caches.
// Not contracted into fused multiply-adds: the reference rounds each product, and so does this.
template <typename scalar_t>
__attribute__((optimize("fp-contract=off"))) void rotate_token(const scalar_t* x, scalar_t* out, int64_t heads, int64_t head_dim, const float* cos,
                  const float* sin, int64_t half, bool neox) {
  for (int64_t h = 0; h < heads; ++h) {
    const scalar_t* xh = x + h * head_dim;
    scalar_t* oh = out + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
      const float x1 = static_cast<float>(xh[a]), x2 = static_cast<float>(xh[b]);
      oh[a] = static_cast<scalar_t>(x1 * cos[i] - x2 * sin[i]);
      oh[b] = static_cast<scalar_t>(x2 * cos[i] + x1 * sin[i]);
    }
    for (int64_t d = 2 * half; d < head_dim; ++d) oh[d] = xh[d];
  }
}

template <typename scalar_t>
void rotary_rows(const int64_t* positions, int64_t tokens, const at::Tensor& q, const at::Tensor& k,
                 at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                 int64_t head_dim, bool neox) {
  const int64_t half = cos_cache.size(1), q_heads = q.size(1) / head_dim, k_heads = k.size(1) / head_dim;
  const float* cos_ptr = cos_cache.data_ptr<float>();
  const float* sin_ptr = sin_cache.data_ptr<float>();
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  scalar_t* qo = q_out.data_ptr<scalar_t>();
  scalar_t* ko = k_out.data_ptr<scalar_t>();
  at::parallel_for(0, tokens, grain(q.size(1) + k.size(1)), [&](int64_t begin, int64_t end) {
    std::vector<float> cos(half), sin(half);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        cos[i] = static_cast<float>(static_cast<scalar_t>(cos_ptr[positions[t] * half + i]));
        sin[i] = static_cast<float>(static_cast<scalar_t>(sin_ptr[positions[t] * half + i]));
      }
      rotate_token(q_ptr + t * q.stride(0), qo + t * q.size(1), q_heads, head_dim, cos.data(), sin.data(), half, neox);
      rotate_token(k_ptr + t * k.stride(0), ko + t * k.size(1), k_heads, head_dim, cos.data(), sin.data(), half, neox);
    }
  });
}

// q/k [T, heads * head_dim] (rows may be strided: views into a fused qkv output) -> rotated copies.
std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& positions, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& cos_cache,
                                                    const at::Tensor& sin_cache, int64_t head_dim, bool is_neox_style) {
  check_cpu(q, "rotary_embedding");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(0) == k.size(0) && positions.numel() == q.size(0),
              "litmus::rotary_embedding: expected q/k [tokens, heads * head_dim] and one position per token");
  TORCH_CHECK(head_dim > 0 && q.size(1) % head_dim == 0 && k.size(1) % head_dim == 0,
              "litmus::rotary_embedding: q/k widths are not multiples of head_dim ", head_dim);
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "litmus::rotary_embedding: q and k must share a dtype");
  TORCH_CHECK(cos_cache.dim() == 2 && sin_cache.sizes() == cos_cache.sizes() && 2 * cos_cache.size(1) <= head_dim,
              "litmus::rotary_embedding: cos/sin caches must be [max_position, rotary_dim / 2], rotary_dim <= head_dim");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* pos_ptr = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < pos.numel(); ++t) {
    TORCH_CHECK(pos_ptr[t] >= 0 && pos_ptr[t] < cos_cache.size(0), "litmus::rotary_embedding: position ",
                pos_ptr[t], " is outside the caches' ", cos_cache.size(0), " positions");
  }
  const at::Tensor qs = q.stride(1) == 1 ? q : q.contiguous(), ks = k.stride(1) == 1 ? k : k.contiguous();
  const at::Tensor cos = cos_cache.to(at::kFloat).contiguous(), sin = sin_cache.to(at::kFloat).contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "litmus_rotary_embedding", [&] {
    rotary_rows<scalar_t>(pos_ptr, q.size(0), qs, ks, q_out, k_out, cos, sin, head_dim, is_neox_style);
  });
  return {q_out, k_out};
}

// ------------------------------------------------------------------ gated activations

using litmus::Gate;

// act(gate) * up over x = [gate | up] on the last dim, act computed in float32 and rounded to
// the dtype before the product, as the reference rounds F.silu / F.gelu's output.
template <typename scalar_t, Gate kGate>
at::Tensor gated(const at::Tensor& x, const char* op) {
  check_cpu(x, op);
  TORCH_CHECK(x.size(-1) % 2 == 0, "litmus::", op, ": the last dim (", x.size(-1), ") is not [gate | up]");
  const at::Tensor input = x.contiguous();
  const int64_t d = x.size(-1) / 2, rows = x.numel() / x.size(-1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d;
  at::Tensor out = at::empty(shape, x.options());
  const scalar_t* in = input.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, grain(2 * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gate = in + r * 2 * d;
      const scalar_t* up = gate + d;
      scalar_t* row = o + r * d;
      int64_t i = 0;
      for (; i + kLanes <= d; i += kLanes) {
        const Vec act = litmus::round_to<scalar_t>(litmus::activate<kGate>(load_vec(gate + i)));
        store_vec(row + i, act * load_vec(up + i));
      }
      for (; i < d; ++i) {
        Vec one = {};
        one[0] = static_cast<float>(gate[i]);
        const float a = static_cast<float>(static_cast<scalar_t>(litmus::activate<kGate>(one)[0]));
        row[i] = static_cast<scalar_t>(a * static_cast<float>(up[i]));
      }
    }
  });
  return out;
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "litmus_silu_and_mul", [&] {
    out = gated<scalar_t, Gate::kSilu>(x, "silu_and_mul");
  });
  return out;
}

at::Tensor gelu_and_mul(const at::Tensor& x, c10::string_view approximate) {
  const bool tanh_form = approximate == "tanh";
  TORCH_CHECK(tanh_form || approximate == "none", "litmus::gelu_and_mul: approximate must be 'none' or 'tanh', got '",
              std::string(approximate), "'");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "litmus_gelu_and_mul", [&] {
    out = tanh_form ? gated<scalar_t, Gate::kGeluTanh>(x, "gelu_and_mul")
                    : gated<scalar_t, Gate::kGelu>(x, "gelu_and_mul");
  });
  return out;
}

// ------------------------------------------------------------------ KV cache

// Stores each token's k/v [T, Hkv, D] at its slot (slot_mapping [T]) of the caches
// [num_blocks, block_size, Hkv, D], in place; any cache strides with head_dim innermost.
void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                    const at::Tensor& slot_mapping) {
  check_cpu(k, "write_kv_cache");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "litmus::write_kv_cache: expected caches [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              "litmus::write_kv_cache: k/v ", k.sizes(), " do not match the caches ", k_cache.sizes());
  TORCH_CHECK(slot_mapping.numel() == k.size(0), "litmus::write_kv_cache: one slot per token expected");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "litmus::write_kv_cache: k/v and the caches must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "litmus::write_kv_cache: head_dim must be contiguous");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t block_size = k_cache.size(1), num_slots = k_cache.size(0) * block_size;
  for (int64_t t = 0; t < slots.numel(); ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "litmus::write_kv_cache: slot ", slot[t],
                " is outside the cache's ", num_slots, " slots");
  }
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  const int64_t tokens = slots.numel(), heads = k.size(1), head_dim = k.size(2), bytes = head_dim * k.element_size();
  // Items [0, tokens) are the tokens' keys, [tokens, 2 * tokens) their values. A decode step
  // writes each sequence's rows to a block of its own, cold in the caches and often a page the
  // OS has yet to map (engine/worker/model_runner.py zeros_on_demand): two threads halve the
  // wait on those misses and faults.
  struct Copy {
    const char* from;
    char* to;
    int64_t block, offset, head;  // the cache's strides, in bytes
  };
  const auto copy_of = [&](const at::Tensor& src, const at::Tensor& cache) {
    const int64_t item = cache.element_size();
    return Copy{static_cast<const char*>(src.data_ptr()), static_cast<char*>(cache.data_ptr()),
                cache.stride(0) * item, cache.stride(1) * item, cache.stride(2) * item};
  };
  const Copy copies[2] = {copy_of(kc, k_cache), copy_of(vc, v_cache)};
  at::parallel_for(0, 2 * tokens, grain(heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Copy& c = copies[i / tokens];
      const int64_t t = i % tokens;
      char* to = c.to + (slot[t] / block_size) * c.block + (slot[t] % block_size) * c.offset;
      for (int64_t h = 0; h < heads; ++h) std::memcpy(to + h * c.head, c.from + (t * heads + h) * bytes, bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(litmus, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor)");
  m.def("rotary_embedding(Tensor positions, Tensor q, Tensor k, Tensor cos_cache, Tensor sin_cache, int head_dim, "
        "bool is_neox_style) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("gelu_and_mul(Tensor x, str approximate) -> Tensor");
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("rotary_embedding", c10::DispatchKey::CPU, TORCH_FN(rotary_embedding));
  m.impl("silu_and_mul", c10::DispatchKey::CPU, TORCH_FN(silu_and_mul));
  m.impl("gelu_and_mul", c10::DispatchKey::CPU, TORCH_FN(gelu_and_mul));
  m.impl("write_kv_cache", c10::DispatchKey::CPU, TORCH_FN(write_kv_cache));
}
