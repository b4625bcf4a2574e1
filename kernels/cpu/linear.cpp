// float32 linear layers on the CPU: y = x W^T + b with W packed once into panels of 64 output
// features, each panel [in_features, 64] contiguous.
//
// A tile of up to 6 rows x 64 features accumulates in 24 vector registers over the whole input
// dimension (6 x 64 rather than 12 x 32: ten loads per 24 multiply-adds instead of 14; 5-10 %
// faster at 64 rows, 11 % at 2048), one fused multiply-add per (row, 16 features, input feature): every row's sums are
// the same operations in the same order whatever the number of rows, so a sequence gets the
// same bits alone, batched, or prefilled in chunks (oneDNN and MKL pick kernels by shape, which
// changes the rounding with the batch). While a thread computes a panel it prefetches the next
// one: at decode batch sizes the weights stream from memory once per step, and the hardware
// prefetcher alone left the arithmetic waiting on them. Each row tile prefetches its share of
// the next panel spread over its loop: the whole panel requested by the first tile queued up in
// the memory system and the later tiles waited on it (8-15 % slower at 64 rows, level at 1).
// Threads divide the panels in halves of 32 features, so a thread's share may begin or end
// mid-panel: 576 features make 9 panels, and their 5/4 split left one of two threads idle for
// a ninth of the time (the even split is 4-10 % faster at 16-64 rows, 3 % at 2048).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec.h"

#include <algorithm>
#include <cstring>

