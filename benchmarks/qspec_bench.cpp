// Decode throughput of fp32, W4A16, W4A4 and QSPEC at several batch sizes,
// with QSPEC's acceptance, each mode's peak memory and KV-cache bytes, and
// llama.cpp on the same 4-bit weights, measured in one run.
//
//   qspec_bench --smollm2 PATH [--random] [--llama-cpp BIN_DIR] [--tokens 32]
//               [--batches 1,4,16,32] [--gamma 3] [--draft w4a4|w4a8]
//               [--smooth ALPHA] [--rotate] [--reps 5] [--warmup 1] [--quick]
//               [--json FILE]
//
// Models: SmolLM2-135M-Instruct from its GGUF, and with --random a larger
// randomly initialised llama (hidden 1024, 12 layers, intermediate 4096,
// vocabulary 32000; with --quick a tiny one, which is then the only model).
//
// Same weights as llama.cpp: the SmolLM2 GGUF stores its linear layers as
// Q4_1 but its embedding (tied to the output projection) as Q8_0. The
// benchmark first writes a copy whose every weight matrix is 4-bit: the
// Q4_1 tensors byte for byte, the embedding re-quantized to Q4_1 (ggml's
// reference quantizer). llama.cpp runs that file; we load the same file
// (dequantized), then pack every linear layer, the output projection
// included, to our int4 (symmetric, groups of 64). Both sides multiply by
// 4-bit weights everywhere; the codes are not bit-identical (Q4_1 has groups
// of 32 with a minimum).
//
// Every sequence generates exactly --tokens new tokens (no stop tokens).
// tokens/s is decode throughput: tokens after the first (which the prefill
// yields) per second of decoding. fp32 runs nn::generate (BLAS); the packed
// modes run specdec::generate (batch-invariant forwards). "adaptive" lets
// QSPEC pick gamma in [0, gamma + 1] from measured throughput (0 is plain
// W4A16 decoding).
//
// Memory: every (mode, batch) runs in its own process (this program, started
// again with --single-mode), so one mode's allocations cannot raise
// another's high-water mark. Reported per mode: the process's peak resident
// memory (VmHWM, model included), its resident memory after loading and
// packing, and the KV cache's bytes.
//
// llama.cpp (--llama-cpp BIN_DIR, from scripts/build-llama-cpp.sh), same
// thread count as ours, flash attention off and on, --reps repetitions:
// batch 1 with llama-bench (-p 0 -n TOKENS -r REPS), batches with
// llama-batched-bench (32-token prompts, TOKENS generated per sequence),
// run REPS times. Decode tokens/s = llama-bench's t/s, batched-bench's S_TG.
//
// --help lists every option.
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench_report.h"
#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/core/subprocess.h"
#include "tessera/formats/gguf.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/specdec/qspec.h"

namespace fs = std::filesystem;
namespace tn = tessera::nn;
namespace tq = tessera::quant;
namespace ts = tessera::specdec;
using nlohmann::json;

namespace {

const std::vector<std::string> kModes = {"fp32", "w4a16", "w4a4", "qspec", "qspec_adaptive"};

struct Options {
  std::string smollm2;
  std::vector<int64_t> batches = {1, 4, 16, 32};
  int64_t tokens = 32, gamma = 3;
  bool random = false;
  std::string llama_cpp;
  double smooth = -1;
  bool rotate = false;
  std::string draft = "w4a4";
  tessera::bench::RepeatOptions rep;
  // A child run: one model, one mode, one batch size.
  std::string single_model, single_mode, single_json, model_file;
  int64_t single_batch = 0;
};

void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

// A /proc/self/status field in MiB ("VmHWM", "VmRSS").
double status_mib(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / 1024.0;
  }
  return 0;
}

