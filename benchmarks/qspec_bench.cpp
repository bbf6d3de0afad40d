// Decode throughput of fp32, W4A16, W4A4 and QSPEC at several batch sizes,
// measured in one run, with QSPEC's acceptance rate, mean accepted length
// and peak memory next to W4A16's.
//
//   qspec_bench --smollm2 PATH [--tokens 32] [--batches 1,4,16,32] [--gamma 3]
//               [--random] [--draft w4a4|w4a8] [--smooth ALPHA] [--rotate]
//               [--llama-cpp BIN_DIR]
//
// Models: SmolLM2-135M-Instruct from its GGUF (dequantized to fp32, then
// packed to int4 with group 64) on chat prompts, and with --random a larger
// randomly initialised llama (hidden 1024, 12 layers, intermediate 4096,
// vocabulary 32000) on random prompts. Every sequence generates exactly
// --tokens new tokens (no stop tokens) so all modes do the same work.
// tokens/s = decode throughput: tokens after the first (which the prefill
// yields) / decode wall time. fp32 runs
// nn::generate (BLAS); the packed modes run specdec::generate (batch-invariant
// forwards). Peak memory: the process's resident high-water mark (VmHWM,
// reset through /proc/self/clear_refs before each run), so it includes the
// model; "extra" is QSPEC's peak minus W4A16's at the same batch. "adaptive"
// lets QSPEC pick gamma in [0, gamma + 1] from measured throughput (0 is
// plain W4A16 decoding). --smooth ALPHA packs SmolLM2 with outlier smoothing
// calibrated on four other chat prompts; --rotate packs it with Hadamard
// rotation of every 64-input block (QuantConfig::rotate).
//
// --llama-cpp BIN_DIR (from scripts/build-llama-cpp.sh) also runs llama.cpp's
// llama-batched-bench on the same SmolLM2 Q4_1 GGUF in this run, same thread
// count, prompts of 32 tokens, --tokens generated per sequence, and prints
// its decode tokens/s (S_TG) per batch next to ours.
//
// Defaults: --tokens 32, --batches 1,4,16,32, --gamma 3, --draft w4a4, no
// smoothing, no rotation. --help lists every option.
#include <ATen/ATen.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/core/subprocess.h"
#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/specdec/qspec.h"

namespace tn = tessera::nn;
namespace tq = tessera::quant;
namespace ts = tessera::specdec;

namespace {

void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

double peak_mib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0;
}

// Per batch size: W4A16's decode tokens/s and the fastest mode's.
struct BatchSpeed {
  double w4a16 = 0;
  std::string best_mode;
  double best = 0;
};

