#include "tessera/reason/benchmark.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/log.h"
#include "tessera/reason/scene_vlm.h"
#include "tessera/reason/scenes.h"

namespace fs = std::filesystem;

namespace tessera::reason {

std::vector<BenchmarkItem> load_benchmark(const std::string& json_path) {
  std::ifstream in(json_path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "benchmark file '", json_path, "' cannot be opened");
  const std::string text((std::istreambuf_iterator<char>(in)), {});
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    auto [line, column] = line_column(text, e.byte > 0 ? e.byte - 1 : 0);
    TESSERA_THROW(InvalidArgument, json_path, ":", line, ":", column, ": malformed JSON");
  }
  if (doc.is_object() && doc.contains("items")) doc = doc["items"];
  TESSERA_CHECK(doc.is_array(), InvalidArgument, json_path,
                ": expected a list of items (or {\"items\": [...]})");
  const fs::path base = fs::path(json_path).parent_path();
  std::vector<BenchmarkItem> items;
  std::set<std::string> ids;
  for (size_t i = 0; i < doc.size(); ++i) {
    const std::string where = json_path + ": item " + std::to_string(i);
    const ConfigObject cfg = ConfigObject::parse(doc[i].dump(), where);
    BenchmarkItem item;
    item.id = cfg.get_string("id");
    item.image = cfg.get_string("image");
    item.question = cfg.get_string("question");
    item.options = cfg.get_string_list("options");
    item.kind = cfg.get_string("kind", "");
    item.steps = cfg.get_string("steps", "");
    const std::string answer = cfg.get_string("answer");
    cfg.check_no_unknown_keys();
    TESSERA_CHECK(ids.insert(item.id).second, InvalidArgument, where, ": duplicate id '", item.id,
                  "'");
    TESSERA_CHECK(item.options.size() >= 2 && item.options.size() <= 26, InvalidArgument, where,
                  " ('", item.id, "'): options must have 2 to 26 entries, got ",
                  item.options.size());
    item.answer = -1;
    if (answer.size() == 1 && answer[0] >= 'A' &&
        answer[0] < 'A' + static_cast<int>(item.options.size())) {
      item.answer = answer[0] - 'A';
    } else {
      for (size_t k = 0; k < item.options.size(); ++k) {
        if (item.options[k] == answer) item.answer = static_cast<int>(k);
      }
    }
    TESSERA_CHECK(item.answer >= 0, InvalidArgument, where, " ('", item.id, "'): answer '", answer,
                  "' is neither an option letter nor an option");
    item.image_path =
        fs::path(item.image).is_absolute() ? item.image : (base / item.image).string();
    TESSERA_CHECK(fs::exists(item.image_path), NotFound, where, " ('", item.id, "'): image '",
                  item.image_path, "' does not exist");
    items.push_back(std::move(item));
  }
  return items;
}

void write_benchmark(const std::string& json_path, const std::vector<BenchmarkItem>& items) {
  nlohmann::ordered_json doc = nlohmann::ordered_json::array();
  for (const BenchmarkItem& item : items) {
    nlohmann::ordered_json j;
    j["id"] = item.id;
    j["image"] = item.image;
    j["question"] = item.question;
    j["options"] = item.options;
    j["answer"] = option_letter(item.answer);
    if (!item.kind.empty()) j["kind"] = item.kind;
    if (!item.steps.empty()) j["steps"] = item.steps;
    doc.push_back(j);
  }
  const std::string text = doc.dump(1) + "\n";
  AtomicFileWriter writer(json_path);
  writer.append(text.data(), text.size());
  writer.commit();
}

