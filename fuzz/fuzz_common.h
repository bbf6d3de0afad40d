// fuzz/fuzz_common.h — what every fuzz target shares: the error contract
// oracle, a scratch directory for parsers that read files, and small checks.
//
// A fuzz target feeds bytes to one parser and accepts exactly two outcomes:
// success, or a tessera::Error (the contract of every public entry point,
// tessera/core/error.h). Anything else is a finding and aborts the process,
// so libFuzzer saves the input:
//   - a crash or a sanitizer report (ASan, UBSan; the build aborts on both),
//   - another exception escaping (std::out_of_range from a JSON library,
//     c10::Error from LibTorch, std::invalid_argument from std::stoi, ...),
//   - a broken property the target checks (a round trip that changes the
//     value, a result that contradicts the input).
//
//   extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
//     tessera::fuzz::expect_errors("ModelConfig::parse", [&] {
//       auto cfg = tessera::nn::ModelConfig::parse(tessera::fuzz::as_string(data, size));
//       tessera::fuzz::require(..., "round trip");
//     });
//     return 0;
//   }
//
// Thread safety: none needed; libFuzzer runs one input at a time.
#pragma once

#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <typeinfo>

#include "tessera/core/error.h"

namespace tessera::fuzz {

inline std::string as_string(const uint8_t* data, size_t size) {
  return std::string(reinterpret_cast<const char*>(data), size);
}

// Aborts with `what` when `cond` is false: a property of the parser's
// result that must hold for every input it accepts.
inline void require(bool cond, const std::string& what) {
  if (cond) return;
  std::fprintf(stderr, "fuzz property violated: %s\n", what.c_str());
  std::abort();
}

// TESSERA_FUZZ_VERBOSE=1 prints every accepted tessera::Error (to see what
// a seed or a reproducer does: fuzz_<target> FILE).
inline bool verbose() {
  static const bool on = std::getenv("TESSERA_FUZZ_VERBOSE") != nullptr;
  return on;
}

// Runs `body`; a tessera::Error is an accepted outcome, any other exception
// aborts naming its type and message. Returns true when `body` finished
// without an exception.
template <typename Fn>
bool expect_errors(const char* where, Fn&& body) {
  try {
    body();
    return true;
  } catch (const tessera::Error& e) {
    if (verbose()) std::fprintf(stderr, "%s: %s\n", where, e.what());
    return false;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: an exception other than tessera::Error escaped: %s: %s\n", where,
                 typeid(e).name(), e.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "%s: a non-std exception escaped\n", where);
    std::abort();
  }
}

// A directory of its own for one fuzzing process, under /dev/shm when it
// exists (files that parsers open by path cost no disk I/O there), removed
// when the process exits normally. A crashed run leaves it behind
// (tessera-fuzz.XXXXXX), which scripts/fuzz.sh cleans up.
class ScratchDir {
 public:
  ScratchDir() {
    std::string base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : "/tmp";
    std::string pattern = base + "/tessera-fuzz.XXXXXX";
    if (!mkdtemp(pattern.data())) {
      std::perror("mkdtemp");
      std::abort();
    }
    path_ = pattern;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Replaces the contents of `path` with `bytes` (aborts on an I/O failure:
// the harness, not the parser, is broken then).
inline void write_file(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::abort();
  }
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The repository's root (compiled in) or $TESSERA_SOURCE_DIR.
inline std::string source_dir() {
  const char* env = std::getenv("TESSERA_SOURCE_DIR");
  return env ? env : TESSERA_SOURCE_DIR;
}

}  // namespace tessera::fuzz