namespace {

using litmus::kLanes;
using litmus::load_vec;
using litmus::store_vec;
using litmus::Vec;

constexpr int kVecs = 4;                    // vectors per panel row
constexpr int kHalf = kVecs / 2;            // vectors per half panel
constexpr int64_t kPanel = kVecs * kLanes;  // output features per panel
constexpr int kMaxRows = 6;                 // rows per tile: 24 accumulators + 4 weight vectors + 1 broadcast
constexpr int64_t kRowChunk = 256;          // rows whose inputs stay in L2 (590 KB at 576 features)

inline Vec splat(float s) { return Vec{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

// Panel rows [next, end) to prefetch, one every `every` steps of a tile's loop, `vecs` vectors
// (cache lines) of each.
struct Prefetch {
  const float* next;
  const float* end;
  int64_t every;
  int vecs;
};

// out[r, :cols] = x[r] . panel[:, :kV vectors] (+ bias) for the tile's kRows rows, prefetching
// pf's rows. A column's sums do not depend on which other columns the tile computes.
template <int kRows, int kV>
void tile(const float* x, int64_t in_features, const float* panel, const float* bias, float* out,
          int64_t out_features, int64_t cols, Prefetch pf) {
  Vec acc[kRows][kV] = {};
  int64_t countdown = 1;
  for (int64_t k = 0; k < in_features; ++k) {
    if (pf.next < pf.end && --countdown == 0) {
      for (int v = 0; v < pf.vecs; ++v) __builtin_prefetch(pf.next + v * kLanes, 0, 2);
      pf.next += kPanel;
      countdown = pf.every;
    }
    Vec w[kV];
    for (int v = 0; v < kV; ++v) w[v] = load_vec(panel + k * kPanel + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const Vec xr = splat(x[r * in_features + k]);
      for (int v = 0; v < kV; ++v) acc[r][v] += xr * w[v];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float row[kV * kLanes];
    for (int v = 0; v < kV; ++v) store_vec(row + v * kLanes, acc[r][v]);
    if (bias) {
      for (int64_t j = 0; j < cols; ++j) row[j] += bias[j];
    }
    std::memcpy(out + r * out_features, row, cols * sizeof(float));
  }
}

// The tile for `rows` (1..kMaxRows) rows: each row count compiles to its own register tile.
template <int kV, int kRows = kMaxRows>
void tile_of(int64_t rows, const float* x, int64_t in_features, const float* panel, const float* bias, float* out,
             int64_t out_features, int64_t cols, Prefetch pf) {
  if constexpr (kRows > 0) {
    if (rows == kRows) return tile<kRows, kV>(x, in_features, panel, bias, out, out_features, cols, pf);
    tile_of<kV, kRows - 1>(rows, x, in_features, panel, bias, out, out_features, cols, pf);
  }
}

at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.scalar_type() == at::kFloat,
              "litmus::pack_linear_weight: expected a float32 CPU weight [out_features, in_features], got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t panels = (out_features + kPanel - 1) / kPanel;
  const at::Tensor w = weight.contiguous();
  at::Tensor packed = at::zeros({panels, in_features, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < kPanel && p * kPanel + j < out_features; ++j) {
        for (int64_t k = 0; k < in_features; ++k) dst[(p * in_features + k) * kPanel + j] = src[(p * kPanel + j) * in_features + k];
      }
    }
  });
  return packed;
}

// x [rows, in_features] float32; packed from pack_linear_weight; bias [out_features] or none.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                  int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "litmus::linear: expected float32 CPU input [rows, in_features], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.size(1) == x.size(1) &&
                  packed.size(0) == (out_features + kPanel - 1) / kPanel,
              "litmus::linear: the packed weight ", packed.sizes(), " does not match input ", x.sizes(), " and ",
              out_features, " output features");
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == out_features, "litmus::linear: bias must be float32 [",
                out_features, "]");
  }
  const at::Tensor input = x.contiguous();
  const int64_t rows = x.size(0), in_features = x.size(1), panels = packed.size(0);
  at::Tensor out = at::empty({rows, out_features}, x.options());
  const float* xp = input.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // The threads' work comes in half panels. A second thread is worth it from ~64k multiply-adds
  // per chunk of them.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, rows * in_features * kPanel / 2));
  at::parallel_for(0, 2 * panels, grain, [&](int64_t begin, int64_t end) {
    const int64_t first_panel = begin / 2, end_panel = (end + 1) / 2;
    // The vectors [v0, v1) of panel p in this thread's halves.
    const auto vectors = [&](int64_t p) {
      return std::pair<int, int>{2 * p >= begin ? 0 : kHalf, 2 * p + 1 < end ? kVecs : kHalf};
    };
    // The row chunk's inputs stay in L2 while each panel meets all of its row tiles; the tiles
    // of a panel prefetch this thread's part of the next panel, each its share of the rows.
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
      const int64_t r1 = std::min(rows, r0 + kRowChunk);
      const int64_t tiles = (r1 - r0 + kMaxRows - 1) / kMaxRows;
      const int64_t share = std::max<int64_t>(1, (in_features + tiles - 1) / tiles);
      const int64_t every = std::max<int64_t>(1, in_features / share);
      for (int64_t p = first_panel; p < end_panel; ++p) {
        const auto [v0, v1] = vectors(p);
        const int64_t col0 = p * kPanel + v0 * kLanes;
        const int64_t cols = std::min<int64_t>((v1 - v0) * kLanes, out_features - col0);
        if (cols <= 0) continue;
        const float* panel = wp + p * in_features * kPanel + v0 * kLanes;
        const float* panel_bias = bp ? bp + col0 : nullptr;
        // This thread's vectors of the next panel, if it has one: its last panel prefetches nothing.
        const bool prefetch = p + 1 < end_panel;
        const auto [n0, n1] = prefetch ? vectors(p + 1) : std::pair<int, int>{0, 0};
        const float* next = prefetch ? wp + (p + 1) * in_features * kPanel + n0 * kLanes : panel;
        const int64_t next_rows = prefetch ? in_features : 0;
        for (int64_t r = r0, t = 0; r < r1; r += kMaxRows, ++t) {
          const int64_t first = std::min(t * share, next_rows), last = std::min(first + share, next_rows);
          const Prefetch pf{next + first * kPanel, next + last * kPanel, every, n1 - n0};
          const int64_t n = std::min<int64_t>(kMaxRows, r1 - r);
          float* tile_out = op + r * out_features + col0;
          if (v1 - v0 == kVecs) {
            tile_of<kVecs>(n, xp + r * in_features, in_features, panel, panel_bias, tile_out, out_features, cols, pf);
          } else {
            tile_of<kHalf>(n, xp + r * in_features, in_features, panel, panel_bias, tile_out, out_features, cols, pf);
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(litmus, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed_weight, Tensor? bias, int out_features) -> Tensor");
  m.impl("pack_linear_weight", c10::DispatchKey::CPU, TORCH_FN(pack_linear_weight));
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(linear));
}