// Writes a copy of the GGUF at `src` whose every quantized weight matrix is
// Q4_1: Q4_1 tensors copied byte for byte, other quantized or 16-bit
// matrices (SmolLM2's Q8_0 embedding) re-quantized to Q4_1; F32 vectors
// (norms) as they are; metadata copied. Returns the number of tensors
// re-quantized.
int write_all_q4_1(const std::string& src, const std::string& dst) {
  const tn::GgufFile in = tn::GgufFile::open(src);
  tn::GgufWriter w(static_cast<uint32_t>(in.alignment()));
  for (const std::string& key : in.keys()) {
    if (key == "general.alignment") continue;  // the writer writes its own
    switch (in.type(key)) {
      case tn::GgufType::kUint8:
        w.add_uint8(key, static_cast<uint8_t>(in.get_int(key)));
        break;
      case tn::GgufType::kInt8:
        w.add_int8(key, static_cast<int8_t>(in.get_int(key)));
        break;
      case tn::GgufType::kUint16:
        w.add_uint16(key, static_cast<uint16_t>(in.get_int(key)));
        break;
      case tn::GgufType::kInt16:
        w.add_int16(key, static_cast<int16_t>(in.get_int(key)));
        break;
      case tn::GgufType::kUint32:
        w.add_uint32(key, static_cast<uint32_t>(in.get_int(key)));
        break;
      case tn::GgufType::kInt32:
        w.add_int32(key, static_cast<int32_t>(in.get_int(key)));
        break;
      case tn::GgufType::kUint64:
        w.add_uint64(key, static_cast<uint64_t>(in.get_int(key)));
        break;
      case tn::GgufType::kInt64:
        w.add_int64(key, in.get_int(key));
        break;
      case tn::GgufType::kFloat32:
        w.add_float32(key, static_cast<float>(in.get_float(key)));
        break;
      case tn::GgufType::kFloat64:
        w.add_float64(key, in.get_float(key));
        break;
      case tn::GgufType::kBool:
        w.add_bool(key, in.get_bool(key));
        break;
      case tn::GgufType::kString:
        w.add_string(key, in.get_string(key));
        break;
      case tn::GgufType::kArray: {
        switch (in.array_type(key)) {
          case tn::GgufType::kString:
            w.add_array(key, in.get_string_array(key));
            break;
          case tn::GgufType::kFloat32: {
            std::vector<float> v;
            for (double x : in.get_float_array(key)) v.push_back(static_cast<float>(x));
            w.add_array(key, v);
            break;
          }
          case tn::GgufType::kFloat64:
            w.add_array(key, in.get_float_array(key));
            break;
          case tn::GgufType::kInt32: {
            std::vector<int32_t> v;
            for (int64_t x : in.get_int_array(key)) v.push_back(static_cast<int32_t>(x));
            w.add_array(key, v);
            break;
          }
          case tn::GgufType::kUint32: {
            std::vector<uint32_t> v;
            for (int64_t x : in.get_int_array(key)) v.push_back(static_cast<uint32_t>(x));
            w.add_array(key, v);
            break;
          }
          case tn::GgufType::kInt64:
            w.add_array(key, in.get_int_array(key));
            break;
          default:
            TESSERA_THROW(InvalidArgument, "GGUF '", src, "': key '", key, "' is an array of ",
                          tn::gguf_type_name(in.array_type(key)),
                          ", which this copy does not handle");
        }
        break;
      }
      default:
        TESSERA_THROW(InvalidArgument, "GGUF '", src, "': key '", key, "' has type ",
                      tn::gguf_type_name(in.type(key)), ", which this copy does not handle");
    }
  }
  int requantized = 0;
  std::ifstream raw(src, std::ios::binary);
  TESSERA_CHECK(raw.good(), NotFound, "cannot open '", src, "'");
  for (const tn::GgufTensorInfo& t : in.tensors()) {
    const bool vector = t.shape.size() == 1;
    if (t.type == tn::GgmlType::kQ4_1 || (vector && t.type == tn::GgmlType::kF32)) {
      std::vector<uint8_t> bytes(t.nbytes);
      raw.seekg(static_cast<std::streamoff>(t.offset));
      raw.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
      TESSERA_CHECK(raw.good(), DataLoss, "GGUF '", src, "': tensor '", t.name, "' ends early");
      w.add_raw_tensor(t.name, t.type, t.shape, std::move(bytes));
    } else {
      w.add_tensor(t.name, in.load(t.name), tn::GgmlType::kQ4_1);
      ++requantized;
    }
  }
  w.write(dst);
  return requantized;
}

