// The gRPC Generation service on a real server on loopback, against the
// engine it serves: streamed outputs equal what Engine::submit gives
// (tokens, text, log-probabilities, seeded samples), concurrent streams do
// not mix, a client that cancels or runs out of time aborts its request and
// every KV block comes back, bad requests and wrong keys get the right
// error and the server keeps serving; tessera-serve --grpc-port end to end.
#include "tessera/serve/grpc.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "byte_tokenizer.h"
#include "tessera/core/error.h"
#include "tessera/core/subprocess.h"
#include "tessera/nn/loader.h"
#include "test_main.h"

namespace fs = std::filesystem;

namespace tessera::serve {
namespace {

constexpr int64_t kEos = 256;

// A random llama (vocabulary 300) with a byte tokenizer whose EOS is 256
// and a ChatML template. `wide`: 16x the weights, so that a long answer
// takes long enough (seconds) to be cancelled while it runs.
std::string write_model(const std::string& name, bool wide) {
  const fs::path d =
      fs::path(::testing::TempDir()) / ("tessera_grpc_" + name + "_" + std::to_string(getpid()));
  fs::remove_all(d);
  nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 300;
  c.hidden_size = wide ? 256 : 64;
  c.intermediate_size = wide ? 1024 : 128;
  c.num_hidden_layers = wide ? 8 : 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 512;
  c.eos_token_ids = {kEos};
  nn::write_random_model(d.string(), c, 5);
  testutil::write_byte_tokenizer(d.string(), {"<|endoftext|>", "<|im_start|>", "<|im_end|>"},
                                 "<|endoftext|>");
  return d.string();
}

const std::string& model_dir() {
  static const std::string dir = write_model("model", false);
  return dir;
}

const std::string& wide_model_dir() {
  static const std::string dir = write_model("wide", true);
  return dir;
}

EngineOptions engine_options(const std::string& model = model_dir()) {
  EngineOptions o;
  o.model = model;
  o.num_blocks = 96;
  o.block_size = 8;
  o.max_num_seqs = 8;
  o.max_num_batched_tokens = 64;
  o.num_threads = 1;
  return o;
}

// Engine and server, started once per test.
struct Served {
  std::unique_ptr<Engine> engine;
  std::unique_ptr<GrpcServer> server;
  explicit Served(GrpcServerOptions so = {}, EngineOptions eo = engine_options()) {
    engine = Engine::create(eo);
    server = GrpcServer::start(*engine, so);
  }
};

// What Engine::submit gives for a request, collected per sample.
std::vector<Completion> direct(Engine& engine, const GenerateRequest& r) {
  std::mutex mu;
  std::vector<Completion> out(static_cast<size_t>(r.params.n));
  RequestHandle h = engine.submit(r, [&](const TokenEvent& e) {
    std::lock_guard<std::mutex> lock(mu);
    Completion& c = out[static_cast<size_t>(e.index)];
    if (e.completion_tokens > 0) {
      c.tokens.insert(c.tokens.end(), e.tokens.begin(), e.tokens.end());
      c.text += e.text;
      c.logprobs.insert(c.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
    }
    c.prompt_tokens = e.prompt_tokens;
    if (e.finished) c.finish_reason = e.finish_reason;
  });
  EXPECT_TRUE(h.wait(std::chrono::minutes(2)));
  return out;
}

GenerateRequest greedy(const std::string& prompt, int64_t max_tokens) {
  GenerateRequest r;
  r.prompt_text = prompt;
  r.params.temperature = 0;
  r.params.max_tokens = max_tokens;
  r.params.ignore_eos = true;
  return r;
}

void expect_same(const std::vector<Completion>& got, const std::vector<Completion>& want,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].tokens, want[i].tokens) << what << ", sample " << i;
    EXPECT_EQ(got[i].text, want[i].text) << what << ", sample " << i;
    EXPECT_EQ(got[i].logprobs, want[i].logprobs) << what << ", sample " << i;
    EXPECT_EQ(got[i].finish_reason, want[i].finish_reason) << what << ", sample " << i;
    EXPECT_EQ(got[i].prompt_tokens, want[i].prompt_tokens) << what << ", sample " << i;
  }
}

