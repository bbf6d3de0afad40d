// fuzz/ckpt_fixture.h — the checkpoint the metadata fuzz target loads,
// shared with the seed-corpus builder so its seed is that checkpoint's own
// metadata.json.
//
//   tessera::fuzz::save_fixture_checkpoint(dir);         // a world of one rank
//   auto want = tessera::fuzz::fixture_state(false);     // same entries, zeroed
//   tessera::ckpt::load(dir, want, nullptr);
//
// Not thread-safe (writes files).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "tessera/ckpt/checkpoint.h"

namespace tessera::fuzz {

// Three tensors (float32 [5, 7], int64 [13], bfloat16 [3, 2, 4]); with
// `fill`, their values, an RNG blob, user keys and a step; without, zeros.
inline ckpt::State fixture_state(bool fill) {
  ckpt::State s;
  s.add_replicated("model.w", fill ? at::arange(35, at::kFloat).reshape({5, 7}) : at::zeros({5, 7}),
                   1);
  s.add_replicated("optim.step_ids",
                   fill ? at::arange(13, at::kLong) * 1000003 : at::zeros({13}, at::kLong), 1);
  s.add_replicated("model.norm",
                   fill ? at::linspace(-1, 1, 24).reshape({3, 2, 4}).to(at::kBFloat16)
                        : at::zeros({3, 2, 4}, at::kBFloat16),
                   1);
  if (fill) {
    s.step = 42;
    s.data_position = 4242;
    s.rng["cpu"] = std::string("\x01\x02\x03\x04rng-state", 13);
    s.user["model_config"] = "{\"hidden_size\": 8}";
  }
  return s;
}

// Saves fixture_state(true) at `dir` with 64-byte checksum blocks, so every
// box spans several blocks.
inline void save_fixture_checkpoint(const std::string& dir) {
  ckpt::SaveOptions options;
  options.io_threads = 1;
  options.checksum_block = 64;
  ckpt::save(dir, fixture_state(true), nullptr, options);
}

}  // namespace tessera::fuzz