// The model of a run: SmolLM2 from the (all-Q4_1) GGUF, or a random llama.
struct Bench {
  std::unique_ptr<tn::Transformer> model;
  std::shared_ptr<tq::QuantizedModel> packed;
  std::vector<std::vector<int64_t>> prompts;  // the pool batches draw from
  std::string title;
};

tn::ModelConfig random_config(bool quick) {
  tn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = quick ? 512 : 32000;
  c.hidden_size = quick ? 128 : 1024;
  c.intermediate_size = quick ? 256 : 4096;
  c.num_hidden_layers = quick ? 2 : 12;
  c.num_attention_heads = quick ? 4 : 16;
  c.num_key_value_heads = quick ? 2 : 4;
  return c;
}

Bench load_bench(const Options& o, const std::string& which) {
  Bench b;
  if (which == "smollm2") {
    auto loaded = tn::load_gguf_model(o.model_file);
    std::vector<std::vector<int64_t>> calibration;
    for (const char* q : {"Tell me about the history of Rome.", "How do airplanes fly?",
                          "Give me a recipe for pancakes.", "What is machine learning?"}) {
      auto ids = loaded.tokenizer.encode(tn::format_chat(loaded.chat_template, {{"user", q}}));
      calibration.emplace_back(ids.begin(), ids.end());
    }
    const tq::QuantConfig qc{64, true, o.rotate};
    b.packed = o.smooth < 0 ? tq::QuantizedModel::pack(*loaded.model, qc)
                            : tq::QuantizedModel::pack(*loaded.model, qc, calibration, o.smooth);
    for (const char* q : {"What is the capital of France?", "Name three colors.", "What is 2+2?",
                          "Write a haiku about the sea.", "How many legs does a dog have?",
                          "What is the opposite of hot?", "Explain gravity in one sentence.",
                          "List the days of the week."}) {
      auto ids = loaded.tokenizer.encode(tn::format_chat(loaded.chat_template, {{"user", q}}));
      b.prompts.emplace_back(ids.begin(), ids.end());
    }
    b.title = "SmolLM2-135M-Instruct";
    if (o.smooth >= 0)
      b.title += ", smoothed (alpha " + std::to_string(o.smooth).substr(0, 4) + ")";
    if (o.rotate) b.title += ", Hadamard-rotated";
    b.model = std::move(loaded.model);
  } else {
    const tn::ModelConfig c = random_config(o.rep.quick);
    b.model = std::make_unique<tn::Transformer>(c);
    b.model->init_random(1);
    b.packed = tq::QuantizedModel::pack(*b.model, {o.rep.quick ? 64 : 128, true});
    std::mt19937_64 rng(3);
    b.prompts.resize(8);
    for (auto& p : b.prompts) {
      p.resize(16 + rng() % 16);
      for (auto& t : p) t = static_cast<int64_t>(rng() % c.vocab_size);
    }
    b.title = "random llama, " + std::to_string(c.hidden_size) + " hidden x " +
              std::to_string(c.num_hidden_layers) + " layers (" +
              std::to_string(c.num_parameters() / 1000000) + "M parameters)";
  }
  b.model->set_linear_override(b.packed);
  return b;
}