// Waits until no request runs or waits and every block is free.
void expect_all_blocks_free(Engine& engine) {
  EngineStats st;
  for (int i = 0; i < 200; ++i) {
    st = engine.stats();
    if (st.running == 0 && st.waiting == 0 && st.free_blocks == st.num_blocks) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ADD_FAILURE() << "after 5 s: running " << st.running << ", waiting " << st.waiting << ", free "
                << st.free_blocks << " of " << st.num_blocks << " blocks";
}

template <typename E, typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("wrong exception: ") + e.what();
  }
  return "no exception";
}

TEST(GrpcGeneration, StreamsWhatTheEngineGives) {
  Served s;
  GenerationClient client(s.server->address());
  // Greedy with log-probabilities and a stop string, a seeded sampled
  // request with two samples, token-id prompts and echo.
  GenerateRequest g = greedy("The quick brown fox", 24);
  g.params.logprobs = 2;
  expect_same(client.complete(g), direct(*s.engine, g), "greedy with logprobs");
  GenerateRequest sampled = greedy("jumps over", 20);
  sampled.params.temperature = 0.9;
  sampled.params.top_p = 0.95;
  sampled.params.seed = 1234;
  sampled.params.n = 2;
  sampled.params.stop = {"e"};
  const auto remote = client.complete(sampled);
  expect_same(remote, direct(*s.engine, sampled), "seeded n = 2");
  GenerateRequest ids;
  ids.prompt_tokens = {10, 20, 30, 40, 50, 60};
  ids.params.temperature = 0;
  ids.params.max_tokens = 9;
  ids.params.logprobs = 0;
  ids.echo = true;
  expect_same(client.complete(ids), direct(*s.engine, ids), "token ids with echo");

  // Events stream one step at a time, with top alternatives when asked.
  std::vector<TokenEvent> events;
  client.generate(g, [&](const TokenEvent& e) {
    events.push_back(e);
    return true;
  });
  ASSERT_EQ(events.size(), 24u);
  EXPECT_EQ(events[0].top_logprobs.size(), 1u);
  EXPECT_EQ(events[0].top_logprobs[0].size(), 2u);
  EXPECT_GT(events[0].ttft_seconds, 0);
  EXPECT_TRUE(events.back().finished);
  EXPECT_EQ(events.back().finish_reason, "length");
  EXPECT_EQ(events.back().completion_tokens, 24);
  expect_all_blocks_free(*s.engine);
}

TEST(GrpcGeneration, ChatTokenizeAndInfo) {
  Served s;
  GenerationClient client(s.server->address());
  const std::vector<nn::ChatMessage> messages = {{"system", "Be brief."},
                                                 {"user", "What is 2 + 3?"}};
  SamplingParams p;
  p.temperature = 0;
  p.max_tokens = 12;
  GenerateRequest r;
  r.prompt_text = s.engine->apply_chat_template(messages);
  r.params = p;
  expect_same(client.chat(messages, p), direct(*s.engine, r), "chat");
  EXPECT_EQ(client.tokenize("hi <|im_end|>"), s.engine->tokenize("hi <|im_end|>"));
  EXPECT_EQ(client.tokenize("hi <|im_end|>").back(), kEos + 2);
  const ServerInfo info = client.info();
  EXPECT_EQ(info.model_name, s.engine->model_name());
  EXPECT_EQ(info.max_model_len, 512);
  EXPECT_EQ(info.vocab_size, 300);
  EXPECT_TRUE(info.serving);
  // generate_chat refuses a request that also brings a prompt.
  GenerateRequest both = r;
  EXPECT_THROW(client.generate_chat(messages, both, nullptr), InvalidArgument);
}