std::vector<BenchmarkItem> make_rendered_benchmark(const std::string& dir, uint64_t first_seed,
                                                   int64_t scenes, int64_t per_scene) {
  TESSERA_CHECK(first_seed + scenes <= kTrainSceneSeedBase / 2, InvalidArgument,
                "make_rendered_benchmark: seeds [", first_seed, ", ", first_seed + scenes,
                ") reach the seeds used for training data");
  fs::create_directories(fs::path(dir) / "images");
  std::vector<BenchmarkItem> items;
  for (int64_t s = 0; s < scenes; ++s) {
    const uint64_t seed = first_seed + s;
    Scene scene = make_scene(seed);
    const std::string image = "images/scene" + std::to_string(seed) + ".png";
    nn::write_image((fs::path(dir) / image).string(), render_scene(scene));
    int k = 0;
    for (const ReasoningItem& r : reasoning_questions(scene, seed, static_cast<int>(per_scene))) {
      BenchmarkItem item;
      item.id = "scene" + std::to_string(seed) + "-" + std::to_string(k++);
      item.image = image;
      item.image_path = (fs::path(dir) / image).string();
      item.question = r.question;
      item.options = r.options;
      item.answer = r.answer;
      item.kind = r.kind;
      item.steps = r.steps;
      items.push_back(item);
    }
  }
  write_benchmark((fs::path(dir) / "benchmark.json").string(), items);
  return items;
}

namespace {

// The image's mean colour everywhere: what the VLM answers from it is what
// it answers from the question and its priors alone.
nn::Image mean_colour_image(const nn::Image& image) {
  uint64_t sum[3] = {0, 0, 0};
  for (size_t i = 0; i < image.pixels.size(); ++i) sum[i % 3] += image.pixels[i];
  const uint64_t n = static_cast<uint64_t>(image.height * image.width);
  return nn::Image::filled(image.height, image.width, static_cast<uint8_t>(sum[0] / n),
                           static_cast<uint8_t>(sum[1] / n), static_cast<uint8_t>(sum[2] / n));
}

}  // namespace

std::vector<MethodSummary> run_benchmark(const std::vector<BenchmarkItem>& items, ModelClient& vlm,
                                         ModelClient& llm, const BenchmarkOptions& options,
                                         std::vector<ItemOutcome>* outcomes) {
  for (const std::string& m : options.methods) {
    TESSERA_CHECK(
        m == "blind" || m == "direct" || m == "cot" || m == "describe" || m == "proreason",
        InvalidArgument, "run_benchmark: unknown method '", m,
        "' (blind, direct, cot, describe, proreason)");
  }
  TESSERA_CHECK(vlm.accepts_images(), InvalidArgument, "run_benchmark: '", vlm.name(),
                "' takes no images");
  const size_t n = options.limit > 0 ? std::min<size_t>(items.size(), options.limit) : items.size();
  std::vector<MethodSummary> out;
  const Agents agents{&vlm, &llm, &llm, &llm, &llm};
  for (const std::string& method : options.methods) {
    MethodSummary s;
    s.method = method;
    int64_t calls = 0, tokens = 0;
    double seconds = 0;
    for (size_t i = 0; i < n; ++i) {
      const BenchmarkItem& item = items[i];
      Question q{item.id, nn::read_image(item.image_path), item.question, item.options};
      if (method == "blind") q.image = mean_colour_image(q.image);
      MethodResult r =
          method == "direct" || method == "blind" ? run_direct(vlm, q)
          : method == "cot"                       ? run_cot(vlm, q)
          : method == "describe"
              ? run_describe_then_reason(vlm, llm, q, options.proreason.max_tokens_answer)
              : run_proreason(agents, q, options.proreason);
      const bool ok = r.choice == item.answer;
      s.correct += ok;
      s.unparsed += r.choice < 0;
      auto& k = s.by_kind[item.kind];
      k.first += ok;
      k.second += 1;
      calls += r.calls();
      tokens += r.tokens();
      for (const TraceRecord& t : r.trace) seconds += t.seconds;
      if (!options.trace_path.empty()) append_jsonl(options.trace_path, r.trace);
      if (outcomes) outcomes->push_back({item.id, method, r.choice, ok, r.answer, r.memory});
    }
    s.questions = static_cast<int64_t>(n);
    if (n > 0) {
      s.accuracy = static_cast<double>(s.correct) / n;
      s.calls_per_question = static_cast<double>(calls) / n;
      s.tokens_per_question = static_cast<double>(tokens) / n;
      s.seconds_per_question = seconds / n;
    }
    TESSERA_LOG(Info, "reason") << method << ": " << s.correct << "/" << s.questions << " correct, "
                                << s.calls_per_question << " calls and " << s.tokens_per_question
                                << " tokens per question";
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace tessera::reason
