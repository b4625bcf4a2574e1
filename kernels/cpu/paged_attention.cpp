// Paged attention on the CPU: each query row attends over the first context_len tokens its block
// table lists, read in place from the cache. The torch reference (kernels/reference.py
// decode_attention) gathers every sequence's blocks into a padded copy first, then multiplies:
// at batch 64 that copy, written and read again, is most of a decode step's memory traffic.
//
// Decode has one query row per sequence. Prefill runs through the same code, each of a chunk's
// tokens a row whose context ends at its own position: a token's output is the same bits whether
// it was prefilled (in any chunking) or decoded, and there is no per-chunk torch work: with
// SmolLM2's heads, 64 prompts of 32 tokens take 1.5 ms a layer (the reference's loop over chunks
// 10 ms), one prompt of 2048 tokens 86 ms (214 ms).
//
// Work is split by (row, KV head): the query heads sharing a KV head read each key and value row
// once. A row's result depends on nothing else in the batch. Threads take runs of items of equal
// total length rather than equal counts: a prompt's later tokens attend over more keys.
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

// The first of a row's len tokens it attends to. HF's window: a token sees itself and the
// sliding_window - 1 tokens before it (0: no window).
inline int64_t first_attended(int64_t len, int64_t sliding_window) {
  return sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
}

// Items [bounds[t], bounds[t + 1]) for thread t of `threads`: an item goes to the thread whose
// share of the total cost holds the item's midpoint, so each run costs about the same.
template <typename Cost>
std::vector<int64_t> balanced_bounds(int64_t items, int64_t threads, Cost cost) {
  int64_t total = 0;
  for (int64_t i = 0; i < items; ++i) total += cost(i);
  std::vector<int64_t> bounds(threads + 1, 0);
  for (int64_t i = 0, done = 0; i < items; ++i) {
    const int64_t c = cost(i);
    done += c;
    ++bounds[1 + std::min(threads - 1, (2 * done - c) * threads / (2 * total))];
  }
  for (int64_t t = 0; t < threads; ++t) bounds[t + 1] += bounds[t];
  return bounds;
}

// kHeadDim: the head size as a constant its loops unroll with, or 0 to take q's. Row r of q uses
// block table row table_rows[r] (r itself when table_rows is undefined) and the first
// context_lens[r] tokens of it, its query at the last of them.
template <typename scalar_t, int64_t kHeadDim>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& table_rows, const at::Tensor& context_lens,
            double scale, int64_t sliding_window, double soft_cap, const at::Tensor& slopes, at::Tensor& out) {
  const int64_t num_rows = q.size(0), num_heads = q.size(1), head_dim = kHeadDim ? kHeadDim : q.size(2);
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
  const int64_t* table_row = table_rows.defined() ? table_rows.data_ptr<int64_t>() : nullptr;
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float* slope_ptr = slopes.defined() ? slopes.data_ptr<float>() : nullptr;
  const int64_t max_len = num_rows ? *std::max_element(lens, lens + num_rows) : 0;
  // Scores are stored 16 at a time, so each head's row is padded to a multiple of 16.
  const int64_t padded = (std::max<int64_t>(max_len, 1) + kLanes - 1) / kLanes * kLanes + kLanes;
  const int64_t row_bytes = head_dim * sizeof(scalar_t);
  // Token t's row of a KV head in a cache, through the sequence's block table.
  auto row_of = [&](const scalar_t* cache, c10::IntArrayRef strides, const int64_t* table, int64_t head, int64_t t) {
    return cache + table[t / block_size] * strides[0] + (t % block_size) * strides[1] + head * strides[2];
  };

  auto table_of = [&](int64_t r) { return tables + (table_row ? table_row[r] : r) * table_width; };
  const int64_t threads = at::get_num_threads();
  const std::vector<int64_t> bounds = balanced_bounds(num_rows * num_kv_heads, threads, [&](int64_t item) {
    const int64_t len = lens[item / num_kv_heads];
    return len - first_attended(len, sliding_window) + kLanes;  // the tokens attended, and a row's fixed work
  });

  at::parallel_for(0, threads, 1, [&](int64_t first_thread, int64_t last_thread) {
    const int64_t begin = bounds[first_thread], end = bounds[last_thread];
    std::vector<float> query(group * head_dim), scores(group * padded), acc(group * head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t len = lens[r], q_pos = len - 1, first = first_attended(len, sliding_window);
      const int64_t count = len - first;
      const int64_t* table = table_of(r);
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* row = q_ptr + (r * num_heads + kv_head * group + g) * head_dim;
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
        const int64_t next_r = (item + 1) / num_kv_heads, next_len = lens[next_r];
        const int64_t next_first = first_attended(next_len, sliding_window);
        for (int64_t u = next_first; u < std::min(next_first + kAhead, next_len); ++u) {
          prefetch_row(row_of(k_ptr, ks, table_of(next_r), (item + 1) % num_kv_heads, u), row_bytes);
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
        scalar_t* row = out_ptr + (r * num_heads + kv_head * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) row[d] = static_cast<scalar_t>(acc[g * head_dim + d]);
      }
    }
  });
}