TEST(GrpcGeneration, ConcurrentStreamsDoNotMix) {
  Served s;
  GenerationClient client(s.server->address());
  constexpr int kStreams = 24;
  std::vector<GenerateRequest> requests;
  std::vector<std::vector<Completion>> sequential;
  for (int i = 0; i < kStreams; ++i) {
    requests.push_back(greedy("request " + std::to_string(i * 7919) + ":", 6 + i % 11));
    sequential.push_back(client.complete(requests.back()));
  }
  std::vector<std::vector<Completion>> concurrent(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] { concurrent[i] = client.complete(requests[i]); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    expect_same(concurrent[i], sequential[i], "stream " + std::to_string(i));
  }
  expect_all_blocks_free(*s.engine);
}

TEST(GrpcGeneration, CancelledAndTimedOutCallsAbortTheirRequests) {
  // The wide model: 480 tokens take seconds, so both requests are still
  // running when their calls end, and must be aborted, not finished.
  Served s(GrpcServerOptions{}, engine_options(wide_model_dir()));
  GenerationClient client(s.server->address());
  int seen = 0;
  client.generate(greedy("a long answer", 480), [&](const TokenEvent&) { return ++seen < 3; });
  EXPECT_EQ(seen, 3);
  expect_all_blocks_free(*s.engine);
  EXPECT_LT(s.engine->stats().generation_tokens, 240) << "the cancelled request ran on";

  GenerationClientOptions hurried;
  hurried.timeout = std::chrono::milliseconds(150);
  GenerationClient impatient(s.server->address(), hurried);
  const std::string message = error_of<DeadlineExceeded>(
      [&] { impatient.generate(greedy("an even longer answer", 480), nullptr); });
  EXPECT_NE(message.find("Generate to " + s.server->address()), std::string::npos) << message;
  expect_all_blocks_free(*s.engine);
  EXPECT_LT(s.engine->stats().generation_tokens, 480) << "the timed-out request ran on";
  // The server still serves.
  EXPECT_EQ(client.complete(greedy("still there?", 3))[0].tokens.size(), 3u);
}

TEST(GrpcGeneration, BadRequestsNameTheProblemAndTheServerStaysUp) {
  Served s;
  GenerationClient client(s.server->address());
  auto expect_invalid = [&](const GenerateRequest& r, const std::string& part) {
    const std::string message = error_of<InvalidArgument>([&] { client.complete(r); });
    EXPECT_NE(message.find(part), std::string::npos) << message;
    EXPECT_NE(message.find("Generate to "), std::string::npos) << message;
  };
  GenerateRequest r = greedy("", 4);
  expect_invalid(r, "empty");
  r = greedy("x", 4);
  r.adapter = "nope";
  expect_invalid(r, "nope");
  r = greedy("x", 4);
  r.params.temperature = -1;
  expect_invalid(r, "temperature");
  r = greedy(std::string(600, 'y'), 4);
  expect_invalid(r, "600");
  r = greedy("x", 4);
  r.params.n = 0;
  expect_invalid(r, "n must be in");
  EXPECT_THROW(client.chat({}, SamplingParams{}), InvalidArgument);
  GenerateRequest both = greedy("x", 4);
  both.prompt_tokens = {1, 2};
  EXPECT_THROW(client.complete(both), InvalidArgument);
  EXPECT_EQ(client.complete(greedy("fine", 5))[0].tokens.size(), 5u);
  expect_all_blocks_free(*s.engine);
}

