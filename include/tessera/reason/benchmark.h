// tessera/reason/benchmark.h — multiple-choice visual-reasoning sets in a
// small MMMU-style JSON format, the rendered held-out set, and the
// comparison of direct VLM answers, VLM chain of thought, passive
// describe-then-reason and ProReason on them.
//
// The JSON format (a list, or an object whose "items" is the list):
//   [{"id": "scene0-1", "image": "images/scene0.png",
//     "question": "How many more red circles than blue squares are there?",
//     "options": ["1", "2", "3", "4"], "answer": "B",
//     "kind": "difference", "steps": "3 - 1 = 2"}]
// image is a PNG or JPEG path, relative to the JSON file's folder unless
// absolute; answer is the option letter (MMMU's convention) or the text of
// one option; kind and steps are optional. Unknown fields are errors.
//
//   auto items = tessera::reason::load_benchmark("set/benchmark.json");
//   tessera::reason::BenchmarkOptions o;
//   o.methods = {"direct", "describe", "proreason"};
//   auto summaries = tessera::reason::run_benchmark(items, *vlm, *llm, o, &outcomes);
//
// Thread safety: functions are thread-compatible.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tessera/reason/model_client.h"
#include "tessera/reason/proreason.h"

namespace tessera::reason {

struct BenchmarkItem {
  std::string id;
  std::string image;       // as written in the file
  std::string image_path;  // resolved against the file's folder
  std::string question;
  std::vector<std::string> options;
  int answer = 0;  // option index
  std::string kind;
  std::string steps;
};

// InvalidArgument naming the file, the item index and the field for a
// malformed item (missing field, fewer than two options, more than 26, an
// answer that is neither a letter in range nor an option); NotFound naming
// the item for a missing image file. Duplicate ids are InvalidArgument.
std::vector<BenchmarkItem> load_benchmark(const std::string& json_path);
// Writes the JSON format (answers as letters; image as given).
void write_benchmark(const std::string& json_path, const std::vector<BenchmarkItem>& items);

// Renders scenes with seeds [first_seed, first_seed + scenes) into
// dir/images/ and writes dir/benchmark.json with `per_scene` reasoning
// questions each. InvalidArgument when the seeds reach the training range
// (scene_vlm.h's kTrainSceneSeedBase / 2).
std::vector<BenchmarkItem> make_rendered_benchmark(const std::string& dir, uint64_t first_seed,
                                                   int64_t scenes, int64_t per_scene = 2);

struct BenchmarkOptions {
  // Any of "blind", "direct", "cot", "describe", "proreason", in the order
  // to run. "blind" is a control, not a method: the direct prompt with the
  // image replaced by its mean colour, i.e. what the VLM gets right from the
  // question and its priors alone.
  std::vector<std::string> methods = {"blind", "direct", "cot", "describe", "proreason"};
  ProReasonOptions proreason;
  std::string trace_path;  // JSONL of every call, appended; empty: none
  int64_t limit = 0;       // first `limit` items only (0: all)
};

struct MethodSummary {
  std::string method;
  int64_t questions = 0;
  int64_t correct = 0;
  int64_t unparsed = 0;  // answers that named no option
  double accuracy = 0;
  double calls_per_question = 0;
  double tokens_per_question = 0;
  double seconds_per_question = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> by_kind;  // kind -> (correct, total)
};

struct ItemOutcome {
  std::string id;
  std::string method;
  int choice = -1;
  bool correct = false;
  std::string answer;
  std::vector<std::string> memory;
};

// Runs each method on each item (the VLM sees the image; the text LLM plays
// every text role). InvalidArgument for an unknown method name or a VLM
// client that takes no images.
std::vector<MethodSummary> run_benchmark(const std::vector<BenchmarkItem>& items, ModelClient& vlm,
                                         ModelClient& llm, const BenchmarkOptions& options,
                                         std::vector<ItemOutcome>* outcomes = nullptr);

}  // namespace tessera::reason
