// tessera-ckpt — look at, check, reshard and export Tessera checkpoints.
//
//   tessera-ckpt inspect DIR [--json]        tensors, boxes, files, sizes
//   tessera-ckpt verify DIR                  read everything, check every checksum
//   tessera-ckpt reshard DIR OUT --tp N --dp M [--ep E]
//   tessera-ckpt export-hf DIR OUT           Hugging Face folder (config + safetensors)
//
//   tessera-ckpt --help, tessera-ckpt COMMAND --help   the options
//
// reshard's degrees (--tp, --dp, --ep) default to 1.
// Exit codes: 0 success, 1 a check failed (verify), 2 usage, 3 any other error.
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "command_line.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/ckpt_nn/model_state.h"
#include "tessera/core/error.h"
#include "tessera/core/tensor.h"

namespace {

using namespace tessera;

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
    // The metadata exactly as the format defines it (Metadata::to_json),
    // plus where it was read and the total size, for scripts.
    nlohmann::json j = nlohmann::json::parse(m.to_json());
    j["dir"] = dir;
    j["bytes"] = total;
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
  std::string dir, out;
  bool as_json = false;
  int tp = 1, dp = 1, ep = 1;
  CLI::App app{"Looks at, checks, reshards and exports Tessera checkpoints.", "tessera-ckpt"};
  app.option_defaults()->always_capture_default();
  app.require_subcommand(1);
  app.footer("Exit codes: 0 success, 1 a check failed (verify), 2 usage, 3 any other error.");
  CLI::App* inspect_cmd =
      app.add_subcommand("inspect", "print the tensors, boxes, files and sizes of a checkpoint");
  inspect_cmd->add_option("DIR", dir, "the checkpoint directory")->required();
  inspect_cmd->add_flag("--json", as_json, "print JSON instead of text");
  CLI::App* verify_cmd =
      app.add_subcommand("verify", "read every file and check every checksum (exit 1 if corrupt)");
  verify_cmd->add_option("DIR", dir, "the checkpoint directory")->required();
  CLI::App* reshard_cmd =
      app.add_subcommand("reshard", "rewrite a checkpoint for another tp x ep x dp layout");
  reshard_cmd->add_option("DIR", dir, "the checkpoint directory")->required();
  reshard_cmd->add_option("OUT", out, "the new checkpoint directory")->required();
  const CLI::Validator degree = tessera::examples::positive();
  reshard_cmd->add_option("--tp", tp, "tensor-parallel degree")->check(degree);
  reshard_cmd->add_option("--dp", dp, "data-parallel degree")->check(degree);
  reshard_cmd->add_option("--ep", ep, "expert-parallel degree")->check(degree);
  CLI::App* export_cmd = app.add_subcommand(
      "export-hf", "write a Hugging Face folder (config.json + safetensors) from a checkpoint");
  export_cmd->add_option("DIR", dir, "the checkpoint directory")->required();
  export_cmd->add_option("OUT", out, "the Hugging Face folder to write")->required();
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;

  try {
    if (inspect_cmd->parsed()) return inspect(dir, as_json);
    if (verify_cmd->parsed()) return verify(dir);
    if (export_cmd->parsed()) {
      ckpt::export_hf(dir, out);
      std::cout << "wrote " << out << "\n";
      return 0;
    }
    ckpt::reshard(dir, out, tp, dp, ep);
    std::cout << "wrote " << out << " for tp " << tp << " x ep " << ep << " x dp " << dp << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "tessera-ckpt: " << e.what() << "\n";
    return 3;
  }
}
