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

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using litmus::kLanes;
using litmus::load_vec;
using litmus::store_vec;
using litmus::sum;
using litmus::Vec;

// Lane j of the result is sum(a[j]), added in the same pairwise order as sum(): lane l with
// l + 8, then l + 4, l + 2, l + 1. Sixteen horizontal sums in 15 vector adds instead of 16 x 15
// scalar ones; the score loop was mostly these.
inline Vec sum16(const Vec* a) {
  Vec b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The dot products of q with n <= 16 key rows (row j at key + j * stride), lane j for row j;
// lanes past n are 0.
template <typename scalar_t>
inline Vec dots(const float* q, const scalar_t* key, int64_t stride, int64_t n, int64_t head_dim) {
  const int64_t full = head_dim / kLanes * kLanes;
  Vec acc[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* row = key + j * stride;
    for (int64_t d = 0; d < full; d += kLanes) acc[j] += load_vec(q + d) * load_vec(row + d);
  }
  Vec out = sum16(acc);
  if (full < head_dim) {
    for (int64_t j = 0; j < n; ++j) {
      float rest = 0.f;
      for (int64_t d = full; d < head_dim; ++d) rest += q[d] * static_cast<float>(key[j * stride + d]);
      out[j] += rest;
    }
  }
  return out;
}

// Requests a row of `bytes` into L2.
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(row) + b, 0, 2);
}

// a[0, kChunks * 16) += sum over j < n of p[j] * (row j at value + j * stride), each chunk kept in
// a register over the rows: kChunks independent chains of multiply-adds overlap.
template <int kChunks, typename scalar_t>
inline void add_weighted_rows(float* a, const float* p, const scalar_t* value, int64_t stride, int64_t n) {
  Vec sums[kChunks];
  for (int c = 0; c < kChunks; ++c) sums[c] = load_vec(a + c * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    for (int c = 0; c < kChunks; ++c) sums[c] += pj * load_vec(value + j * stride + c * kLanes);
  }
  for (int c = 0; c < kChunks; ++c) store_vec(a + c * kLanes, sums[c]);
}

constexpr int64_t kAhead = 32;  // tokens of keys prefetched ahead of the one being scored