// A child process's work: --warmup then --reps generations of one mode at
// one batch size; writes its numbers to --single-json.
int run_single(const Options& o) {
  Bench b = load_bench(o, o.single_model);
  const double rss_loaded = status_mib("VmRSS");
  std::vector<std::vector<int64_t>> prompts;
  for (int64_t i = 0; i < o.single_batch; ++i) prompts.push_back(b.prompts[i % b.prompts.size()]);
  const std::string& mode = o.single_mode;
  std::vector<double> tps, acceptance, mean_accepted, per_verify;
  int64_t cache_bytes = 0;
  std::vector<int64_t> steps_per_gamma;
  reset_peak();
  for (int rep = 0; rep < o.rep.warmup + o.rep.reps; ++rep) {
    int64_t produced = 0;
    double seconds = 0;
    if (mode == "fp32") {
      b.model->set_linear_override(nullptr);
      tn::SamplingOptions so;
      so.max_new_tokens = o.tokens;
      auto r = tn::generate(*b.model, prompts, so);
      produced = r.new_tokens - o.single_batch;
      seconds = r.decode_seconds;
      cache_bytes = r.cache_bytes;
      b.model->set_linear_override(b.packed);
    } else {
      ts::GenerateOptions g;
      ts::parse_decoding(mode == "w4a16" ? "w4a16" : mode == "w4a4" ? "w4a4" : "qspec", &g);
      g.sampling.max_new_tokens = o.tokens;
      g.qspec.gamma = o.gamma;
      g.qspec.draft_mode = tq::parse_mode(o.draft);
      if (mode == "qspec_adaptive") {
        g.qspec.adaptive_gamma = true;
        g.qspec.min_gamma = 0;
        g.qspec.max_gamma = o.gamma + 1;
      }
      auto r = ts::generate(*b.model, *b.packed, prompts, g);
      produced = r.new_tokens - o.single_batch;
      seconds = r.decode_seconds;
      cache_bytes = r.cache_bytes;
      if (rep >= o.rep.warmup && (mode == "qspec" || mode == "qspec_adaptive")) {
        acceptance.push_back(r.stats.acceptance_rate());
        mean_accepted.push_back(r.stats.mean_accepted());
        per_verify.push_back(r.stats.tokens_per_verify());
        steps_per_gamma = r.stats.steps_per_gamma;
      }
    }
    if (rep >= o.rep.warmup) tps.push_back(produced / seconds);
  }
  json out = {{"tokens_per_s", tps},
              {"peak_rss_mib", status_mib("VmHWM")},
              {"rss_after_load_mib", rss_loaded},
              {"kv_cache_bytes", cache_bytes},
              {"packed_bytes", b.packed->bytes()},
              {"group_size", b.packed->config().group_size},
              {"title", b.title}};
  if (!acceptance.empty()) {
    out["acceptance"] = acceptance;
    out["mean_accepted"] = mean_accepted;
    out["tokens_per_verify"] = per_verify;
    out["steps_per_gamma"] = steps_per_gamma;
  }
  std::ofstream(o.single_json) << out.dump() << "\n";
  return 0;
}

// Runs this program again for one (model, mode, batch); returns its JSON.
json run_child(const Options& o, const std::string& self, const std::string& model,
               const std::string& mode, int64_t batch, const std::string& scratch) {
  const std::string out = scratch + "/single.json";
  std::vector<std::string> argv = {self,
                                   "--single-model",
                                   model,
                                   "--single-mode",
                                   mode,
                                   "--single-batch",
                                   std::to_string(batch),
                                   "--single-json",
                                   out,
                                   "--model-file",
                                   o.model_file,
                                   "--tokens",
                                   std::to_string(o.tokens),
                                   "--gamma",
                                   std::to_string(o.gamma),
                                   "--draft",
                                   o.draft,
                                   "--smooth=" + std::to_string(o.smooth),
                                   "--reps",
                                   std::to_string(o.rep.reps),
                                   "--warmup",
                                   std::to_string(o.rep.warmup)};
  if (o.rotate) argv.push_back("--rotate");
  if (o.rep.quick) argv.push_back("--quick");
  const tessera::CommandResult r = tessera::run_command(argv, std::chrono::hours(2));
  TESSERA_CHECK(r.status.success(), Internal, "qspec_bench child (", model, ", ", mode, ", batch ",
                batch, ") ", r.status.describe(), ":\n", r.output);
  std::ifstream in(out);
  TESSERA_CHECK(in.good(), NotFound, "qspec_bench child wrote no ", out);
  json j = json::parse(in);
  fs::remove(out);
  return j;
}