std::map<int64_t, BatchSpeed> run_model(const std::string& title, tn::Transformer& model, tq::QuantizedModel& packed,
               const std::vector<std::vector<int64_t>>& pool, const std::vector<int64_t>& batches,
               int64_t tokens, int64_t gamma, tq::Mode draft) {
  std::printf("\n### %s\n\n", title.c_str());
  std::printf("packed weights %.1f MiB; group %lld; draft %s, verify w4a16, gamma %lld\n\n",
              packed.bytes() / 1048576.0, static_cast<long long>(packed.config().group_size),
              tq::mode_name(draft), static_cast<long long>(gamma));
  std::printf("| batch | fp32 tok/s | W4A16 tok/s | W4A4 tok/s | QSPEC tok/s | QSPEC / W4A16 | acceptance | mean accepted | tokens per verify | adaptive QSPEC tok/s | adaptive / W4A16 | adaptive steps per gamma 0..%lld | peak MiB W4A16 | peak MiB QSPEC | extra |\n",
              static_cast<long long>(gamma + 1));
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n");
  std::map<int64_t, BatchSpeed> speeds;
  for (int64_t B : batches) {
    std::vector<std::vector<int64_t>> prompts;
    for (int64_t i = 0; i < B; ++i) prompts.push_back(pool[i % pool.size()]);
    double tps[5] = {0, 0, 0, 0, 0}, mib[5] = {0, 0, 0, 0, 0};
    ts::SpecStats stats, adaptive;
    for (int mode = 0; mode < 5; ++mode) {
      reset_peak();
      int64_t produced = 0;
      double seconds = 0;
      if (mode == 0) {
        auto saved = model.linear_override();
        model.set_linear_override(nullptr);
        tn::SamplingOptions so;
        so.max_new_tokens = tokens;
        auto r = tn::generate(model, prompts, so);
        produced = r.new_tokens - B;
        seconds = r.decode_seconds;
        model.set_linear_override(saved);
      } else {
        ts::GenerateOptions o;
        ts::parse_decoding(mode == 1 ? "w4a16" : mode == 2 ? "w4a4" : "qspec", &o);
        o.sampling.max_new_tokens = tokens;
        o.qspec.gamma = gamma;
        o.qspec.draft_mode = draft;
        if (mode == 4) {  // gamma chosen by measured throughput, 0 (plain) allowed
          o.qspec.adaptive_gamma = true;
          o.qspec.min_gamma = 0;
          o.qspec.max_gamma = gamma + 1;
        }
        auto r = ts::generate(model, packed, prompts, o);
        produced = r.new_tokens - B;
        seconds = r.decode_seconds;
        if (mode == 3) stats = r.stats;
        if (mode == 4) adaptive = r.stats;
      }
      tps[mode] = produced / seconds;
      mib[mode] = peak_mib();
    }
    const char* names[5] = {"fp32", "W4A16", "W4A4", "QSPEC", "adaptive QSPEC"};
    int best = 0;
    for (int i = 1; i < 5; ++i) best = tps[i] > tps[best] ? i : best;
    speeds[B] = {tps[1], names[best], tps[best]};
    std::string per_gamma;
    for (size_t g = 0; g < adaptive.steps_per_gamma.size(); ++g) {
      per_gamma += (g ? "/" : "") + std::to_string(adaptive.steps_per_gamma[g]);
    }
    std::printf("| %lld | %.1f | %.1f | %.1f | %.1f | %.2fx | %.3f | %.2f | %.2f | %.1f | %.2fx | %s | %.0f | %.0f | %+.1f%% |\n",
                static_cast<long long>(B), tps[0], tps[1], tps[2], tps[3], tps[3] / tps[1],
                stats.acceptance_rate(), stats.mean_accepted(), stats.tokens_per_verify(), tps[4], tps[4] / tps[1],
                per_gamma.c_str(), mib[1], mib[3], 100.0 * (mib[3] - mib[1]) / mib[1]);
    std::fflush(stdout);
  }
  return speeds;
}

// llama-batched-bench's decode tokens/s (S_TG) per batch size.
std::map<int64_t, double> llama_cpp_decode(const std::string& bin_dir, const std::string& gguf,
                                           const std::vector<int64_t>& batches, int64_t tokens,
                                           int threads) {
  std::string npl;
  for (int64_t b : batches) npl += (npl.empty() ? "" : ",") + std::to_string(b);
  const tessera::CommandResult run = tessera::run_command(
      {bin_dir + "/llama-batched-bench", "-m", gguf, "-c", "16384", "-b", "2048", "-ub", "512", "-npp", "32",
       "-ntg", std::to_string(tokens), "-npl", npl, "-t", std::to_string(threads)},
      std::chrono::hours(1), /*merge_stderr=*/false);
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
  return out;
}

}  // namespace