// Checks the inputs both ops share and runs attend over them.
at::Tensor run(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& tables, const at::Tensor& table_rows, const at::Tensor& lens, double scale,
               int64_t sliding_window, double soft_cap, const c10::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "litmus::", op, " runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "litmus::", op,
              ": expected q [T, Hq, D] and k/v caches [blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), "litmus::", op,
              ": q and the caches must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "litmus::", op,
              ": the caches' head_dim must be contiguous");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "litmus::", op,
              ": q does not match the cache");
  TORCH_CHECK(tables.dim() == 2, "litmus::", op, ": block_tables must be [sequences, max_blocks]");
  // Every block a row reads must be one of the cache's: a bad table would read outside it.
  const int64_t block_size = k_cache.size(1), width = tables.size(1), num_blocks = k_cache.size(0);
  const int64_t* table = tables.data_ptr<int64_t>();
  const int64_t* row = table_rows.defined() ? table_rows.data_ptr<int64_t>() : nullptr;
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < lens.numel(); ++r) {
    TORCH_CHECK(len[r] >= 1 && len[r] <= width * block_size, "litmus::", op, ": context length ", len[r],
                " does not fit its block table of ", width, " blocks of ", block_size);
    // A sliding window reads only its own blocks: those before it may have been let go.
    const int64_t* blocks = table + (row ? row[r] : r) * width;
    for (int64_t b = first_attended(len[r], sliding_window) / block_size; b * block_size < len[r]; ++b) {
      TORCH_CHECK(blocks[b] >= 0 && blocks[b] < num_blocks, "litmus::", op, ": block ", blocks[b],
                  " is outside the cache's ", num_blocks, " blocks");
    }
  }
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->to(at::kFloat).contiguous();
    TORCH_CHECK(slopes.numel() == q.size(1), "litmus::", op, ": alibi_slopes needs one slope per query head");
  }
  const at::Tensor query = q.contiguous();
  at::Tensor out = at::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "litmus_paged_attention", [&] {
    // The common head sizes get loops of known length (5-9 % faster at 64).
    const auto go = [&](auto head_dim) {
      attend<scalar_t, decltype(head_dim)::value>(query, k_cache, v_cache, tables, table_rows, lens, scale,
                                                  sliding_window, soft_cap, slopes, out);
    };
    switch (q.size(2)) {
      case 64: return go(std::integral_constant<int64_t, 64>{});
      case 128: return go(std::integral_constant<int64_t, 128>{});
      default: return go(std::integral_constant<int64_t, 0>{});
    }
  });
  return out;
}

// q [B, Hq, D]: sequence b's next token, attending over context_lens[b] tokens (itself included).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t sliding_window, double soft_cap, const c10::optional<at::Tensor>& alibi_slopes) {
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(q.dim() == 3 && tables.dim() == 2 && tables.size(0) == q.size(0) && lens.numel() == q.size(0),
              "litmus::decode_attention: block_tables / context_lens do not match the batch");
  return run("decode_attention", q, k_cache, v_cache, tables, at::Tensor(), lens, scale, sliding_window, soft_cap,
             alibi_slopes);
}

// q [T, Hq, D] packs prefill chunks: chunk i is rows query_start_loc[i]:query_start_loc[i + 1], at
// positions num_computed[i] onwards, its own k/v already in the cache (kernels/reference.py
// prefill_attention).
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& query_start_loc, const at::Tensor& num_computed,
                             const at::Tensor& block_tables, double scale, int64_t sliding_window, double soft_cap,
                             const c10::optional<at::Tensor>& alibi_slopes) {
  const at::Tensor starts = query_start_loc.to(at::kLong).contiguous();
  const at::Tensor computed = num_computed.to(at::kLong).contiguous();
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  TORCH_CHECK(q.dim() == 3, "litmus::prefill_attention: expected q [T, Hq, D], got ", q.sizes());
  const int64_t chunks = computed.numel(), tokens = q.size(0);
  TORCH_CHECK(starts.numel() == chunks + 1 && tables.dim() == 2 && tables.size(0) == chunks,
              "litmus::prefill_attention: query_start_loc needs one more entry than num_computed and block_tables "
              "has rows");
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* before = computed.data_ptr<int64_t>();
  TORCH_CHECK(start[0] == 0 && start[chunks] == tokens, "litmus::prefill_attention: query_start_loc must run from 0 "
              "to the ", tokens, " query rows");
  at::Tensor lens = at::empty({tokens}, starts.options()), rows = at::empty({tokens}, starts.options());
  int64_t* len = lens.data_ptr<int64_t>();
  int64_t* row = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < chunks; ++i) {
    TORCH_CHECK(start[i] <= start[i + 1] && before[i] >= 0, "litmus::prefill_attention: chunk ", i, " spans rows ",
                start[i], " to ", start[i + 1], " after ", before[i], " cached tokens");
    for (int64_t t = start[i]; t < start[i + 1]; ++t) {
      len[t] = before[i] + t - start[i] + 1;
      row[t] = i;
    }
  }
  return run("prefill_attention", q, k_cache, v_cache, tables, rows, lens, scale, sliding_window, soft_cap,
             alibi_slopes);
}

}  // namespace

TORCH_LIBRARY(litmus, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale, int sliding_window, float soft_cap, Tensor? alibi_slopes) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor query_start_loc, Tensor num_computed, "
        "Tensor block_tables, float scale, int sliding_window, float soft_cap, Tensor? alibi_slopes) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
  m.impl("prefill_attention", c10::DispatchKey::CPU, TORCH_FN(prefill_attention));
}