std::string help_of(const std::string& program) {
  try {
    return tessera::run_command({program, "--help"}, std::chrono::seconds(60)).output;
  } catch (const std::exception&) {
    return "";
  }
}

// llama-bench at batch 1: decode tokens/s of every repetition, per flash
// attention setting (0 off, 1 on).
std::map<int, std::vector<double>> llama_bench(const std::string& bin_dir, const std::string& gguf,
                                               int64_t tokens, int threads, int reps,
                                               std::string* command) {
  const std::string program = bin_dir + "/llama-bench";
  // Newer llama.cpp spells the flash-attention values on/off, older 0/1.
  const bool words = help_of(program).find("on|off") != std::string::npos;
  const std::vector<std::string> argv = {program,
                                         "-m",
                                         gguf,
                                         "-p",
                                         "0",
                                         "-n",
                                         std::to_string(tokens),
                                         "-t",
                                         std::to_string(threads),
                                         "-fa",
                                         words ? "off,on" : "0,1",
                                         "-r",
                                         std::to_string(reps),
                                         "-o",
                                         "json"};
  for (const auto& a : argv) *command += (command->empty() ? "" : " ") + a;
  const tessera::CommandResult r = tessera::run_command(argv, std::chrono::hours(1), false);
  TESSERA_CHECK(r.status.success(), Unavailable, "llama-bench ", r.status.describe(), ":\n",
                r.output);
  const auto bracket = r.output.find('[');
  TESSERA_CHECK(bracket != std::string::npos, DataLoss, "llama-bench printed no JSON:\n", r.output);
  std::map<int, std::vector<double>> out;
  for (const json& test : json::parse(r.output.substr(bracket))) {
    if (test.value("n_gen", 0) == 0) continue;
    const json& f = test.at("flash_attn");
    const int fa = f.is_boolean() ? (f.get<bool>() ? 1 : 0)
                   : f.is_string()
                       ? (f.get<std::string>() == "on" || f.get<std::string>() == "1" ? 1 : 0)
                       : f.get<int>();
    std::vector<double> ts;
    if (test.contains("samples_ts")) {
      ts = test["samples_ts"].get<std::vector<double>>();
    } else {
      for (double ns : test.at("samples_ns").get<std::vector<double>>()) {
        ts.push_back(test["n_gen"].get<double>() / (ns * 1e-9));
      }
    }
    out[fa] = ts;
  }
  return out;
}