// kHeadDim: the head size as a constant its loops unroll with, or 0 to take q's.
template <typename scalar_t, int64_t kHeadDim>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
            int64_t sliding_window, double soft_cap, const at::Tensor& slopes, at::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = kHeadDim ? kHeadDim : q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, table_width = block_tables.size(1);
  const int64_t full = head_dim / kLanes * kLanes;
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
  // Scores are stored 16 at a time, so each head's row is padded to a multiple of 16.
  const int64_t padded = (std::max<int64_t>(max_len, 1) + kLanes - 1) / kLanes * kLanes + kLanes;
  const int64_t row_bytes = head_dim * sizeof(scalar_t);
  // HF's window: a token sees itself and the sliding_window - 1 tokens before it.
  auto first_of = [&](int64_t len) { return sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0; };
  // Token t's row of a KV head in a cache, through the sequence's block table.
  auto row_of = [&](const scalar_t* cache, c10::IntArrayRef strides, const int64_t* table, int64_t head, int64_t t) {
    return cache + table[t / block_size] * strides[0] + (t % block_size) * strides[1] + head * strides[2];
  };

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * head_dim), scores(group * padded), acc(group * head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t len = lens[seq], q_pos = len - 1, first = first_of(len), count = len - first;
      const int64_t* table = tables + seq * table_width;
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* row = q_ptr + (seq * num_heads + kv_head * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) query[g * head_dim + d] = static_cast<float>(row[d]);
      }
      // Runs of up to 16 consecutive tokens within one block: rows at a fixed stride.
      for (int64_t t = first; t < len;) {
        const int64_t offset = t % block_size, n = std::min({kLanes, block_size - offset, len - t});
        const scalar_t* key = row_of(k_ptr, ks, table, kv_head, t);
        // Blocks lie anywhere in the cache, each a few KB, too short for the hardware prefetcher:
        // this run's values (read after the softmax) and the keys kAhead tokens on are requested now.
        for (int64_t u = t; u < t + n; ++u) prefetch_row(row_of(v_ptr, vs, table, kv_head, u), row_bytes);
        for (int64_t u = t + kAhead; u < std::min(t + n + kAhead, len); ++u) {
          prefetch_row(row_of(k_ptr, ks, table, kv_head, u), row_bytes);
        }
        for (int64_t g = 0; g < group; ++g) {
          const Vec x = dots(query.data() + g * head_dim, key, ks[1], n, head_dim) * static_cast<float>(scale);
          float lanes[kLanes];
          store_vec(lanes, x);
          float* p = scores.data() + g * padded + t - first;
          for (int64_t j = 0; j < n; ++j) {
            float s = lanes[j];
            if (soft_cap > 0) s = std::tanh(s / static_cast<float>(soft_cap)) * static_cast<float>(soft_cap);
            if (slope_ptr) s += slope_ptr[kv_head * group + g] * static_cast<float>(t + j - q_pos);
            p[j] = s;
          }
        }
        t += n;
      }
      if (item + 1 < end) {  // the next item's first keys, while this one's softmax and values run
        const int64_t next_seq = (item + 1) / num_kv_heads, next_len = lens[next_seq], next_first = first_of(next_len);
        for (int64_t u = next_first; u < std::min(next_first + kAhead, next_len); ++u) {
          prefetch_row(row_of(k_ptr, ks, tables + next_seq * table_width, (item + 1) % num_kv_heads, u), row_bytes);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* p = scores.data() + g * padded;
        const float top = *std::max_element(p, p + count);
        Vec total = {};
        int64_t i = 0;
        for (; i + kLanes <= count; i += kLanes) {
          const Vec e = litmus::exp(load_vec(p + i) - top);
          store_vec(p + i, e);
          total += e;
        }
        float rest = 0.f;
        for (; i < count; ++i) rest += (p[i] = std::exp(p[i] - top));
        const float norm = sum(total) + rest;
        // Probabilities rounded to the cache's dtype before the product with v, as the reference does.
        const Vec norms = Vec{} + norm;
        for (i = 0; i + kLanes <= count; i += kLanes) store_vec(p + i, litmus::round_to<scalar_t>(load_vec(p + i) / norms));
        for (; i < count; ++i) p[i] = static_cast<float>(static_cast<scalar_t>(p[i] / norm));
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len;) {
        const int64_t offset = t % block_size, n = std::min({kLanes, block_size - offset, len - t});
        const scalar_t* value = row_of(v_ptr, vs, table, kv_head, t);
        for (int64_t g = 0; g < group; ++g) {
          const float* p = scores.data() + g * padded + t - first;
          float* a = acc.data() + g * head_dim;
          int64_t d = 0;
          for (; d + 4 * kLanes <= full; d += 4 * kLanes) add_weighted_rows<4>(a + d, p, value + d, vs[1], n);
          for (; d < full; d += kLanes) add_weighted_rows<1>(a + d, p, value + d, vs[1], n);
          for (; d < head_dim; ++d) {
            for (int64_t j = 0; j < n; ++j) a[d] += p[j] * static_cast<float>(value[j * vs[1] + d]);
          }
        }
        t += n;
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
    // The common head sizes get loops of known length (5-9 % faster at 64).
    const auto run = [&](auto head_dim) {
      decode<scalar_t, decltype(head_dim)::value>(query, k_cache, v_cache, tables, lens, scale, sliding_window,
                                                  soft_cap, slopes, out);
    };
    switch (q.size(2)) {
      case 64: return run(std::integral_constant<int64_t, 64>{});
      case 128: return run(std::integral_constant<int64_t, 128>{});
      default: return run(std::integral_constant<int64_t, 0>{});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(litmus, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale, int sliding_window, float soft_cap, Tensor? alibi_slopes) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
