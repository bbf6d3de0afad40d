// The serving engine with a vision-language model (a random-weight
// SmolVLM-layout folder): requests with images give the tokens of
// nn::generate_vlm at batch 1, also under load with a tiny KV pool and
// chunked prefill that splits images; the prefix cache never shares blocks
// between different images; bad image requests are refused with named
// errors; and tessera-serve's chat endpoint answers the `openai` client's
// image_url parts with the same tokens (tests/serve/vlm_http_check.py).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>

#include "byte_tokenizer.h"
#include "tessera/core/base64.h"
#include "tessera/core/error.h"
#include "tessera/core/subprocess.h"
#include "tessera/nn/image.h"
#include "tessera/nn/vlm.h"
#include "tessera/reason/model_client.h"
#include "tessera/serve/engine.h"
#include "tessera/serve/http_server.h"
#include "test_main.h"

namespace fs = std::filesystem;

namespace tessera::serve {
namespace {

fs::path scratch_dir(const std::string& name) {
  fs::path p = fs::path(::testing::TempDir()) /
               ("tessera_vlm_engine_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// SmolVLM's special tokens after the 256 bytes.
const std::vector<std::string> kSpecials = {
    "<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
    "<global-img>"};

// A random SmolVLM-layout folder: 32 x 32 images in 4 x 4 patches, pixel
// shuffle by 2: 16 image tokens per image; a small Llama; the byte
// tokenizer; SmolVLM's image processor without splitting.
std::string vlm_folder() {
  static std::once_flag once;
  static fs::path dir;
  std::call_once(once, [] {
    dir = scratch_dir("model");
    testutil::write_byte_tokenizer(dir.string(), kSpecials, "<end_of_utterance>", "");
    nn::VlmConfig c;
    c.layout = nn::VlmLayout::kIdefics3;
    c.model_type = "idefics3";
    c.vision.model_type = "idefics3_vision";
    c.vision.hidden_size = 32;
    c.vision.intermediate_size = 64;
    c.vision.num_hidden_layers = 2;
    c.vision.num_attention_heads = 4;
    c.vision.image_size = 32;
    c.vision.patch_size = 4;
    c.scale_factor = 2;
    c.text.model_type = "llama";
    c.text.vocab_size = 256 + static_cast<int64_t>(kSpecials.size());
    c.text.hidden_size = 64;
    c.text.intermediate_size = 128;
    c.text.num_hidden_layers = 2;
    c.text.num_attention_heads = 4;
    c.text.num_key_value_heads = 2;
    c.text.max_position_embeddings = 256;
    c.text.rms_norm_eps = 1e-5;
    c.text.eos_token_ids = {256 + 2};
    c.image_token_id = 256 + 3;
    nn::write_random_vlm(dir.string(), c, 11);
    nn::ImageProcessorConfig p;
    p.image_processor_type = "Idefics3ImageProcessor";
    p.size_longest_edge = 32;
    p.max_image_size = 32;
    p.do_image_splitting = false;
    std::ofstream(dir / "preprocessor_config.json") << p.to_json();
  });
  return dir.string();
}

// Random pixels of the given size (each image different).
nn::Image noise_image(int64_t height, int64_t width, uint64_t seed) {
  nn::Image img = nn::Image::filled(height, width, 0, 0, 0);
  std::mt19937_64 rng(seed);
  for (uint8_t& b : img.pixels) b = static_cast<uint8_t>(rng());
  return img;
}

struct Case {
  std::string question;
  std::vector<nn::Image> images;
};

std::vector<nn::ChatMessage> user(const std::string& text) { return {{"user", text}}; }

// The reference: nn::generate_vlm at batch 1 with batch-invariant forwards.
std::vector<int64_t> reference(const nn::LoadedVlm& vlm, const Case& c, int64_t max_tokens) {
  nn::SamplingOptions so;
  so.max_new_tokens = max_tokens;
  so.stop_tokens = vlm.stop_tokens();
  so.batch_invariant = true;
  const nn::VlmInput in =
      vlm.prepare({{"user", c.question, static_cast<int64_t>(c.images.size())}}, c.images);
  return nn::generate_vlm(*vlm.model, {in}, so).tokens[0];
}

struct Output {
  std::vector<int64_t> tokens;
  std::string text;
  int64_t prompt_tokens = 0;
  std::string reason;
};

class Collector {
 public:
  TokenCallback callback() {
    return [this](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu_);
      Output& o = out_[e.request_id];
      o.tokens.insert(o.tokens.end(), e.tokens.begin(), e.tokens.end());
      o.text += e.text;
      o.prompt_tokens = e.prompt_tokens;
      if (e.finished) o.reason = e.finish_reason;
    };
  }
  Output get(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    return out_[id];
  }

 private:
  std::mutex mu_;
  std::map<uint64_t, Output> out_;
};

GenerateRequest request_of(const Engine& engine, const Case& c, int64_t max_tokens) {
  GenerateRequest r;
  r.prompt_text =
      engine.apply_chat_template(user(c.question), {static_cast<int64_t>(c.images.size())});
  r.images = c.images;
  r.params.max_tokens = max_tokens;
  r.params.temperature = 0;
  return r;
}

std::vector<Case> cases() {
  return {
      {"What is in the image?", {noise_image(32, 32, 1)}},
      {"What is in the image?", {noise_image(32, 32, 2)}},  // same text, other pixels
      {"Describe it.", {noise_image(40, 24, 3)}},           // resized
      {"Compare the two.", {noise_image(17, 33, 4), noise_image(32, 32, 5)}},
      {"What is in the image?", {noise_image(32, 32, 1)}},  // a repeat: prefix-cache hits
  };
}

TEST(VlmEngine, GreedyWithImagesEqualsGenerateVlmAloneAndUnderLoad) {
  at::NoGradGuard no_grad;
  const nn::LoadedVlm vlm = nn::load_vlm_folder(vlm_folder());
  const int64_t kMax = 12;
  std::vector<std::vector<int64_t>> expected;
  for (const Case& c : cases()) expected.push_back(reference(vlm, c, kMax));
  // The random model must not answer every image alike, or the test could
  // not tell images apart.
  EXPECT_NE(expected[0], expected[1]);
  EXPECT_EQ(expected[0], expected[4]);

  // Alone, one at a time (the repeat takes prefix-cache hits).
  {
    EngineOptions o;
    o.model = vlm_folder();
    auto engine = Engine::create(o);
    EXPECT_TRUE(engine->accepts_images());
    Collector out;
    for (size_t i = 0; i < cases().size(); ++i) {
      const Case c = cases()[i];
      RequestHandle h = engine->submit(request_of(*engine, c, kMax), out.callback());
      ASSERT_TRUE(h.wait(std::chrono::minutes(2)));
      EXPECT_EQ(out.get(h.id()).tokens, expected[i]) << "case " << i;
      const nn::VlmInput in =
          vlm.prepare({{"user", c.question, static_cast<int64_t>(c.images.size())}}, c.images);
      EXPECT_EQ(out.get(h.id()).prompt_tokens, static_cast<int64_t>(in.ids.size()))
          << "image tokens count as prompt tokens";
    }
    EXPECT_GT(engine->stats().prefix_cache_hits, 0);
  }

  // All at once, three times over, with blocks of 4 tokens, a pool that
  // forces preemption and 24-token steps: image tokens are split across
  // prefill chunks, and equal prompts with different images run side by
  // side.
  EngineOptions o;
  o.model = vlm_folder();
  o.block_size = 4;
  o.num_blocks = 48;
  o.max_num_batched_tokens = 24;
  o.max_num_seqs = 8;
  auto engine = Engine::create(o);
  Collector out;
  // Every request built before the first is submitted, so they arrive
  // together and the pool runs short however fast the engine steps.
  const std::vector<Case> all = cases();
  std::vector<std::pair<GenerateRequest, size_t>> requests;
  for (int round = 0; round < 3; ++round) {
    for (size_t i = 0; i < all.size(); ++i)
      requests.emplace_back(request_of(*engine, all[i], kMax), i);
  }
  std::vector<std::pair<RequestHandle, size_t>> handles;
  for (auto& [request, i] : requests) {
    handles.emplace_back(engine->submit(std::move(request), out.callback()), i);
  }
  for (auto& [h, i] : handles) {
    ASSERT_TRUE(h.wait(std::chrono::minutes(2)));
    EXPECT_EQ(out.get(h.id()).tokens, expected[i]) << "case " << i << " under load";
  }
  EXPECT_GT(engine->stats().preemptions, 0) << "the pool was meant to force preemption";
  EXPECT_EQ(engine->stats().free_blocks, engine->stats().num_blocks);
}

TEST(VlmEngine, BadImageRequestsAreRefusedWithNamedErrors) {
  EngineOptions o;
  o.model = vlm_folder();
  o.max_images_per_request = 2;
  auto engine = Engine::create(o);
  const nn::Image img = noise_image(32, 32, 9);
  auto message = [&](const GenerateRequest& r) -> std::string {
    try {
      engine->submit(r, nullptr);
    } catch (const InvalidArgument& e) {
      return e.message();
    }
    return "accepted";
  };
  GenerateRequest r;
  r.params.max_tokens = 4;
  // Two markers, one image.
  r.prompt_text = engine->apply_chat_template(user("x"), {2});
  r.images = {img};
  EXPECT_NE(message(r).find("marker"), std::string::npos) << message(r);
  // Too many images.
  r.prompt_text = engine->apply_chat_template(user("x"), {3});
  r.images = {img, img, img};
  EXPECT_NE(message(r).find("at most 2"), std::string::npos) << message(r);
  // Token prompts cannot carry images.
  r.prompt_text.clear();
  r.prompt_tokens = {1, 2, 3};
  r.images = {img};
  EXPECT_NE(message(r).find("prompt_tokens"), std::string::npos) << message(r);
  // An image token in the text of a request without images.
  r.prompt_tokens.clear();
  r.images.clear();
  r.prompt_text = "<image> what?";
  EXPECT_NE(message(r).find("has no images"), std::string::npos) << message(r);
  // An image whose tokens exceed the context.
  r.prompt_text = engine->apply_chat_template(user("x"), {2});
  r.images = {img, img};
  r.params.max_tokens = 240;
  EXPECT_NE(message(r).find("max_model_len"), std::string::npos) << message(r);
  // Counts that do not match the messages.
  EXPECT_THROW(engine->apply_chat_template(user("x"), {1, 1}), InvalidArgument);
  EXPECT_EQ(engine->stats().waiting + engine->stats().running, 0) << "nothing was queued";
}

// tessera-serve's HTTP layer with the `openai` client: image_url parts as
// data: URLs and local files give the engine's tokens; bad parts give 400
// naming the part.
TEST(VlmHttp, OpenAiClientWithImageParts) {
  const std::string python = TESSERA_PYTHON;
  const bool have_openai =
      run_command({python, "-c", "import openai"}, std::chrono::seconds(60)).status.success();
  TESSERA_REQUIRE_INSTALLED(have_openai, python + " with the openai package");
  at::NoGradGuard no_grad;
  const fs::path dir = scratch_dir("http");
  const fs::path media = dir / "media";
  fs::create_directories(media);
  const nn::LoadedVlm vlm = nn::load_vlm_folder(vlm_folder());
  nlohmann::json spec = {{"media_root", media.string()}, {"cases", nlohmann::json::array()}};
  const std::vector<Case> all = cases();
  for (size_t i = 0; i < all.size(); ++i) {
    nlohmann::json images = nlohmann::json::array();
    for (size_t k = 0; k < all[i].images.size(); ++k) {
      const fs::path png = media / ("case" + std::to_string(i) + "_" + std::to_string(k) + ".png");
      nn::write_image(png.string(), all[i].images[k]);
      images.push_back(png.string());
    }
    const std::vector<int64_t> tokens = reference(vlm, all[i], 12);
    // The answer's bytes, token by token (the chat logprobs' "bytes"): the
    // stop token adds none.
    nlohmann::json bytes = nlohmann::json::array();
    for (int64_t t : tokens) {
      const std::string piece = vlm.tokenizer.decode({static_cast<int32_t>(t)}, true);
      std::vector<int> b;
      for (unsigned char ch : piece) b.push_back(ch);
      if (!b.empty()) bytes.push_back(b);
    }
    const nn::VlmInput in = vlm.prepare(
        {{"user", all[i].question, static_cast<int64_t>(all[i].images.size())}}, all[i].images);
    spec["cases"].push_back({{"question", all[i].question},
                             {"images", images},
                             {"token_bytes", bytes},
                             {"prompt_tokens", in.ids.size()}});
  }
  std::ofstream(dir / "cases.json") << spec.dump(1);

  EngineOptions o;
  o.model = vlm_folder();
  o.model_name = "scene-vlm";
  o.max_images_per_request = 2;
  auto engine = Engine::create(o);
  HttpServerOptions ho;
  ho.port = 0;
  ho.allowed_local_media_path = media.string();
  auto server = HttpServer::start(*engine, ho);
  const CommandResult r =
      run_command({python, std::string(TESSERA_SOURCE_DIR) + "/tests/serve/vlm_http_check.py",
                   "--base-url", server->url() + "/v1", "--cases", (dir / "cases.json").string()},
                  std::chrono::minutes(5));
  EXPECT_TRUE(r.status.success()) << r.status.describe() << "\n" << r.output;
  std::cout << r.output;
  server->stop();
  fs::remove_all(dir);
}

// reason::OpenAiClient (what examples/proreason uses with --vlm-url) against
// a real server: the same answer and usage as the engine gives directly.
TEST(VlmHttp, ReasonOpenAiClientGetsTheEngineAnswer) {
  EngineOptions o;
  o.model = vlm_folder();
  auto engine = Engine::create(o);
  HttpServerOptions ho;
  ho.port = 0;
  auto server = HttpServer::start(*engine, ho);
  reason::OpenAiClientOptions co;
  co.base_url = server->url() + "/v1";
  co.images = true;
  auto client = reason::OpenAiClient::create(co);
  EXPECT_EQ(client->name(), engine->model_name());
  for (const Case& c : cases()) {
    reason::CompletionRequest req;
    req.messages = {{"user", c.question, c.images}};
    req.max_tokens = 10;
    const reason::Completion got = client->complete(req);
    Collector out;
    RequestHandle h = engine->submit(request_of(*engine, c, 10), out.callback());
    ASSERT_TRUE(h.wait(std::chrono::minutes(2)));
    const Output direct = out.get(h.id());
    EXPECT_EQ(got.text, direct.text) << c.question;
    EXPECT_EQ(got.prompt_tokens, direct.prompt_tokens);
    EXPECT_EQ(got.completion_tokens, static_cast<int64_t>(direct.tokens.size()));
  }
  // A server error comes back as InvalidArgument with the server's message.
  reason::CompletionRequest bad;
  bad.messages = {{"user",
                   "x",
                   {noise_image(8, 8, 1), noise_image(8, 8, 2), noise_image(8, 8, 3),
                    noise_image(8, 8, 4), noise_image(8, 8, 5), noise_image(8, 8, 6),
                    noise_image(8, 8, 7), noise_image(8, 8, 8), noise_image(8, 8, 9)}}};
  try {
    client->complete(bad);
    ADD_FAILURE() << "nine images were accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("more than 8 images"), std::string::npos) << e.message();
  }
  server->stop();
  // Nobody listening: Unavailable naming the address.
  co.model = "x";
  try {
    reason::OpenAiClient::create(co)->complete(bad);
    ADD_FAILURE() << "a stopped server answered";
  } catch (const Unavailable& e) {
    EXPECT_NE(e.message().find(server->url()), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace tessera::serve
