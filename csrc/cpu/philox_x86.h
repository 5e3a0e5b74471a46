// Philox4x32-10 words with AVX2 (8 blocks per step) and AVX-512 (16 blocks per step), the same
// bits as philox.h's scalar philox4x32_10: the counter, the key schedule and every round are
// the scalar ones, lane by lane. The compiler does not vectorize the scalar loop profitably
// (its 32x32 -> 64-bit products and the 4-word interleave cost more than they save: 1.8 ns per
// word with AVX2, as the scalar loop), so the products are _mm*_mul_epu32 on the even and odd
// lanes, and the words are transposed to the element order in registers.
#pragma once
#include <stdint.h>

#include "sharpfast/philox.h"

namespace sharpfast {
namespace cpu {

// The scalar loop (every CPU; the words the vector loops must give).
inline void philox_words_scalar(uint64_t seed, uint32_t stream, uint32_t sample, uint64_t first, int64_t blocks,
                                uint32_t* w) {
  for (int64_t b = 0; b < blocks; ++b) {
    const Words4 r = philox_block(seed, stream, sample, first + static_cast<uint64_t>(b));
    for (int k = 0; k < 4; ++k) w[4 * b + k] = r.v[k];
  }
}

}  // namespace cpu
}  // namespace sharpfast

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define SF_HAVE_X86_PHILOX 1
#define SF_TARGET_AVX2 __attribute__((target("avx2")))
#define SF_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))

namespace sharpfast {
namespace cpu {

// hi and lo 32 bits of a * m in each 32-bit lane.
SF_TARGET_AVX2 inline void mulhilo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6 as 64 bits
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);   // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Word k of blocks b0 .. b7 in a[k] -> w[4 b + k] (32 words).
SF_TARGET_AVX2 inline void store_interleaved_avx2(const __m256i a[4], uint32_t* w) {
  const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);   // blocks 0|4, 1|5
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);   // blocks 2|6, 3|7
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w), _mm256_permute2x128_si256(u0, u1, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 8), _mm256_permute2x128_si256(u2, u3, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 16), _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 24), _mm256_permute2x128_si256(u2, u3, 0x31));
}

// The counter words of blocks first .. first + L - 1: c0 = the block's low half, c1 its high half.
template <int L>
inline void counters(uint64_t first, uint32_t* lo, uint32_t* hi) {
  for (int j = 0; j < L; ++j) {
    const uint64_t b = first + static_cast<uint64_t>(j);
    lo[j] = static_cast<uint32_t>(b);
    hi[j] = static_cast<uint32_t>(b >> 32);
  }
}

// Groups of blocks whose rounds are interleaved: one group's round is a chain of dependent
// products and xors (about 8 cycles), so a single group leaves the vector units idle.
constexpr int kPhiloxGroups = 4;

SF_TARGET_AVX2 inline void philox_words_avx2(uint64_t seed, uint32_t stream, uint32_t sample, uint64_t first,
                                             int64_t blocks, uint32_t* w) {
  constexpr int G = kPhiloxGroups, L = 8;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i c2_in = _mm256_set1_epi32(static_cast<int>(sample)), c3_in = _mm256_set1_epi32(static_cast<int>(stream));
  int64_t b = 0;
  for (; b + G * L <= blocks; b += G * L) {
    alignas(32) uint32_t lo[G * L], hi[G * L];
    counters<G * L>(first + static_cast<uint64_t>(b), lo, hi);
    __m256i c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      c0[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo + g * L));
      c1[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi + g * L));
      c2[g] = c2_in;
      c3[g] = c3_in;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      if (r) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int g = 0; g < G; ++g) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo_avx2(c0[g], m0, hi0, lo0);
        mulhilo_avx2(c2[g], m1, hi1, lo1);
        c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), key0);
        c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), key1);
        c1[g] = lo1;
        c3[g] = lo0;
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m256i words[4] = {c0[g], c1[g], c2[g], c3[g]};
      store_interleaved_avx2(words, w + 4 * (b + g * L));
    }
  }
  philox_words_scalar(seed, stream, sample, first + static_cast<uint64_t>(b), blocks - b, w + 4 * b);
}

SF_TARGET_AVX512 inline void mulhilo_avx512(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

SF_TARGET_AVX512 inline void philox_words_avx512(uint64_t seed, uint32_t stream, uint32_t sample, uint64_t first,
                                                 int64_t blocks, uint32_t* w) {
  constexpr int G = kPhiloxGroups, L = 16;
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i c2_in = _mm512_set1_epi32(static_cast<int>(sample)), c3_in = _mm512_set1_epi32(static_cast<int>(stream));
  int64_t b = 0;
  for (; b + G * L <= blocks; b += G * L) {
    alignas(64) uint32_t lo[G * L], hi[G * L];
    counters<G * L>(first + static_cast<uint64_t>(b), lo, hi);
    __m512i c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      c0[g] = _mm512_load_si512(lo + g * L);
      c1[g] = _mm512_load_si512(hi + g * L);
      c2[g] = c2_in;
      c3[g] = c3_in;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      if (r) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
      for (int g = 0; g < G; ++g) {
        __m512i hi0, lo0, hi1, lo1;
        mulhilo_avx512(c0[g], m0, hi0, lo0);
        mulhilo_avx512(c2[g], m1, hi1, lo1);
        c0[g] = _mm512_xor_si512(_mm512_xor_si512(hi1, c1[g]), key0);
        c2[g] = _mm512_xor_si512(_mm512_xor_si512(hi0, c3[g]), key1);
        c1[g] = lo1;
        c3[g] = lo0;
      }
    }
    for (int g = 0; g < G; ++g) {   // blocks 0-7 and 8-15 of a group: its 256-bit halves, transposed as in AVX2
      const __m256i low[4] = {_mm512_castsi512_si256(c0[g]), _mm512_castsi512_si256(c1[g]),
                              _mm512_castsi512_si256(c2[g]), _mm512_castsi512_si256(c3[g])};
      const __m256i high[4] = {_mm512_extracti64x4_epi64(c0[g], 1), _mm512_extracti64x4_epi64(c1[g], 1),
                               _mm512_extracti64x4_epi64(c2[g], 1), _mm512_extracti64x4_epi64(c3[g], 1)};
      store_interleaved_avx2(low, w + 4 * (b + g * L));
      store_interleaved_avx2(high, w + 4 * (b + g * L) + 32);
    }
  }
  // what is left: 8 at a time, then one at a time
  philox_words_avx2(seed, stream, sample, first + static_cast<uint64_t>(b), blocks - b, w + 4 * b);
}

}  // namespace cpu
}  // namespace sharpfast
#endif