// One llama-batched-bench run: decode tokens/s (S_TG) per batch size.
std::map<int64_t, double> llama_batched(const std::string& bin_dir, const std::string& gguf,
                                        const std::vector<int64_t>& batches, int64_t tokens,
                                        int threads, bool flash, std::string* command) {
  const std::string program = bin_dir + "/llama-batched-bench";
  std::string npl;
  for (int64_t b : batches) npl += (npl.empty() ? "" : ",") + std::to_string(b);
  std::vector<std::string> argv = {program,
                                   "-m",
                                   gguf,
                                   "-c",
                                   "16384",
                                   "-b",
                                   "2048",
                                   "-ub",
                                   "512",
                                   "-npp",
                                   "32",
                                   "-ntg",
                                   std::to_string(tokens),
                                   "-npl",
                                   npl,
                                   "-t",
                                   std::to_string(threads),
                                   "-tb",
                                   std::to_string(threads)};
  // Newer llama.cpp takes "-fa on|off|auto", older a bare "-fa" flag.
  if (help_of(program).find("on|off") != std::string::npos) {
    argv.insert(argv.end(), {"-fa", flash ? "on" : "off"});
  } else if (flash) {
    argv.push_back("-fa");
  }
  if (command->empty()) {
    for (const auto& a : argv) *command += (command->empty() ? "" : " ") + a;
  }
  const tessera::CommandResult run = tessera::run_command(argv, std::chrono::hours(1), false);
  TESSERA_CHECK(run.status.success(), Unavailable, "llama-batched-bench ", run.status.describe(),
                ":\n", run.output);
  std::map<int64_t, double> out;
  std::stringstream lines(run.output);
  std::string line;
  while (std::getline(lines, line)) {
    // |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s | ...
    std::vector<std::string> cells;
    std::stringstream ss(line);
    std::string cell;
    while (std::getline(ss, cell, '|')) cells.push_back(cell);
    if (cells.size() < 9) continue;
    try {
      out[std::stoll(cells[3])] = std::stod(cells[8]);
    } catch (const std::exception&) {
      // header and separator rows
    }
  }
  TESSERA_CHECK(!out.empty(), DataLoss, "llama-batched-bench printed no result rows:\n",
                run.output);
  return out;
}

std::optional<int> parse(int argc, char** argv, Options* o) {
  CLI::App app{
      "Decode throughput of fp32, W4A16, W4A4 and QSPEC at several batch sizes, with QSPEC's "
      "acceptance, each mode's peak memory (own process) and llama.cpp on the same 4-bit weights.",
      "qspec_bench"};
  app.option_defaults()->always_capture_default();
  app.add_option("--smollm2", o->smollm2, "SmolLM2-135M-Instruct GGUF file to measure");
  app.add_option("--tokens", o->tokens, "new tokens per sequence (no stop tokens)")
      ->check(tessera::examples::positive());
  app.add_option("--batches", o->batches, "batch sizes, comma-separated")
      ->delimiter(',')
      ->allow_extra_args(false)
      ->check(tessera::examples::positive());
  app.add_option("--gamma", o->gamma, "QSPEC draft length")->check(tessera::examples::at_least(0));
  app.add_flag("--random", o->random,
               "also measure a random llama (hidden 1024, 12 layers, vocabulary 32000)");
  app.add_option("--draft", o->draft, "QSPEC draft mode")->check(CLI::IsMember({"w4a4", "w4a8"}));
  app.add_option("--smooth", o->smooth,
                 "pack SmolLM2 with outlier smoothing of this alpha; negative: off");
  app.add_flag("--rotate", o->rotate, "pack SmolLM2 with Hadamard rotation of 64-input blocks");
  app.add_option("--llama-cpp", o->llama_cpp,
                 "llama.cpp's bin directory: also run llama-bench and llama-batched-bench "
                 "(default: skipped)");
  tessera::bench::add_repeat_options(app, o->rep);
  // Internal: how the program runs one mode in a child process of its own.
  app.add_option("--single-model", o->single_model, "internal: run one model (smollm2|random)")
      ->group("");
  app.add_option("--single-mode", o->single_mode, "internal: run one mode")->group("");
  app.add_option("--single-batch", o->single_batch, "internal: at one batch size")->group("");
  app.add_option("--single-json", o->single_json, "internal: write its numbers here")->group("");
  app.add_option("--model-file", o->model_file, "internal: the GGUF both sides load")->group("");
  return tessera::examples::parse_command_line(app, argc, argv);
}

}  // namespace

