// CUDA thread blocks on the CPU: what TVM's generated CUDA source needs to compile with g++ and
// run one block at a time (tvm_kernels/cuda/emulate.py replaces TVM's preamble with this file).
//
// * threadIdx / blockIdx / blockDim / gridDim: globals the scheduler sets before it resumes a thread.
// * half and nv_bfloat16: 16-bit storage types; conversions round to nearest even (from float and
//   from double directly, as __double2half does), widening to float is exact.
// * __shared__ arrays: rewritten by emulate.py into pointers into one arena per block, laid out
//   there with canary gaps between and around them. The arena is filled with NaN (0xFFFF in every
//   16-bit unit) at each block's start and the gaps with the canary (0xFFA5, also a NaN) -- a read
//   of unstaged shared memory yields NaN, a stray write breaks a canary.
// * each CUDA thread of a block is a fiber (ucontext) that runs until its next __syncthreads(); the
//   scheduler resumes the block's threads in a chosen order (forward, reverse, or shuffled anew
//   each phase) until all have finished. Threads that disagree on the barriers they reach (some
//   wait, some finished) are reported as barrier divergence.
//
// Not emulated: concurrency within a phase (a phase runs one thread after the other), warps and
// their intrinsics, atomics, dynamic shared memory, launch limits, streams.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define uint unsigned int
#define uchar unsigned char
#define ushort unsigned short

struct emu_dim3 {
  unsigned int x, y, z;
};

// ---- 16-bit floating-point storage types -----------------------------------------------------

// x rounded to nearest even into a float with MANT stored mantissa bits and EXPB exponent bits.
template <int MANT, int EXPB>
static inline uint16_t emu_round_bits(double x) {
  const int bias = (1 << (EXPB - 1)) - 1, emin = 1 - bias;
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0, inf = ((1 << EXPB) - 1) << MANT;
  if (std::isnan(x)) return sign | inf | (1 << (MANT - 1));
  double a = std::fabs(x);
  if (a == 0) return sign;
  if (std::isinf(a)) return sign | inf;
  int e;
  std::frexp(a, &e);
  int E = e - 1;  // a = 1.f * 2^E
  if (E < emin) return sign | (uint16_t)std::nearbyint(std::ldexp(a, MANT - emin));  // subnormal
  double m = std::nearbyint(std::ldexp(a, MANT - E));  // in [2^MANT, 2^(MANT+1)]
  if (m == (double)(1 << (MANT + 1))) {
    m = 1 << MANT;
    ++E;
  }
  if (E > bias) return sign | inf;
  return sign | (uint16_t)((E + bias) << MANT) | (uint16_t)((int)m - (1 << MANT));
}

template <int MANT, int EXPB>
static inline float emu_widen_bits(uint16_t b) {
  const int bias = (1 << (EXPB - 1)) - 1;
  const int E = (b >> MANT) & ((1 << EXPB) - 1), m = b & ((1 << MANT) - 1);
  const float s = (b & 0x8000) ? -1.0f : 1.0f;
  if (E == (1 << EXPB) - 1) return m ? std::nanf("") : s * INFINITY;
  if (E == 0) return s * std::ldexp((float)m, 1 - bias - MANT);
  return s * std::ldexp((float)(m + (1 << MANT)), E - bias - MANT);
}

// half -> float through a table (the inner loops widen every operand)
struct emu_half_table {
  float v[65536];
  emu_half_table() {
    for (int i = 0; i < 65536; ++i) v[i] = emu_widen_bits<10, 5>((uint16_t)i);
  }
};
static const emu_half_table emu_half_to_float;