int main(int argc, char** argv) try {
  {
    std::string smollm2;
    std::vector<int64_t> batches = {1, 4, 16, 32};
    int64_t tokens = 32, gamma = 3;
    bool random = false;
    std::string llama_cpp;
    double smooth = -1;
    bool rotate = false;
    std::string draft_name = "w4a4";
    CLI::App app{
        "Decode throughput of fp32, W4A16, W4A4 and QSPEC at several batch sizes, with "
        "QSPEC's acceptance and peak memory.",
        "qspec_bench"};
    app.option_defaults()->always_capture_default();
    app.add_option("--smollm2", smollm2, "SmolLM2-135M-Instruct GGUF file to measure");
    app.add_option("--tokens", tokens, "new tokens per sequence (no stop tokens)")
        ->check(tessera::examples::positive());
    app.add_option("--batches", batches, "batch sizes, comma-separated")
        ->delimiter(',')
        ->allow_extra_args(false)
        ->check(tessera::examples::positive());
    app.add_option("--gamma", gamma, "QSPEC draft length")->check(tessera::examples::at_least(0));
    app.add_flag("--random", random,
                 "also measure a random llama (hidden 1024, 12 layers, vocabulary 32000)");
    app.add_option("--draft", draft_name, "QSPEC draft mode")
        ->check(CLI::IsMember({"w4a4", "w4a8"}));
    app.add_option("--smooth", smooth,
                   "pack SmolLM2 with outlier smoothing of this alpha; negative: off");
    app.add_flag("--rotate", rotate, "pack SmolLM2 with Hadamard rotation of 64-input blocks");
    app.add_option("--llama-cpp", llama_cpp,
                   "llama.cpp's bin directory: also run llama-batched-bench (default: skipped)");
    if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
    const tq::Mode draft = tq::parse_mode(draft_name);
    auto info = tessera::init_runtime();
    std::printf("qspec_bench: %d threads, BLAS %s, quant kernels %s, %lld new tokens per sequence\n",
                info.num_threads, info.blas_name.c_str(), tq::isa_name(tq::best_isa()),
                static_cast<long long>(tokens));
    if (!smollm2.empty()) {
      auto loaded = tn::load_gguf_model(smollm2);
      std::vector<std::vector<int64_t>> calibration;
      for (const char* q : {"Tell me about the history of Rome.", "How do airplanes fly?",
                            "Give me a recipe for pancakes.", "What is machine learning?"}) {
        auto ids = loaded.tokenizer.encode(tn::format_chat(loaded.chat_template, {{"user", q}}));
        calibration.emplace_back(ids.begin(), ids.end());
      }
      const tq::QuantConfig qc{64, true, rotate};
      auto packed = smooth < 0 ? tq::QuantizedModel::pack(*loaded.model, qc)
                               : tq::QuantizedModel::pack(*loaded.model, qc, calibration, smooth);
      loaded.model->set_linear_override(packed);
      const char* questions[] = {"What is the capital of France?", "Name three colors.",
                                 "What is 2+2?", "Write a haiku about the sea.",
                                 "How many legs does a dog have?", "What is the opposite of hot?",
                                 "Explain gravity in one sentence.", "List the days of the week."};
      std::vector<std::vector<int64_t>> pool;
      for (const char* q : questions) {
        auto ids = loaded.tokenizer.encode(tn::format_chat(loaded.chat_template, {{"user", q}}));
        pool.emplace_back(ids.begin(), ids.end());
      }
      std::string title = "SmolLM2-135M-Instruct";
      if (smooth >= 0) title += ", smoothed (alpha " + std::to_string(smooth).substr(0, 4) + ")";
      if (rotate) title += ", Hadamard-rotated";
      auto speeds = run_model(title, *loaded.model, *packed, pool, batches, tokens, gamma, draft);
      if (!llama_cpp.empty()) {
        auto llama = llama_cpp_decode(llama_cpp, smollm2, batches, tokens, info.num_threads);
        std::printf("\nllama.cpp (llama-batched-bench, same GGUF, Q4_1 weights, %d threads, 32-token prompts), decode tokens/s:\n\n",
                    info.num_threads);
        std::printf("| batch | llama.cpp | ours W4A16 | ours / llama.cpp | ours best mode | best / llama.cpp |\n|---:|---:|---:|---:|---|---:|\n");
        for (int64_t b : batches) {
          auto it = llama.find(b);
          if (it == llama.end()) continue;
          const BatchSpeed& ours = speeds.at(b);
          std::printf("| %lld | %.1f | %.1f | %.2fx | %s %.1f | %.2fx |\n", static_cast<long long>(b),
                      it->second, ours.w4a16, ours.w4a16 / it->second, ours.best_mode.c_str(),
                      ours.best, ours.best / it->second);
        }
      }
    }
    if (random) {
      tn::ModelConfig c;
      c.model_type = "llama";
      c.vocab_size = 32000;
      c.hidden_size = 1024;
      c.intermediate_size = 4096;
      c.num_hidden_layers = 12;
      c.num_attention_heads = 16;
      c.num_key_value_heads = 4;
      tn::Transformer model(c);
      model.init_random(1);
      auto packed = tq::QuantizedModel::pack(model, {128, true});
      model.set_linear_override(packed);
      std::mt19937_64 rng(3);
      std::vector<std::vector<int64_t>> pool(8);
      for (auto& p : pool) {
        p.resize(16 + rng() % 16);
        for (auto& t : p) t = static_cast<int64_t>(rng() % c.vocab_size);
      }
      run_model("random llama, 1024 hidden x 12 layers (" + std::to_string(c.num_parameters() / 1000000) + "M parameters)",
                model, *packed, pool, batches, tokens, gamma, draft);
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "qspec_bench: %s\n", e.what());
  return 1;
}