int main(int argc, char** argv) try {
  Options o;
  if (auto code = parse(argc, argv, &o)) return *code;
  auto info = tessera::init_runtime();
  if (!o.single_mode.empty()) return run_single(o);

  if (o.rep.quick) {
    o.batches = {1, 2};
    o.tokens = std::min<int64_t>(o.tokens, 4);
  }
  const std::string scratch =
      (fs::temp_directory_path() / ("tessera-qspec-bench-" + std::to_string(::getpid()))).string();
  fs::create_directories(scratch);
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  tessera::bench::Report report("qspec", argc, argv, o.rep.quick);
  std::printf(
      "qspec_bench: %d threads, BLAS %s, quant kernels %s, %lld new tokens per sequence, "
      "median of %d after %d warm-up\n",
      info.num_threads, info.blas_name.c_str(), tq::isa_name(tq::best_isa()),
      static_cast<long long>(o.tokens), o.rep.reps, o.rep.warmup);

  std::vector<std::string> models;
  int requantized = 0;
  if (!o.smollm2.empty()) {
    o.model_file = scratch + "/smollm2-all-q4_1.gguf";
    requantized = write_all_q4_1(o.smollm2, o.model_file);
    models.push_back("smollm2");
  }
  if (o.random || o.rep.quick) models.push_back("random");
  json model_info = json::object();
  std::map<int64_t, double> smollm2_w4a16;  // median decode tokens/s per batch
  for (const std::string& model : models) {
    std::map<std::pair<int64_t, std::string>, json> res;
    for (int64_t batch : o.batches) {
      for (const std::string& mode : kModes) {
        json j = run_child(o, self, model, mode, batch, scratch);
        res[{batch, mode}] = j;
        const std::string id = model + ".b" + std::to_string(batch) + "." + mode;
        const json labels = {
            {"model", model}, {"batch", batch}, {"mode", mode}, {"side", "tessera"}};
        report.add_series(id + ".tokens_per_s", "tokens/s",
                          j["tokens_per_s"].get<std::vector<double>>(), labels);
        if (j.contains("acceptance")) {
          report.add_series(id + ".acceptance", "fraction",
                            j["acceptance"].get<std::vector<double>>(), labels);
          report.add_series(id + ".mean_accepted", "tokens",
                            j["mean_accepted"].get<std::vector<double>>(), labels);
          report.add_series(id + ".tokens_per_verify", "tokens",
                            j["tokens_per_verify"].get<std::vector<double>>(), labels);
          report.facts()[id + ".steps_per_gamma"] = j["steps_per_gamma"];
        }
        report.facts()[id + ".peak_rss_mib"] = j["peak_rss_mib"];
        report.facts()[id + ".rss_after_load_mib"] = j["rss_after_load_mib"];
        report.facts()[id + ".kv_cache_bytes"] = j["kv_cache_bytes"];
        model_info[model] = {{"title", j["title"]},
                             {"packed_bytes", j["packed_bytes"]},
                             {"group_size", j["group_size"]}};
      }
    }
    std::printf("\n### %s\n\n", model_info[model]["title"].get<std::string>().c_str());
    std::printf(
        "| batch | fp32 | W4A16 | W4A4 | QSPEC | adaptive | QSPEC / W4A16 | acceptance | peak MiB "
        "W4A16 | peak MiB QSPEC | KV MiB W4A16 | KV MiB QSPEC |\n");
    std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int64_t batch : o.batches) {
      auto m = [&](const std::string& mode) {
        return tessera::bench::median(
            res[{batch, mode}]["tokens_per_s"].get<std::vector<double>>());
      };
      if (model == "smollm2") smollm2_w4a16[batch] = m("w4a16");
      const json& q = res[{batch, "qspec"}];
      const json& w = res[{batch, "w4a16"}];
      std::printf(
          "| %lld | %.1f | %.1f | %.1f | %.1f | %.1f | %.2fx | %.3f | %.0f | %.0f | %.1f | %.1f "
          "|\n",
          static_cast<long long>(batch), m("fp32"), m("w4a16"), m("w4a4"), m("qspec"),
          m("qspec_adaptive"), m("qspec") / m("w4a16"),
          tessera::bench::median(q["acceptance"].get<std::vector<double>>()),
          w["peak_rss_mib"].get<double>(), q["peak_rss_mib"].get<double>(),
          w["kv_cache_bytes"].get<double>() / 1048576, q["kv_cache_bytes"].get<double>() / 1048576);
    }
    std::fflush(stdout);
  }

  json llama = nullptr;
  if (!o.llama_cpp.empty() && !o.smollm2.empty()) {
    std::string bench_cmd, batched_cmd_off, batched_cmd_on;
    auto b1 =
        llama_bench(o.llama_cpp, o.model_file, o.tokens, info.num_threads, o.rep.reps, &bench_cmd);
    for (const auto& [fa, v] : b1) {
      report.add_series("smollm2.b1.llama_bench.fa" + std::to_string(fa) + ".tokens_per_s",
                        "tokens/s", v,
                        {{"model", "smollm2"},
                         {"batch", 1},
                         {"side", "llama.cpp"},
                         {"tool", "llama-bench"},
                         {"flash_attn", fa}});
    }
    std::map<std::pair<int, int64_t>, std::vector<double>> batched;
    for (int rep = 0; rep < o.rep.warmup + o.rep.reps; ++rep) {
      for (int fa : {0, 1}) {
        auto r = llama_batched(o.llama_cpp, o.model_file, o.batches, o.tokens, info.num_threads,
                               fa == 1, fa ? &batched_cmd_on : &batched_cmd_off);
        if (rep < o.rep.warmup) continue;
        for (const auto& [b, v] : r) batched[{fa, b}].push_back(v);
      }
    }
    for (const auto& [key, v] : batched) {
      report.add_series("smollm2.b" + std::to_string(key.second) + ".llama_batched.fa" +
                            std::to_string(key.first) + ".tokens_per_s",
                        "tokens/s", v,
                        {{"model", "smollm2"},
                         {"batch", key.second},
                         {"side", "llama.cpp"},
                         {"tool", "llama-batched-bench"},
                         {"flash_attn", key.first}});
    }
    llama = {{"bin_dir", o.llama_cpp},
             {"llama_bench_command", bench_cmd},
             {"batched_bench_command_fa_off", batched_cmd_off},
             {"batched_bench_command_fa_on", batched_cmd_on},
             {"threads", info.num_threads},
             {"prompt_tokens_batched", 32}};
    std::printf(
        "\nllama.cpp on the same all-Q4_1 GGUF, %d threads, decode tokens/s (median of %d):\n\n",
        info.num_threads, o.rep.reps);
    std::printf(
        "| batch | llama.cpp fa off | llama.cpp fa on | ours W4A16 |\n|---:|---:|---:|---:|\n");
    for (int64_t b : o.batches) {
      std::printf("| %lld | %.1f | %.1f | %.1f |\n", static_cast<long long>(b),
                  tessera::bench::median(batched[{0, b}]), tessera::bench::median(batched[{1, b}]),
                  smollm2_w4a16[b]);
    }
  }
  report.config() = {
      {"threads", info.num_threads},
      {"tokens", o.tokens},
      {"batches", o.batches},
      {"gamma", o.gamma},
      {"draft", o.draft},
      {"smooth", o.smooth},
      {"rotate", o.rotate},
      {"reps", o.rep.reps},
      {"warmup", o.rep.warmup},
      {"modes", kModes},
      {"models", model_info},
      {"quant_isa", tq::isa_name(tq::best_isa())},
      {"smollm2_gguf",
       o.smollm2.empty() ? json(nullptr) : json(fs::path(o.smollm2).filename().string())},
      {"requantized_to_q4_1", requantized},
      {"llama_cpp", llama}};
  report.write(o.rep.json);
  fs::remove_all(scratch);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "qspec_bench: %s\n", e.what());
  return 1;
}
