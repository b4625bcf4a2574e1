// Paged-attention decode on the CPU: one query token per sequence attends over the blocks its
// block table lists, read in place from the cache. The torch reference (kernels/reference.py
// decode_attention) gathers every sequence's blocks into a padded copy first, then multiplies:
// at batch 64 that copy, written and read again, is most of a decode step's memory traffic.
//
// Work is split by (sequence, KV head): the query heads sharing a KV head read each key and
// value row once. A sequence's result depends on nothing else in the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;
// 16 floats as one value: GCC/Clang compile its arithmetic to the widest SIMD registers that
// -march allows, so the loops below are vectorized by construction, not by the optimizer's guess.
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

template <typename scalar_t>
inline Vec load_vec(const scalar_t* p) {
  Vec v;
  for (int64_t l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}

template <>
inline Vec load_vec<float>(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// Summed pairwise, as the lanes were accumulated independently.
inline float sum(Vec v) {
  float lanes[kLanes];
  store_vec(lanes, v);
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

template <typename scalar_t>
inline float dot(const float* q, const scalar_t* k, int64_t n) {
  Vec acc = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) acc += load_vec(q + d) * load_vec(k + d);
  float rest = 0.f;
  for (; d < n; ++d) rest += q[d] * static_cast<float>(k[d]);
  return sum(acc) + rest;
}

// a += p * v over n elements.
template <typename scalar_t>
inline void axpy(float* a, float p, const scalar_t* v, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) store_vec(a + d, load_vec(a + d) + p * load_vec(v + d));
  for (; d < n; ++d) a[d] += p * static_cast<float>(v[d]);
}

template <typename scalar_t>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
            int64_t sliding_window, double soft_cap, const at::Tensor& slopes, at::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, table_width = block_tables.size(1);
  const auto ks = k_cache.strides();
  const auto vs = v_cache.strides();
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float* slope_ptr = slopes.defined() ? slopes.data_ptr<float>() : nullptr;
  const int64_t max_len = num_seqs ? *std::max_element(lens, lens + num_seqs) : 0;

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * head_dim), scores(group * std::max<int64_t>(max_len, 1)),
        acc(group * head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t len = lens[seq], q_pos = len - 1;
      // HF's window: a token sees itself and the sliding_window - 1 tokens before it.
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, q_pos - sliding_window + 1) : 0;
      const int64_t count = len - first;
      const int64_t* table = tables + seq * table_width;
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* row = q_ptr + (seq * num_heads + kv_head * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) query[g * head_dim + d] = static_cast<float>(row[d]);
      }
      for (int64_t t = first; t < len; ++t) {
        const scalar_t* key = k_ptr + table[t / block_size] * ks[0] + (t % block_size) * ks[1] + kv_head * ks[2];
        for (int64_t g = 0; g < group; ++g) {
          float x = dot(query.data() + g * head_dim, key, head_dim) * static_cast<float>(scale);
          if (soft_cap > 0) x = std::tanh(x / static_cast<float>(soft_cap)) * static_cast<float>(soft_cap);
          if (slope_ptr) x += slope_ptr[kv_head * group + g] * static_cast<float>(t - q_pos);
          scores[g * count + t - first] = x;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* p = scores.data() + g * count;
        const float top = *std::max_element(p, p + count);
        float total = 0.f;
        for (int64_t i = 0; i < count; ++i) total += (p[i] = std::exp(p[i] - top));
        // Probabilities rounded to the cache's dtype before the product with v, as the reference does.
        for (int64_t i = 0; i < count; ++i) p[i] = static_cast<float>(static_cast<scalar_t>(p[i] / total));
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {
        const scalar_t* value = v_ptr + table[t / block_size] * vs[0] + (t % block_size) * vs[1] + kv_head * vs[2];
        for (int64_t g = 0; g < group; ++g) {
          axpy(acc.data() + g * head_dim, scores[g * count + t - first], value, head_dim);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* row = out_ptr + (seq * num_heads + kv_head * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) row[d] = static_cast<scalar_t>(acc[g * head_dim + d]);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t sliding_window, double soft_cap, const c10::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "litmus::decode_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q [B, Hq, D] and k/v caches [blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "the caches' head_dim must be contiguous");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "q does not match the cache");
  const at::Tensor query = q.contiguous();
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && lens.numel() == q.size(0),
              "block_tables / context_lens do not match the batch");
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->to(at::kFloat).contiguous();
    TORCH_CHECK(slopes.numel() == q.size(1), "alibi_slopes needs one slope per query head");
  }
  at::Tensor out = at::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "litmus_decode_attention", [&] {
    decode<scalar_t>(query, k_cache, v_cache, tables, lens, scale, sliding_window, soft_cap, slopes, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(litmus, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale, int sliding_window, float soft_cap, Tensor? alibi_slopes) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
