// 16 floats as one value, shared by the CPU kernels. GCC/Clang compile its arithmetic to the
// widest SIMD registers that -march allows, so the loops over it are vectorized by construction,
// not by the optimizer's guess.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace litmus {

constexpr int64_t kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

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

template <typename scalar_t>
inline void store_vec(scalar_t* p, Vec v) {
  for (int64_t l = 0; l < kLanes; ++l) p[l] = static_cast<scalar_t>(v[l]);
}

template <>
inline void store_vec<float>(float* p, Vec v) {
  std::memcpy(p, &v, sizeof v);
}

// v rounded to scalar_t's precision and back: what a torch op on scalar_t tensors would store.
template <typename scalar_t>
inline Vec round_to(Vec v) {
  scalar_t tmp[kLanes];
  store_vec(tmp, v);
  return load_vec(tmp);
}

template <>
inline Vec round_to<float>(Vec v) {
  return v;
}

// Summed pairwise, as the lanes were accumulated independently.
inline float sum(Vec v) {
  float lanes[kLanes];
  store_vec(lanes, v);
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// exp of each lane, Cephes' expf: the power of two split off, a degree-6 polynomial for the
// rest; within 2 ulp of std::exp. Below -87.3 it is 0, above 88.7 it overflows to inf.
inline Vec exp(Vec x) {
  const auto low = x < -87.3f;
  const auto high = x > 88.7f;
  x = low ? Vec{} - 87.3f : x;
  x = high ? Vec{} + 88.7f : x;
  const Vec magic = Vec{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (x * 1.44269504088896341f + magic) - magic;
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n in two halves, so that n = 128 (x near 88.7) does not overflow the exponent field.
  const IVec half = __builtin_convertvector(n, IVec) >> 1;
  const IVec bits_a = (half + 127) << 23, bits_b = (__builtin_convertvector(n, IVec) - half + 127) << 23;
  Vec scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof scale_a);
  std::memcpy(&scale_b, &bits_b, sizeof scale_b);
  const Vec out = p * scale_a * scale_b;
  return low ? Vec{} : (high ? Vec{} + __builtin_huge_valf() : out);
}

// The gated MLPs' activations, shared by the gated-activation kernels and the GEMM that applies
// them as it stores (linear.cpp), so that both give the same bits.
enum class Gate { kSilu, kGelu, kGeluTanh };

template <Gate kGate>
inline Vec activate(Vec x) {
  if constexpr (kGate == Gate::kSilu) {
    return x / (1.0f + exp(-x));
  } else {
    Vec out;
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = x[l];
      out[l] = kGate == Gate::kGeluTanh
                   ? 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)))
                   : 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));
    }
    return out;
  }
}

}  // namespace litmus
