// tessera-ckpt — look at, check, reshard and export Tessera checkpoints.
//
//   tessera-ckpt inspect DIR [--json]        tensors, boxes, files, sizes
//   tessera-ckpt verify DIR                  read everything, check every checksum
//   tessera-ckpt reshard DIR OUT --tp N --dp M [--ep E]
//   tessera-ckpt export-hf DIR OUT           Hugging Face folder (config + safetensors)
//
// Exit codes: 0 success, 1 a check failed (verify), 2 usage, 3 any other error.
#include <cstdlib>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tessera/ckpt/checkpoint.h"
#include "tessera/ckpt/model_state.h"
#include "tessera/core/error.h"
#include "tessera/core/tensor.h"

namespace {

using namespace tessera;

int usage() {
  std::cerr << "usage: tessera-ckpt inspect DIR [--json]\n"
               "       tessera-ckpt verify DIR\n"
               "       tessera-ckpt reshard DIR OUT --tp N --dp M [--ep E]\n"
               "       tessera-ckpt export-hf DIR OUT\n";
  return 2;
}

uint64_t tensor_bytes_of(const ckpt::TensorMeta& t) {
  uint64_t n = 0;
  for (const auto& b : t.boxes) n += b.byte_length;
  return n;
}

int inspect(const std::string& dir, bool as_json) {
  ckpt::Metadata m = ckpt::read_metadata(dir);
  uint64_t total = 0;
  for (const auto& f : m.files) total += f.bytes;
  if (as_json) {
    nlohmann::json j;
    j["dir"] = dir;
    j["format_version"] = m.format_version;
    j["world_size"] = m.world_size;
    j["step"] = m.step;
    j["data_position"] = m.data_position;
    j["user"] = m.user;
    j["bytes"] = total;
    j["files"] = nlohmann::json::array();
    for (const auto& f : m.files) j["files"].push_back({{"name", f.name}, {"bytes", f.bytes}});
    j["tensors"] = nlohmann::json::object();
    for (const auto& [name, t] : m.tensors) {
      nlohmann::json boxes = nlohmann::json::array();
      for (const auto& b : t.boxes) {
        boxes.push_back({{"offset", b.box.offset},
                         {"length", b.box.length},
                         {"ranks", b.ranks},
                         {"file", b.file},
                         {"byte_offset", b.byte_offset},
                         {"byte_length", b.byte_length}});
      }
      j["tensors"][name] = {{"dtype", t.dtype},
                            {"shape", t.shape},
                            {"bytes", tensor_bytes_of(t)},
                            {"attrs", t.attrs},
                            {"boxes", boxes}};
    }
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::cout << dir << ": format " << m.format_version << ", saved by " << m.world_size
            << " rank(s), step " << m.step << ", data position " << m.data_position << ", "
            << m.tensors.size() << " tensors, " << total << " bytes in " << m.files.size()
            << " files\n";
  for (const auto& [k, v] : m.user) {
    std::cout << "  user " << k << " = " << (v.size() > 60 ? v.substr(0, 57) + "..." : v) << "\n";
  }
  for (const auto& [name, t] : m.tensors) {
    std::cout << name << "  " << t.dtype << " " << shape_string(t.shape) << "  "
              << tensor_bytes_of(t) << " bytes, " << t.boxes.size() << " box(es)";
    for (const auto& [k, v] : t.attrs) std::cout << "  " << k << "=" << v;
    std::cout << "\n";
    for (const auto& b : t.boxes) {
      std::cout << "    " << b.box.to_string() << " held by rank(s)";
      for (int r : b.ranks) std::cout << " " << r;
      std::cout << " -> " << b.file << " @" << b.byte_offset << " +" << b.byte_length << "\n";
    }
  }
  return 0;
}

int verify(const std::string& dir) {
  ckpt::VerifyReport r = ckpt::verify(dir);
  for (const auto& e : r.errors) std::cout << "ERROR: " << e << "\n";
  std::cout << dir << ": " << r.files << " files, " << r.boxes << " boxes, " << r.bytes
            << " bytes checked: " << (r.ok() ? "OK" : "CORRUPT") << "\n";
  return r.ok() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) return usage();
  const std::string cmd = args[0];
  try {
    if (cmd == "inspect" && (args.size() == 2 || (args.size() == 3 && args[2] == "--json"))) {
      return inspect(args[1], args.size() == 3);
    }
    if (cmd == "verify" && args.size() == 2) return verify(args[1]);
    if (cmd == "export-hf" && args.size() == 3) {
      ckpt::export_hf(args[1], args[2]);
      std::cout << "wrote " << args[2] << "\n";
      return 0;
    }
    if (cmd == "reshard" && args.size() >= 3) {
      std::map<std::string, int> degrees{{"--tp", 1}, {"--dp", 1}, {"--ep", 1}};
      for (size_t i = 3; i < args.size(); i += 2) {
        if (!degrees.count(args[i]) || i + 1 >= args.size()) return usage();
        degrees[args[i]] = std::atoi(args[i + 1].c_str());
        if (degrees[args[i]] < 1) return usage();
      }
      ckpt::reshard(args[1], args[2], degrees["--tp"], degrees["--dp"], degrees["--ep"]);
      std::cout << "wrote " << args[2] << " for tp " << degrees["--tp"] << " x ep "
                << degrees["--ep"] << " x dp " << degrees["--dp"] << "\n";
      return 0;
    }
    return usage();
  } catch (const std::exception& e) {
    std::cerr << "tessera-ckpt: " << e.what() << "\n";
    return 3;
  }
}
