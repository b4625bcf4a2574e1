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
//
// A gated MLP's [gate | up] projection can be packed with each panel holding 32 gate features
// and the same 32 up features (pack_gated_linear_weight): its tiles then store act(gate) * up
// directly, the same bits as this GEMM followed by the gated-activation kernel, without writing
// both halves out and reading them back from the other thread's cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace {

using litmus::Gate;
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

// How a tile's sums (kV vectors a row) reach the output, with the bias (from the tile's first
// output feature on, or none) added: `cols` of them as they are...
struct Plain {
  static constexpr bool kGated = false;
  template <int kV>
  void store(float* sums, const float* bias, float* out, int64_t cols) const {
    if (bias) {
      for (int64_t j = 0; j < cols; ++j) sums[j] += bias[j];
    }
    std::memcpy(out, sums, cols * sizeof(float));
  }
};

// ... or, of a gated panel's [32 gate | 32 up] sums, `cols` outputs act(gate) * up; the up
// features' bias lies `up` entries after the gate's.
template <Gate kGate>
struct Gated {
  static constexpr bool kGated = true;
  int64_t up;
  template <int kV>
  void store(float* sums, const float* bias, float* out, int64_t cols) const {
    static_assert(kV == kVecs, "a gated tile holds whole panels");
    constexpr int64_t kPairs = kHalf * kLanes;
    if (bias) {
      for (int64_t j = 0; j < cols; ++j) {
        sums[j] += bias[j];
        sums[kPairs + j] += bias[up + j];
      }
    }
    float gated[kPairs];
    for (int v = 0; v < kHalf; ++v) {
      const Vec gate = load_vec(sums + v * kLanes), up_sums = load_vec(sums + kPairs + v * kLanes);
      store_vec(gated + v * kLanes, litmus::activate<kGate>(gate) * up_sums);
    }
    std::memcpy(out, gated, cols * sizeof(float));
  }
};

// out[r, :cols] = the epilogue's store of x[r] . panel[:, :kV vectors] and the bias, for the
// tile's kRows rows, prefetching pf's rows. A column's sums do not depend on which other columns
// the tile computes.
template <int kRows, int kV, typename Epilogue>
void tile(const float* x, int64_t in_features, const float* panel, const float* bias, float* out,
          int64_t out_features, int64_t cols, Prefetch pf, const Epilogue& epilogue) {
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
    epilogue.template store<kV>(row, bias, out + r * out_features, cols);
  }
}

// The tile for `rows` (1..kMaxRows) rows: each row count compiles to its own register tile.
template <int kV, typename Epilogue, int kRows = kMaxRows>
void tile_of(int64_t rows, const float* x, int64_t in_features, const float* panel, const float* bias, float* out,
             int64_t out_features, int64_t cols, Prefetch pf, const Epilogue& epilogue) {
  if constexpr (kRows > 0) {
    if (rows == kRows) return tile<kRows, kV>(x, in_features, panel, bias, out, out_features, cols, pf, epilogue);
    tile_of<kV, Epilogue, kRows - 1>(rows, x, in_features, panel, bias, out, out_features, cols, pf, epilogue);
  }
}

void check_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.scalar_type() == at::kFloat, "litmus::", op,
              ": expected a float32 CPU weight [out_features, in_features], got ", weight.scalar_type(), " ",
              weight.sizes());
}

// Panels [out / 64 rounded up, in_features, 64] whose column j of panel p is weight row
// feature(p, j), or zeros where that is negative.
template <typename Feature>
at::Tensor pack(const at::Tensor& weight, int64_t panels, Feature feature) {
  const int64_t in_features = weight.size(1);
  const at::Tensor w = weight.contiguous();
  at::Tensor packed = at::zeros({panels, in_features, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t f = feature(p, j);
        if (f < 0) continue;
        for (int64_t k = 0; k < in_features; ++k) dst[(p * in_features + k) * kPanel + j] = src[f * in_features + k];
      }
    }
  });
  return packed;
}

at::Tensor pack_linear_weight(const at::Tensor& weight) {
  check_weight(weight, "pack_linear_weight");
  const int64_t out_features = weight.size(0);
  return pack(weight, (out_features + kPanel - 1) / kPanel, [&](int64_t p, int64_t j) {
    return p * kPanel + j < out_features ? p * kPanel + j : -1;
  });
}

