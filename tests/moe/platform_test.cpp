// The local function platform with real tessera-function processes: served
// MoE layer outputs equal the in-process layer for every method (with
// replicas and pipelined minibatches), the payload limit and the gate's
// fallback, billing per invocation, a function killed mid-request retried
// (or reported), keep-alive reclaim, memory and concurrency limits.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include "test_main.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <future>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/core/subprocess.h"
#include "tessera/dist/launcher.h"
#include "tessera/moe/platform.h"
#include "tessera/moe/storage.h"
#include "tessera/nn/loader.h"

namespace tessera::moe {
namespace {

namespace fs = std::filesystem;

struct Model {
  std::string dir =
      (fs::temp_directory_path() / ("tessera-platform-test-" + std::to_string(getpid()))).string();
  ExpertLayer layer;
  Model() {
    nn::ModelConfig c;
    c.model_type = "mixtral";
    c.vocab_size = 64;
    c.hidden_size = 64;
    c.intermediate_size = 128;
    c.num_hidden_layers = 1;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
    nn::write_random_model(dir, c, 9);
    layer = {dir + "/model.safetensors", "model.layers.0.block_sparse_moe.", 4, 2, true};
  }
  ~Model() { fs::remove_all(dir); }
};
Model* g_model = nullptr;

PlatformOptions options() {
  PlatformOptions o;
  o.program = TESSERA_FUNCTION_BIN;
  return o;
}

double relative_error(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

PlatformProfile profile() {
  PlatformProfile p;
  p.memory_mb = {256, 1024};
  p.t_cal = {1e-5, 1e-5};
  return p;
}

LayerPlan plan(Method m, int64_t beta, std::vector<int> replicas) {
  LayerPlan lp;
  lp.method = m;
  lp.beta = beta;
  for (size_t e = 0; e < replicas.size(); ++e)
    lp.experts.push_back({static_cast<int>(e % 2), replicas[e]});
  return lp;
}

TEST(Platform, ServedOutputsEqualTheInProcessLayerForEveryMethod) {
  FunctionPlatform platform(options());
  at::manual_seed(1);
  at::Tensor x = at::randn({200, 64});
  Routing r = route(g_model->layer, x);
  at::Tensor ref = moe_layer_reference(g_model->layer, x, r);
  ServerlessMoE gate(platform, g_model->layer, "layer0");
  int64_t invocations = 0;
  for (const LayerPlan& p :
       {plan(Method::kDirect, 0, {1, 1, 1, 1}), plan(Method::kIndirect, 0, {1, 3, 1, 2}),
        plan(Method::kPipelined, 16, {1, 1, 2, 1}), plan(Method::kDirect, 0, {2, 2, 2, 2})}) {
    SCOPED_TRACE(method_name(p.method));
    gate.configure(p, profile());
    ServerlessMoE::Stats s;
    at::Tensor y = gate.forward(x, r, &s);
    EXPECT_LT(relative_error(y, ref), 1e-5);
    int64_t expected = 0;
    for (const auto& e : p.experts) expected += e.replicas;
    EXPECT_EQ(s.invocations, expected);
    EXPECT_EQ(s.fallbacks, 0);
    invocations += s.invocations;
  }
  // Every invocation billed exactly as the price sheet says.
  const auto& calls = platform.meter().invocations();
  ASSERT_EQ(static_cast<int64_t>(calls.size()), invocations);
  const PriceSheet& prices = platform.meter().prices();
  double total = 0;
  for (const auto& c : calls) {
    const double billed = std::max(1.0, std::ceil(c.seconds * 1e3 - 1e-9)) / 1e3;
    EXPECT_DOUBLE_EQ(c.billed_seconds, billed);
    EXPECT_NEAR(c.cost, billed * c.memory_mb / 1024.0 * prices.gb_second + prices.per_request,
                1e-15);
    EXPECT_TRUE(c.memory_mb == 256 || c.memory_mb == 1024);
    total += c.cost;
  }
  EXPECT_NEAR(platform.meter().total_cost(), total, 1e-12);
  EXPECT_GT(platform.stats().cold_starts, 0);
  EXPECT_GT(platform.stats().warm_starts, 0);
}

TEST(Platform, ModelServedThroughTheGateEqualsTheInProcessModel) {
  FunctionPlatform platform(options());
  nn::Transformer model = nn::load_hf_model(g_model->dir);
  ServerlessMoE gate(platform, g_model->layer, "layer0");
  at::manual_seed(4);
  at::Tensor ids = at::randint(0, 64, {4, 24}, at::kLong);
  at::NoGradGuard no_grad;
  at::Tensor local = model.forward(ids).logits;
  for (const LayerPlan& p :
       {plan(Method::kDirect, 0, {1, 2, 1, 1}), plan(Method::kPipelined, 8, {1, 1, 1, 2})}) {
    gate.configure(p, profile());
    nn::ForwardOptions fo;
    int calls = 0;
    fo.expert_override = [&](int64_t layer, const at::Tensor& x, const at::Tensor& e,
                             const at::Tensor& w) {
      ++calls;
      EXPECT_EQ(layer, 0);
      return gate.forward(x, {e, w.to(at::kFloat)});
    };
    at::Tensor served = model.forward(ids, fo).logits;
    EXPECT_EQ(calls, 1);
    EXPECT_LT(relative_error(served, local), 1e-5) << method_name(p.method);
  }
}

// A real redis-server on a free loopback port for the Redis storage channel.
class RedisServer {
 public:
  RedisServer() {
    const char* candidates[] = {"/usr/bin/redis-server", "/usr/local/bin/redis-server"};
    for (const char* c : candidates) {
      if (fs::exists(c)) binary_ = c;
    }
    if (binary_.empty()) return;
    port_ = dist::free_port("127.0.0.1");
    SpawnOptions o;
    o.argv = {binary_,        "--port", std::to_string(port_), "--bind", "127.0.0.1",  "--save", "",
              "--appendonly", "no",     "--daemonize",         "no",     "--loglevel", "warning"};
    server_ = Subprocess::spawn(o);
    for (int i = 0; i < 100; ++i) {  // wait until it answers
      try {
        StorageChannel::open(url())->remove("probe");
        return;
      } catch (const Error&) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }
  }
  ~RedisServer() {
    if (server_.valid()) server_.stop(std::chrono::seconds(5));
  }
  bool available() const { return !binary_.empty(); }
  std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_); }

