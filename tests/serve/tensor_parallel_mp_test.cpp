// Tensor-parallel serving on real ranks (tessera-launch --nproc 2): rank 0
// runs the engine, the other ranks follow its steps
// (Engine::run_tensor_parallel_rank). Greedy outputs and log-probabilities
// under load (preemption, chunked prefill, prefix hits) must equal batch-1
// generation on the same tensor-parallel model bit for bit.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <mutex>

#include "sampling.h"
#include "serve_test_models.h"
#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/serve/engine.h"
#include "test_main.h"

namespace fs = std::filesystem;

namespace tessera::serve {
namespace {

std::shared_ptr<dist::ProcessGroup> g_world;

using test::kEos;
using test::kVocab;
using test::mixed_prompts;
using test::tiny;

// Rank 0 writes a random model with the tests' byte-level tokenizer; every
// rank gets the folder's path.
std::string model_dir(const std::string& type, uint64_t seed) {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("tessera_tp_engine_" + std::to_string(getppid()) + "_" + type);
  if (g_world->rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    nn::write_random_model(dir.string(), tiny(type), seed);
    test::write_tokenizer(dir);
  }
  g_world->barrier().wait();
  return dir.string();
}

int64_t max_tokens_of(size_t i) { return 1 + static_cast<int64_t>((i * 7) % 16); }

// A tiny pool of 4-token blocks (preemption under load) and a 48-token
// step budget (chunked prefill), over the whole world as one tp group.
EngineOptions stress_options(const std::string& model) {
  EngineOptions o;
  o.model = model;
  o.block_size = 4;
  o.num_blocks = 40;
  o.max_num_seqs = 24;
  o.max_num_batched_tokens = 48;
  o.tensor_parallel = g_world;
  return o;
}

struct Output {
  std::vector<int64_t> tokens;
  std::vector<double> logprobs;
};

// Rank 0: every prompt at once (every other one with log-probabilities);
// the outputs in prompt order.
std::vector<Output> serve_all(Engine& engine, const std::vector<std::vector<int64_t>>& prompts) {
  std::mutex mu;
  std::vector<Output> out(prompts.size());
  std::vector<RequestHandle> handles;
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateRequest r;
    r.prompt_tokens = prompts[i];
    r.params.temperature = 0;
    r.params.max_tokens = max_tokens_of(i);
    r.params.priority = static_cast<int64_t>(i % 3);
    if (i % 2 == 1) r.params.logprobs = 0;
    handles.push_back(engine.submit(r, [&, i](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu);
      out[i].tokens.insert(out[i].tokens.end(), e.tokens.begin(), e.tokens.end());
      out[i].logprobs.insert(out[i].logprobs.end(), e.logprobs.begin(), e.logprobs.end());
    }));
  }
  for (auto& h : handles) EXPECT_TRUE(h.wait(std::chrono::minutes(10)));
  return out;
}

// Every rank: batch-1 greedy generation on the tensor-parallel model and
// the log-probability of each generated token under one batch-invariant
// forward over prompt + tokens (collective: all ranks call it alike).
Output reference(nn::Transformer& model, const std::vector<int64_t>& prompt, int64_t max_tokens) {
  nn::SamplingOptions so;
  so.max_new_tokens = max_tokens;
  so.stop_tokens = {kEos};
  so.batch_invariant = true;
  Output out;
  out.tokens = nn::generate(model, {prompt}, so).tokens[0];
  std::vector<int64_t> seq = prompt;
  seq.insert(seq.end(), out.tokens.begin(), out.tokens.end());
  nn::ForwardOptions f;
  f.batch_invariant = true;
  at::Tensor logits =
      model.forward(at::tensor(seq, at::kLong).view({1, -1}), f).logits[0].contiguous();
  for (size_t g = 0; g < out.tokens.size(); ++g) {
    const int64_t row = static_cast<int64_t>(prompt.size() + g) - 1;
    out.logprobs.push_back(
        detail::token_logprobs(logits[row].data_ptr<float>(), kVocab, out.tokens[g], 0).logprob);
  }
  return out;
}