TEST(GrpcGeneration, ApiKeyAndLimits) {
  GrpcServerOptions so;
  so.api_key = "sesame";
  so.max_concurrent_requests = 1;
  Served s(so);
  GenerationClient anonymous(s.server->address());
  EXPECT_NE(error_of<FailedPrecondition>([&] { anonymous.info(); }).find("API key"),
            std::string::npos);
  GenerationClientOptions wrong, right;
  wrong.api_key = "open";
  right.api_key = "sesame";
  GenerationClient intruder(s.server->address(), wrong);
  EXPECT_THROW(intruder.complete(greedy("x", 2)), FailedPrecondition);
  GenerationClient client(s.server->address(), right);
  EXPECT_EQ(client.complete(greedy("x", 2))[0].tokens.size(), 2u);

  // One call streams; a second one is refused until it ends.
  std::mutex mu;
  std::condition_variable cv;
  bool started = false, release = false;
  std::thread first([&] {
    client.generate(greedy("hold the line", 300), [&](const TokenEvent&) {
      std::unique_lock<std::mutex> lock(mu);
      started = true;
      cv.notify_all();
      return !release;
    });
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return started; });
  }
  const std::string refused =
      error_of<ResourceExhausted>([&] { client.complete(greedy("me too", 2)); });
  EXPECT_NE(refused.find("limit of 1"), std::string::npos) << refused;
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  first.join();
  expect_all_blocks_free(*s.engine);
}

TEST(GrpcGeneration, DrainAndShutdown) {
  Served s;
  GenerationClient client(s.server->address());
  ASSERT_TRUE(s.engine->drain(std::chrono::seconds(5)));
  EXPECT_FALSE(client.info().serving);
  EXPECT_THROW(client.complete(greedy("late", 2)), FailedPrecondition);
  const std::string address = s.server->address();
  s.server->shutdown(std::chrono::milliseconds(100));
  s.server->shutdown(std::chrono::milliseconds(100));  // idempotent
  GenerationClientOptions quick;
  quick.timeout = std::chrono::seconds(2);
  GenerationClient gone(address, quick);
  const std::string message = error_of<Error>([&] { gone.info(); });
  EXPECT_TRUE(message.find("UNAVAILABLE") != std::string::npos ||
              message.find("DEADLINE_EXCEEDED") != std::string::npos)
      << message;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// tessera-serve --grpc-port 0: the service comes up beside HTTP, answers as
// the in-process engine does, and SIGTERM still drains and exits 0.
TEST(GrpcGeneration, TesseraServeGrpcPort) {
  const fs::path logs =
      fs::path(::testing::TempDir()) / ("tessera_grpc_serve_" + std::to_string(getpid()));
  fs::create_directories(logs);
  SpawnOptions o;
  o.argv = {TESSERA_SERVE_BIN,
            "--model",
            model_dir(),
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--threads",
            "1",
            "--kv-blocks",
            "96",
            "--block-size",
            "8"};
  o.stdout_mode = SpawnOptions::Stream::kFile;
  o.stdout_file = (logs / "serve.out").string();
  o.stderr_mode = SpawnOptions::Stream::kFile;
  o.stderr_file = (logs / "serve.err").string();
  Subprocess server = Subprocess::spawn(o);
  std::string address;
  const std::string marker = "gRPC Generation service on ";
  for (int i = 0; i < 600 && server.running() && address.empty(); ++i) {
    const std::string out = read_text(logs / "serve.out");
    const size_t at = out.find(marker);
    if (at != std::string::npos && out.find('\n', at) != std::string::npos) {
      address = out.substr(at + marker.size());
      address = address.substr(0, address.find('\n'));
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ASSERT_FALSE(address.empty()) << "tessera-serve did not start: " << read_text(logs / "serve.err");
  GenerationClient client(address);
  const GenerateRequest r = greedy("over the wire", 10);
  Served local;
  expect_same(client.complete(r), direct(*local.engine, r), "tessera-serve");
  EXPECT_EQ(client.info().vocab_size, 300);
  server.signal(SIGTERM);
  const std::optional<ExitStatus> status = server.wait_for(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value()) << "no exit 30 s after SIGTERM";
  EXPECT_TRUE(status->success()) << status->describe() << "\n" << read_text(logs / "serve.err");
  fs::remove_all(logs);
}

}  // namespace
}  // namespace tessera::serve
