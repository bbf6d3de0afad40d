// src/eval/py_random.h — Python's `random.Random`, bit for bit.
//
// lm-evaluation-harness draws few-shot examples with random.Random(seed).sample
// and bootstrap resamples with random.Random(i).choices. Reproducing CPython's
// Mersenne Twister seeding (init_by_array over the 32-bit words of the seed),
// random(), getrandbits(), _randbelow() and sample() lets this harness pick
// the same examples and the same bootstrap replicates as lm-eval does.
//
// Not thread-safe (it is a stateful generator); one per task or per chunk.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace tessera::eval {

class PyRandom {
 public:
  // random.Random(seed) for a non-negative integer seed.
  explicit PyRandom(uint64_t seed);

  // One 32-bit output of MT19937 (genrand_uint32).
  uint32_t next_u32();
  // random.random(): a double in [0, 1) with 53 random bits.
  double random();
  // random.getrandbits(k) for 0 < k <= 32.
  uint32_t getrandbits(int k);
  // random._randbelow(n): uniform in [0, n); 0 when n == 0.
  uint64_t randbelow(uint64_t n);
  // random.sample(range(n), k) — indices into a population of size n. Requires k <= n.
  std::vector<size_t> sample(size_t n, size_t k);
  // random.choices(range(n), k=k): floor(random() * n) k times.
  std::vector<size_t> choices(size_t n, size_t k);

 private:
  void init_genrand(uint32_t s);
  void init_by_array(const std::vector<uint32_t>& key);

  std::array<uint32_t, 624> mt_{};
  size_t index_ = 625;
};

}  // namespace tessera::eval
