// Fuzz target: checkpoint metadata (tessera::ckpt::Metadata::parse), and the
// checking and loading that trust it (ckpt::verify, ckpt::load).
//
// At start a real checkpoint is saved in a scratch directory
// (ckpt_fixture.h: a world of one rank, three tensors of three dtypes, an
// RNG blob and user keys, 64-byte checksum blocks). Input: the bytes of its metadata.json, written
// over the real one. Metadata that parses must survive the round trip (to_json(parse(to_json(m)))
// == to_json(m)); then verify() must report (never crash on) whatever the metadata claims about the
// data file, and load() into the saved entries must succeed or throw tessera::Error (DataLoss,
// NotFound, InvalidArgument, ...).
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "ckpt_fixture.h"
#include "fuzz_common.h"
#include "tessera/ckpt/checkpoint.h"

namespace {

struct Fixture {
  tessera::fuzz::ScratchDir scratch;
  std::string dir = scratch.file("step_000000042");
  Fixture() { tessera::fuzz::save_fixture_checkpoint(dir); }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fixture();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixture& f = fixture();
  const std::string text = tessera::fuzz::as_string(data, size);
  tessera::fuzz::write_file(f.dir + "/" + tessera::ckpt::kMetadataFile, text);
  tessera::fuzz::expect_errors("Metadata::parse", [&] {
    const auto m = tessera::ckpt::Metadata::parse(text, "metadata.json");
    const std::string json = m.to_json();
    tessera::fuzz::require(tessera::ckpt::Metadata::parse(json, "round trip").to_json() == json,
                           "Metadata: parse(to_json()) changed the metadata");
  });
  tessera::fuzz::expect_errors("ckpt::verify", [&] { tessera::ckpt::verify(f.dir, nullptr, 1); });
  tessera::fuzz::expect_errors("ckpt::load", [&] {
    auto want = tessera::fuzz::fixture_state(false);
    tessera::ckpt::LoadOptions options;
    options.io_threads = 1;
    tessera::ckpt::load(f.dir, want, nullptr, options);
  });
  return 0;
}