 private:
  std::string binary_;
  int port_ = 0;
  Subprocess server_;
};

TEST(Platform, RedisStorageChannelServesIndirectAndPipelinedTransfers) {
#ifndef TESSERA_WITH_REDIS
  TESSERA_REQUIRE_INSTALLED(false,
                            "a Redis client in this build (libhiredis-dev at configure time)");
#endif
  RedisServer redis;
  TESSERA_REQUIRE_INSTALLED(redis.available(), "redis-server");
  auto channel = StorageChannel::open(redis.url());
  at::Tensor t = at::randn({3, 5});
  channel->put("k", t);
  EXPECT_TRUE(at::equal(channel->get("k"), t));
  channel->remove("k");
  EXPECT_THROW(channel->get("k", std::chrono::milliseconds(50)), NotFound);
  PlatformOptions o = options();
  o.storage = redis.url();
  FunctionPlatform platform(o);
  at::manual_seed(6);
  at::Tensor x = at::randn({150, 64});
  Routing r = route(g_model->layer, x);
  at::Tensor ref = moe_layer_reference(g_model->layer, x, r);
  ServerlessMoE gate(platform, g_model->layer, "layer0");
  for (const LayerPlan& p :
       {plan(Method::kIndirect, 0, {1, 2, 1, 1}), plan(Method::kPipelined, 16, {1, 1, 2, 1})}) {
    gate.configure(p, profile());
    EXPECT_LT(relative_error(gate.forward(x, r), ref), 1e-5) << method_name(p.method);
  }
  EXPECT_THROW(StorageChannel::open("ftp://nowhere"), InvalidArgument);
}

TEST(Platform, PayloadLimitIsEnforcedAndTheGateFallsBackToStorage) {
  PlatformOptions o = options();
  o.prices.payload_limit_bytes = 8 << 10;  // 8 KiB: 32 tokens of 64 floats
  FunctionPlatform platform(o);
  platform.deploy("f", {g_model->layer.weights, g_model->layer.prefix + "experts.0.", 512});
  try {
    platform.invoke("f", {at::randn({100, 64}), {}, std::chrono::seconds(0)});
    ADD_FAILURE() << "no error";
  } catch (const ResourceExhausted& e) {
    EXPECT_NE(std::string(e.what()).find("invoke f"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(
      platform.invoke("f", {at::randn({8, 64}), {}, std::chrono::seconds(0)}).outputs.defined());
  at::manual_seed(2);
  at::Tensor x = at::randn({120, 64});
  Routing r = route(g_model->layer, x);
  ServerlessMoE gate(platform, g_model->layer, "layer0");
  gate.configure(plan(Method::kDirect, 0, {1, 1, 1, 1}), profile());
  ServerlessMoE::Stats s;
  at::Tensor y = gate.forward(x, r, &s);
  EXPECT_GT(s.fallbacks, 0);
  EXPECT_LT(relative_error(y, moe_layer_reference(g_model->layer, x, r)), 1e-5);
}

// Regression (found by fuzz/moe_function_request_fuzz.cpp): the function
// turned wait_seconds into milliseconds with std::llround, so a NaN or a
// wait beyond int64 milliseconds (here: milliseconds::max(), "for ever")
// overflowed (UBSan: signed integer overflow in the deadline) instead of
// being refused with INVALID_ARGUMENT.
TEST(Platform, FuzzWaitBeyondADayIsInvalidArgument) {
  FunctionPlatform platform(options());
  platform.deploy("f", {g_model->layer.weights, g_model->layer.prefix + "experts.0.", 512});
  platform.put("in", at::randn({4, 64}));
  for (auto wait :
       {std::chrono::milliseconds::max(), std::chrono::milliseconds(int64_t{90000} * 1000)}) {
    try {
      platform.invoke("f", {at::Tensor(), {"in"}, wait});
      ADD_FAILURE() << "no error for a wait of " << wait.count() << " ms";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("wait_seconds"), std::string::npos) << e.what();
    }
  }
  // A day is still accepted (the key is there, so nothing waits).
  EXPECT_EQ(platform.invoke("f", {at::Tensor(), {"in"}, std::chrono::hours(24)}).attempts, 1);
}

TEST(Platform, KilledFunctionIsRetriedOrReported) {
  for (int retries : {1, 0}) {
    SCOPED_TRACE(testing::Message() << retries << " retries");
    PlatformOptions o = options();
    o.retries = retries;
    FunctionPlatform platform(o);
    platform.deploy("f", {g_model->layer.weights, g_model->layer.prefix + "experts.1.", 512});
    const std::string key = platform.storage_key("waiting");
    platform.invoke("f", {at::randn({2, 64}), {}, std::chrono::seconds(0)});  // a warm instance
    const std::vector<long> pids = platform.instance_pids("f");
    ASSERT_EQ(pids.size(), 1u);
    // The request waits for its input; the instance is killed meanwhile.
    auto call = std::async(std::launch::async, [&] {
      return platform.invoke("f", {at::Tensor(), {key}, std::chrono::seconds(10)});
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ::kill(static_cast<pid_t>(pids[0]), SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    at::Tensor x = at::randn({5, 64});
    platform.put(key, x);
    if (retries == 1) {
      FunctionPlatform::Result res = call.get();
      EXPECT_EQ(res.attempts, 2);
      EXPECT_EQ(platform.stats().retries, 1);
      EXPECT_EQ(platform.get(key + ".out").sizes(), x.sizes());
      EXPECT_EQ(platform.meter().invocations().size(), 3u);  // the failed attempt is billed too
    } else {
      try {
        call.get();
        ADD_FAILURE() << "no error";
      } catch (const Unavailable& e) {
        EXPECT_NE(std::string(e.what()).find("function 'f'"), std::string::npos) << e.what();
      }
    }
  }
}

TEST(Platform, KeepAliveMemoryAndConcurrencyLimits) {
  PlatformOptions o = options();
  o.keep_alive = std::chrono::milliseconds(500);
  o.concurrency_limit = 2;
  FunctionPlatform platform(o);
  platform.deploy("f", {g_model->layer.weights, g_model->layer.prefix + "experts.2.", 128});
  EXPECT_TRUE(platform.invoke("f", {at::randn({4, 64}), {}, std::chrono::seconds(0)}).cold_start);
  EXPECT_FALSE(platform.invoke("f", {at::randn({4, 64}), {}, std::chrono::seconds(0)}).cold_start);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_TRUE(platform.instance_pids("f").empty());
  EXPECT_GE(platform.stats().reclaimed, 1);
  EXPECT_TRUE(platform.invoke("f", {at::randn({4, 64}), {}, std::chrono::seconds(0)}).cold_start);
  // 128 MB cannot hold the working set of 100k tokens (through storage).
  const std::string key = platform.storage_key("big");
  platform.put(key, at::zeros({100000, 64}));
  try {
    platform.invoke("f", {at::Tensor(), {key}, std::chrono::seconds(1)});
    ADD_FAILURE() << "no error";
  } catch (const ResourceExhausted& e) {
    EXPECT_NE(std::string(e.what()).find("128 MB"), std::string::npos) << e.what();
  }
  // Six concurrent invocations never run on more than two instances.
  std::vector<std::future<FunctionPlatform::Result>> calls;
  for (int i = 0; i < 6; ++i) {
    calls.push_back(std::async(std::launch::async, [&] {
      return platform.invoke("f", {at::randn({64, 64}), {}, std::chrono::seconds(0)});
    }));
  }
  for (auto& c : calls) c.get();
  EXPECT_LE(platform.stats().instances, 2);
  EXPECT_LE(platform.instance_pids("f").size(), 2u);
}

}  // namespace
}  // namespace tessera::moe

int main(int argc, char** argv) {
  tessera::init_runtime();
  ::testing::InitGoogleTest(&argc, argv);
  tessera::moe::Model model;
  tessera::moe::g_model = &model;
  return tessera::testutil::run_all_tests();
}