// weight [2 * d, in_features] = [gate | up]: panel p holds gate features [32p, 32p + 32) and then
// the same up features.
at::Tensor pack_gated_linear_weight(const at::Tensor& weight) {
  check_weight(weight, "pack_gated_linear_weight");
  TORCH_CHECK(weight.size(0) % 2 == 0, "litmus::pack_gated_linear_weight: ", weight.size(0),
              " output features are not [gate | up]");
  const int64_t d = weight.size(0) / 2, half = kHalf * kLanes;
  return pack(weight, (d + half - 1) / half, [&](int64_t p, int64_t j) {
    const int64_t f = p * half + j % half;
    return f < d ? f + (j < half ? 0 : d) : -1;
  });
}

// y = x W^T + b through W's panels; a gated epilogue stores act(gate) * up, `out_features` of them.
template <typename Epilogue>
at::Tensor gemm(const char* name, const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                int64_t out_features, const Epilogue& epilogue) {
  // Features a panel computes and outputs: a gated panel turns 32 pairs into 32 outputs.
  constexpr int64_t kOutputs = Epilogue::kGated ? kHalf * kLanes : kPanel;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "litmus::", name,
              ": expected float32 CPU input [rows, in_features], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.size(1) == x.size(1) &&
                  packed.size(0) == (out_features + kOutputs - 1) / kOutputs,
              "litmus::", name, ": the packed weight ", packed.sizes(), " does not match input ", x.sizes(), " and ",
              out_features, " output features");
  const int64_t rows = x.size(0), in_features = x.size(1), panels = packed.size(0);
  at::Tensor b;
  if (bias.has_value()) {
    const int64_t features = Epilogue::kGated ? 2 * out_features : out_features;
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == features, "litmus::", name,
                ": bias must be float32 [", features, "]");
    b = bias->contiguous();
  }
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty({rows, out_features}, x.options());
  const float* xp = input.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // The threads' work comes in half panels (whole ones when gated: a pair's gate and up are in
  // different halves). A second thread is worth it from ~64k multiply-adds per chunk of them.
  constexpr int64_t kUnits = Epilogue::kGated ? 1 : 2;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, rows * in_features * kPanel / kUnits));
  at::parallel_for(0, kUnits * panels, grain, [&](int64_t begin, int64_t end) {
    const int64_t first_panel = begin / kUnits, end_panel = (end + kUnits - 1) / kUnits;
    // The vectors [v0, v1) of panel p in this thread's units.
    const auto vectors = [&](int64_t p) {
      if constexpr (kUnits == 1) return std::pair<int, int>{0, kVecs};
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
        const int64_t col0 = p * kOutputs + v0 * kLanes;
        const int64_t cols = std::min<int64_t>(kOutputs * (v1 - v0) / kVecs, out_features - col0);
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
          const float* tile_x = xp + r * in_features;
          if (v1 - v0 == kVecs) {
            tile_of<kVecs>(n, tile_x, in_features, panel, panel_bias, tile_out, out_features, cols, pf, epilogue);
          } else if constexpr (!Epilogue::kGated) {
            tile_of<kHalf>(n, tile_x, in_features, panel, panel_bias, tile_out, out_features, cols, pf, epilogue);
          }
        }
      }
    }
  });
  return out;
}

// x [rows, in_features] float32; packed from pack_linear_weight; bias [out_features] or none.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                  int64_t out_features) {
  return gemm("linear", x, packed, bias, out_features, Plain{});
}

// act(gate) * up of [gate | up] = x W^T + b, W packed by pack_gated_linear_weight, bias [2 * d]
// or none; act is "silu", "gelu" or "gelu_tanh". Returns [rows, d].
at::Tensor gated_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                        int64_t d, c10::string_view act) {
  if (act == "silu") return gemm("gated_linear", x, packed, bias, d, Gated<Gate::kSilu>{d});
  if (act == "gelu") return gemm("gated_linear", x, packed, bias, d, Gated<Gate::kGelu>{d});
  TORCH_CHECK(act == "gelu_tanh", "litmus::gated_linear: act must be 'silu', 'gelu' or 'gelu_tanh', got '",
              std::string(act), "'");
  return gemm("gated_linear", x, packed, bias, d, Gated<Gate::kGeluTanh>{d});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(litmus, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed_weight, Tensor? bias, int out_features) -> Tensor");
  m.def("pack_gated_linear_weight(Tensor weight) -> Tensor");
  m.def("gated_linear(Tensor x, Tensor packed_weight, Tensor? bias, int d, str act) -> Tensor");
  m.impl("pack_linear_weight", c10::DispatchKey::CPU, TORCH_FN(pack_linear_weight));
  m.impl("pack_gated_linear_weight", c10::DispatchKey::CPU, TORCH_FN(pack_gated_linear_weight));
  m.impl("gated_linear", c10::DispatchKey::CPU, TORCH_FN(gated_linear));
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(linear));
}