// A 16-bit float with MANT mantissa and EXPB exponent bits: storage, rounding in, widening out.
template <int MANT, int EXPB>
struct emu_float16 {
  uint16_t bits;
  emu_float16() = default;
  template <typename T, typename = typename std::enable_if<std::is_arithmetic<T>::value>::type>
  emu_float16(T x) : bits(emu_round_bits<MANT, EXPB>((double)x)) {}  // exact to double, rounded once
  operator float() const {
    if (MANT == 10) return emu_half_to_float.v[bits];
    uint32_t u = (uint32_t)bits << 16;  // bfloat16: the top half of a float
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
using half = emu_float16<10, 5>;
using __half = half;
using nv_bfloat16 = emu_float16<7, 8>;

static inline half __float2half_rn(float f) { return half(f); }
static inline float __half2float(half h) { return (float)h; }
static inline nv_bfloat16 __float2bfloat16_rn(float f) { return nv_bfloat16(f); }
static inline float __bfloat162float(nv_bfloat16 h) { return (float)h; }

template <typename T>
static inline T max(T a, T b) { return a < b ? b : a; }
template <typename T>
static inline T min(T a, T b) { return b < a ? b : a; }

// ---- the block scheduler ----------------------------------------------------------------------

static emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
static char* emu_shared;  // this block's shared-memory arena

struct emu_fiber {
  ucontext_t ctx;
  char* stack;
  int barriers;  // __syncthreads() reached so far
  bool done;
};

struct emu_state {
  ucontext_t sched;
  std::vector<emu_fiber> fibers;
  int current;
  void (*body)();  // runs the kernel with this launch's arguments
};
static emu_state emu;

static inline void __syncthreads() {
  emu_fiber& f = emu.fibers[emu.current];
  ++f.barriers;
  swapcontext(&f.ctx, &emu.sched);
}

static void emu_fiber_main() {
  emu.body();
  emu.fibers[emu.current].done = true;  // uc_link returns to the scheduler
}

static const size_t EMU_STACK = 1 << 19;
static const uint16_t EMU_FILL = 0xFFFF, EMU_CANARY = 0xFFA5;

// One shared buffer of the arena (offsets and sizes in bytes, multiples of 2).
struct emu_region {
  const char* name;
  long offset, bytes;
};

enum { EMU_FORWARD = 0, EMU_REVERSE = 1, EMU_SHUFFLED = 2 };

static int emu_fail(char* err, int n, const char* what, const char* kernel, long block) {
  std::snprintf(err, n, "%s: block %ld: %s", kernel, block, what);
  return 1;
}

// Run a whole grid: every block's threads as fibers. Returns 0, or 1 with a message in err.
static int emu_launch(const char* kernel, void (*body)(), emu_dim3 grid, emu_dim3 block, const emu_region* regions, int nregions,
                      long arena_bytes, int order, uint64_t seed, char* err, int errlen) {
  const long nthreads = (long)block.x * block.y * block.z;
  const long nblocks = (long)grid.x * grid.y * grid.z;
  if (nthreads <= 0 || nblocks <= 0) return 0;
  std::vector<uint16_t> arena((arena_bytes + 1) / 2 + 32);
  emu.fibers.assign(nthreads, emu_fiber{});
  char* stacks = (char*)mmap(nullptr, EMU_STACK * nthreads, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) return emu_fail(err, errlen, "no memory for the fibers' stacks", kernel, -1);
  emu.body = body;
  std::vector<long> perm(nthreads);
  std::mt19937_64 rng(seed);
  int rc = 0;
  for (long b = 0; b < nblocks && rc == 0; ++b) {
    blockIdx = emu_dim3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y),
                        (unsigned)(b / ((long)grid.x * grid.y))};
    gridDim = grid;
    blockDim = block;
    // NaN everywhere, the canary in the gaps between (and around) the buffers
    for (auto& u : arena) u = EMU_CANARY;
    for (int r = 0; r < nregions; ++r)
      for (long i = 0; i < regions[r].bytes / 2; ++i) arena[regions[r].offset / 2 + i] = EMU_FILL;
    emu_shared = (char*)arena.data();
    for (long t = 0; t < nthreads; ++t) {
      emu_fiber& f = emu.fibers[t];
      f.stack = stacks + EMU_STACK * t;
      f.barriers = 0;
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = EMU_STACK;
      f.ctx.uc_link = &emu.sched;
      makecontext(&f.ctx, emu_fiber_main, 0);
      perm[t] = t;
    }
    for (int phase = 0;; ++phase) {
      if (order == EMU_REVERSE)
        for (long t = 0; t < nthreads; ++t) perm[t] = nthreads - 1 - t;
      else if (order == EMU_SHUFFLED)
        std::shuffle(perm.begin(), perm.end(), rng);
      for (long k = 0; k < nthreads; ++k) {
        long t = perm[k];
        if (emu.fibers[t].done) continue;
        emu.current = (int)t;
        threadIdx = emu_dim3{(unsigned)(t % block.x), (unsigned)(t / block.x % block.y),
                             (unsigned)(t / ((long)block.x * block.y))};
        swapcontext(&emu.sched, &emu.fibers[t].ctx);
      }
      long done = 0;
      int lo = emu.fibers[0].barriers, hi = lo;
      for (auto& f : emu.fibers) {
        done += f.done;
        lo = f.barriers < lo ? f.barriers : lo;
        hi = f.barriers > hi ? f.barriers : hi;
      }
      if (done == nthreads && lo == hi) break;
      if (done != 0 || lo != hi) {
        char what[160];
        std::snprintf(what, sizeof what, "barrier divergence: %ld of %ld threads finished, "
                      "others wait at __syncthreads() #%d..%d", done, nthreads, lo, hi);
        rc = emu_fail(err, errlen, what, kernel, b);
        break;
      }
    }
    if (rc) break;
    // the canaries: every 16-bit unit outside the buffers
    long pos = 0;
    for (int r = 0; r <= nregions && rc == 0; ++r) {
      long end = r < nregions ? regions[r].offset / 2 : (long)arena.size();
      for (long i = pos; i < end; ++i) {
        if (arena[i] != EMU_CANARY) {
          char what[200];
          const char* near = r < nregions ? regions[r].name : regions[nregions - 1].name;
          std::snprintf(what, sizeof what, "shared-memory canary overwritten at byte %ld (%s %s)",
                        2 * i, r < nregions ? "before" : "after", near);
          rc = emu_fail(err, errlen, what, kernel, b);
          break;
        }
      }
      if (r < nregions) pos = (regions[r].offset + regions[r].bytes) / 2;
    }
  }
  munmap(stacks, EMU_STACK * nthreads);
  return rc;
}