void expect_matches_batch_one(const std::string& type, uint64_t seed) {
  SCOPED_TRACE(type);
  const std::string dir = model_dir(type, seed);
  const auto prompts = mixed_prompts(64, seed + 10);  // the same on every rank
  const EngineOptions options = stress_options(dir);
  std::vector<Output> served;
  if (g_world->rank() == 0) {
    auto engine = Engine::create(options);
    served = serve_all(*engine, prompts);
    const EngineStats st = engine->stats();
    EXPECT_GT(st.preemptions, 0) << "the pool was meant to be too small";
    EXPECT_GT(st.prefix_cache_hits, 0);
    EXPECT_EQ(st.free_blocks, st.num_blocks) << "blocks left allocated";
    // Adapters are not served under tensor parallelism.
    try {
      engine->load_adapter("a", dir);
      ADD_FAILURE() << "load_adapter under tp did not throw";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition) << e.what();
    }
  } else {
    Engine::run_tensor_parallel_rank(options);  // returns when rank 0's engine is gone
  }

  at::NoGradGuard no_grad;
  nn::Transformer model = nn::load_hf_model(dir, nn::ParallelGroups{g_world, nullptr});
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Output want = reference(model, prompts[i], max_tokens_of(i));
    if (g_world->rank() != 0) continue;
    EXPECT_EQ(served[i].tokens, want.tokens) << "request " << i;
    if (i % 2 == 1) {
      EXPECT_EQ(served[i].logprobs, want.logprobs)
          << "request " << i << ": log-probabilities differ from batch-1 forwards";
    }
  }
}

TEST(TensorParallelEngine, DenseGreedyMatchesBatchOneUnderLoad) {
  expect_matches_batch_one("llama", 1);
}

TEST(TensorParallelEngine, MoeGreedyMatchesBatchOneUnderLoad) {
  expect_matches_batch_one("mixtral", 2);
}

// Options a tensor-parallel engine cannot serve are refused on every rank
// before any rank waits for another; each rank must take its own role.
TEST(TensorParallelEngine, RefusesWhatItCannotServe) {
  const std::string dir = model_dir("llama", 1);
  auto expect_code = [](ErrorCode code, const std::function<void()>& f, const std::string& what) {
    try {
      f();
      ADD_FAILURE() << what << ": no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << what << ": " << e.what();
    }
  };
  EngineOptions quantized = stress_options(dir);
  quantized.quantization = "w4a16";
  EngineOptions adapters = stress_options(dir);
  adapters.adapters = {{"a", dir}};
  for (const EngineOptions* o : {&quantized, &adapters}) {
    if (g_world->rank() == 0) {
      expect_code(
          ErrorCode::kInvalidArgument, [&] { Engine::create(*o); }, "create");
    } else {
      expect_code(
          ErrorCode::kInvalidArgument, [&] { Engine::run_tensor_parallel_rank(*o); },
          "run_tensor_parallel_rank");
    }
  }
  const EngineOptions plain = stress_options(dir);
  if (g_world->rank() == 0) {
    expect_code(
        ErrorCode::kInvalidArgument, [&] { Engine::run_tensor_parallel_rank(plain); },
        "rank 0 following");
  } else {
    expect_code(
        ErrorCode::kInvalidArgument, [&] { Engine::create(plain); }, "rank 1 leading");
  }
  g_world->barrier().wait();
}

}  // namespace
}  // namespace tessera::serve

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  tessera::init_runtime();
  tessera::dist::InitOptions options;
  options.group.timeout = std::chrono::seconds(300);
  tessera::serve::g_world = tessera::dist::init_process_group(options);
  int result = tessera::testutil::run_all_tests();
  tessera::serve::g_world->barrier().wait();
  tessera::serve::g_world.reset();
  return result;
}
