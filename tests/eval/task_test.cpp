#include "tessera/eval/task.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "eval_test_util.h"
#include "tessera/core/error.h"
#include "tessera/eval/request.h"

namespace tessera::eval {
namespace {

using json = nlohmann::json;

constexpr const char* kQaData = R"([
  {"question": "1+1?", "answer": "2", "word": "two", "A": "one", "B": "two", "C": "three", "D": null},
  {"question": "2+2?", "answer": "4", "word": "four", "A": "four", "B": "five", "C": "six", "D": "seven"},
  {"question": "3+3?", "answer": "6", "word": "six", "A": "five", "B": "six", "C": "nine", "D": "zero"},
  {"question": "4+4?", "answer": "8", "word": "eight", "A": "eight", "B": "nine", "C": "seven", "D": "six"}
])";

// A data root holding qa.json and a task file written next to it.
class TaskFiles : public ::testing::Test {
 protected:
  void SetUp() override { dir_.write("data/qa.json", kQaData); }
  std::string write_task(const std::string& name, const std::string& yaml) {
    return dir_.write("tasks/" + name, yaml);
  }
  Task load(const std::string& name) {
    return Task::load(dir_.file("tasks/" + name), {dir_.file("data")});
  }
  // The message of the error loading `yaml` throws; "" when it loads.
  std::string error_of(const std::string& yaml) {
    const std::string path = write_task("broken.yaml", yaml);
    try {
      Task::load(path, {dir_.file("data")});
    } catch (const Error& e) {
      return e.message();
    }
    return "";
  }

  testing::TempDir dir_;
};

constexpr const char* kGenerate = R"(task: qa_gen
dataset_path: qa.json
output_type: generate_until
description: "Answer briefly.\n\n"
doc_to_text: "Q: {{ question }}\nA:"
doc_to_target: "{{ answer }}"
num_fewshot: 2
fewshot_config:
  sampler: first_n
)";

TEST_F(TaskFiles, GeneratePromptsFollowLmEval) {
  write_task("gen.yaml", kGenerate);
  const Task task = load("gen.yaml");
  EXPECT_EQ(task.name(), "qa_gen");
  EXPECT_EQ(task.size(), 4u);
  EXPECT_EQ(task.doc_source(2), "qa.json item 2");
  EXPECT_EQ(task.text(0), "Q: 1+1?\nA:");
  EXPECT_EQ(task.target(3), "8");
  // first_n draws num_fewshot + 1 and drops the document itself.
  EXPECT_EQ(task.fewshot_indices(0), (std::vector<size_t>{1, 2}));
  EXPECT_EQ(task.fewshot_indices(1), (std::vector<size_t>{0, 2}));
  EXPECT_EQ(task.fewshot_indices(3), (std::vector<size_t>{0, 1}));

  const auto requests = build_requests(task);
  ASSERT_EQ(requests.size(), 4u);
  const GenerateRequest& r = requests[3].generate.at(0);
  // description (one trailing newline dropped by Jinja), examples with the
  // default delimiters " " and "\n\n", then the question.
  EXPECT_EQ(r.context, "Answer briefly.\nQ: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\nQ: 4+4?\nA:");
  EXPECT_EQ(requests[3].prompt, r.context);
  ASSERT_EQ(r.messages.size(), 6u);
  EXPECT_EQ(r.messages[0].role, ChatRole::kSystem);
  EXPECT_EQ(r.messages[0].content, "Answer briefly.\n");
  EXPECT_EQ(r.messages[1].role, ChatRole::kUser);
  EXPECT_EQ(r.messages[1].content, "Q: 1+1?\nA:");
  EXPECT_EQ(r.messages[2].role, ChatRole::kAssistant);
  EXPECT_EQ(r.messages[2].content, "2");
  EXPECT_EQ(r.messages[5].content, "Q: 4+4?\nA:");
  // generation_kwargs defaults: until = [fewshot_delimiter].
  EXPECT_EQ(r.until, (std::vector<std::string>{"\n\n"}));
  EXPECT_EQ(r.max_gen_toks, 256);
  EXPECT_FALSE(r.do_sample);
  EXPECT_EQ(build_requests(task, {2}).size(), 2u);
}

TEST_F(TaskFiles, IncludeOverridesTheBase) {
  write_task("base/_base.yaml", std::string(kGenerate) + R"(target_delimiter: ""
generation_kwargs:
  until: ["\n"]
  max_gen_toks: 7
  temperature: 0.5
  do_sample: true
version: "2"
)");
  write_task("child.yaml", R"(include: base/_base.yaml
task: qa_child
num_fewshot: 0
)");
  const Task task = load("child.yaml");
  EXPECT_EQ(task.name(), "qa_child");
  EXPECT_EQ(task.version(), "2");
  EXPECT_EQ(task.config().num_fewshot, 0);
  const auto r = build_requests(task)[1].generate.at(0);
  EXPECT_EQ(r.context, "Answer briefly.\nQ: 2+2?\nA:");
  EXPECT_EQ(r.until, (std::vector<std::string>{"\n"}));
  EXPECT_EQ(r.max_gen_toks, 7);
  EXPECT_DOUBLE_EQ(r.temperature, 0.5);
  EXPECT_TRUE(r.do_sample);
}

TEST_F(TaskFiles, MultipleChoiceRequests) {
  write_task("mc.yaml", R"(task: qa_mc
dataset_path: qa.json
output_type: multiple_choice
doc_to_text: "Q: {{ question }}\nA:"
doc_to_choice: "{{ [A, B, C, D] | select | list }}"
doc_to_target: "{{ word }}"
metadata:
  version: 1.5
)");
  const Task task = load("mc.yaml");
  EXPECT_EQ(task.version(), "1.5");
  EXPECT_EQ(task.choices(0), (std::vector<std::string>{"one", "two", "three"}));  // D is null
  EXPECT_EQ(task.gold(0), 1u);
  EXPECT_EQ(task.gold(1), 0u);
  EXPECT_EQ(task.gold(3), 0u);
  EXPECT_EQ(task.target(2), "six");
  const auto requests = build_requests(task);
  ASSERT_EQ(requests[1].loglikelihood.size(), 4u);
  EXPECT_EQ(requests[1].loglikelihood[2].context, "Q: 2+2?\nA:");
  EXPECT_EQ(requests[1].loglikelihood[2].continuation, " six");
  EXPECT_TRUE(requests[1].generate.empty());

  // A YAML list of choices and an index target ("2" is an index, as lm-eval
  // turns digit strings into ints when there are choices).
  write_task("mc_list.yaml", R"(task: qa_mc_list
dataset_path: qa.json
output_type: multiple_choice
doc_to_text: "{{ question }}"
doc_to_choice: ["{{ A }}", "{{ B }}", "{{ C }}"]
doc_to_target: "2"
target_delimiter: "="
num_fewshot: 1
fewshot_config: {sampler: first_n}
)");
  const Task list_task = load("mc_list.yaml");
  EXPECT_EQ(list_task.gold(1), 2u);
  EXPECT_EQ(list_task.target(1), "six");
  // Few-shot examples show the gold choice's text.
  EXPECT_EQ(build_requests(list_task)[0].loglikelihood[0].context, "2+2?=six\n\n1+1?");
}

TEST_F(TaskFiles, LoglikelihoodRequests) {
  write_task("ll.yaml", R"(task: qa_ll
dataset_path: qa.json
output_type: loglikelihood
doc_to_text: "{{ question }}"
doc_to_target: "{{ answer }}"
)");
  const auto requests = build_requests(load("ll.yaml"));
  ASSERT_EQ(requests[0].loglikelihood.size(), 1u);
  EXPECT_EQ(requests[0].loglikelihood[0].continuation, " 2");
}

TEST_F(TaskFiles, FoldersSplitsAndJsonl) {
  dir_.write("data/set/b.jsonl", "{\"q\": \"b0\"}\n\n{\"q\": \"b1\"}\n");
  dir_.write("data/set/a.json", R"([{"q": "a0"}])");
  dir_.write("data/set/shots.json", R"([{"q": "s0"}, {"q": "s1"}])");
  dir_.write("data/set/notes.txt", "ignored");
  write_task("all.yaml", R"(task: all
dataset_path: set
output_type: generate_until
doc_to_text: "{{ q }}"
doc_to_target: "x"
)");
  const Task all = load("all.yaml");
  ASSERT_EQ(all.size(), 5u);  // a.json, b.jsonl, shots.json, sorted by name
  EXPECT_EQ(all.text(0), "a0");
  EXPECT_EQ(all.doc_source(2), "set/b.jsonl item 1");
  EXPECT_EQ(all.text(4), "s1");

  write_task("split.yaml", R"(task: split
dataset_path: set
test_split: [b.jsonl]
fewshot_split: shots.json
output_type: generate_until
doc_to_text: "{{ q }}"
doc_to_target: "t"
num_fewshot: 2
fewshot_config: {sampler: first_n}
)");
  const Task split = load("split.yaml");
  ASSERT_EQ(split.size(), 2u);
  EXPECT_EQ(split.fewshot_size(), 2u);
  // A separate few-shot split: exactly num_fewshot examples, none dropped.
  EXPECT_EQ(split.fewshot_indices(0), (std::vector<size_t>{0, 1}));
  EXPECT_EQ(build_requests(split)[1].prompt, "s0 t\n\ns1 t\n\nb1");
}

constexpr const char* kSampleScript = R"PY(
import json, random, sys
data = json.load(open(sys.argv[1]))
rnd = random.Random(data["seed"])
n, k = data["n"], data["k"]
out = []
for i in range(n):
    drawn = rnd.sample(range(n), k + 1)
    out.append([x for x in drawn if x != i][:k])
print(json.dumps(out))
)PY";

TEST_F(TaskFiles, RandomSamplerMatchesLmEval) {
  TESSERA_EVAL_REQUIRE_PYTHON(python);
  // 40 documents and 6 shots: random.sample takes its set-based branch
  // (population > setsize); 3 shots of 4 documents takes the pool branch.
  json docs = json::array();
  for (int i = 0; i < 40; ++i) docs.push_back({{"q", "q" + std::to_string(i)}});
  dir_.write("data/many.json", docs.dump());
  for (const auto& [file, n, k] : {std::tuple<std::string, int, int>{"many.json", 40, 6},
                                   std::tuple<std::string, int, int>{"qa.json", 4, 2}}) {
    write_task("rand.yaml",
               "task: rand\ndataset_path: " + file +
                   "\noutput_type: generate_until\ndoc_to_text: \"{{ question if question "
                   "is defined else q }}\"\ndoc_to_target: \"t\"\nnum_fewshot: " +
                   std::to_string(k) + "\nfewshot_config: {sampler: random, seed: 77}\n");
    const Task task = load("rand.yaml");
    testing::TempDir tmp;
    const json expected = json::parse(
        testing::run_python(python, tmp, kSampleScript,
                            tmp.write("in.json", json({{"seed", 77}, {"n", n}, {"k", k}}).dump())));
    ASSERT_EQ(expected.size(), task.size());
    for (size_t i = 0; i < task.size(); ++i) {
      EXPECT_EQ(task.fewshot_indices(i), expected[i].get<std::vector<size_t>>())
          << file << " doc " << i;
    }
  }
}

TEST_F(TaskFiles, DefaultsAndMetricOptions) {
  write_task("m.yaml", R"Y(task: m
dataset_path: qa.json
output_type: generate_until
doc_to_text: "{{ question }}"
doc_to_target: "{{ answer }}"
filter_list:
  - name: first
    filter:
      - function: regex
        regex_pattern: "([0-9]+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    regexes_to_ignore: ["x"]
  - metric: bleu
    tokenize: yue_char
    smooth_method: floor
    smooth_value: 0.3
  - metric: rouge_l
)Y");
  const Task t = load("m.yaml");
  const auto& ms = t.config().metric_list;
  ASSERT_EQ(ms.size(), 3u);
  EXPECT_EQ(ms[0].aggregation, "mean");
  EXPECT_TRUE(ms[0].ignore_case);
  EXPECT_EQ(ms[0].regexes_to_ignore, (std::vector<std::string>{"x"}));
  EXPECT_EQ(ms[1].aggregation, "bleu");
  EXPECT_EQ(ms[1].smooth_method, "floor");
  EXPECT_DOUBLE_EQ(ms[1].smooth_value.value(), 0.3);
  EXPECT_EQ(ms[2].tokenize, "rouge");
  EXPECT_EQ(t.config().filter_list.at(0).filters.at(0).group_select, -1);

  write_task("d.yaml", R"(task: d
dataset_path: qa.json
output_type: multiple_choice
doc_to_text: "{{ question }}"
doc_to_choice: ["a", "b"]
doc_to_target: 0
)");
  const Task d = load("d.yaml");
  ASSERT_EQ(d.config().metric_list.size(), 2u);  // lm-eval's defaults
  EXPECT_EQ(d.config().metric_list[0].metric, "acc");
  EXPECT_EQ(d.config().metric_list[1].metric, "acc_norm");
  EXPECT_EQ(d.config().filter_list.at(0).name, "none");
}

// Each broken task file and (part of) the error it must give.
struct Broken {
  const char* what;
  std::string yaml;
  std::string message;
};

std::string base_with(const std::string& extra, const std::string& text = "\"{{ question }}\"") {
  return "task: b\ndataset_path: qa.json\noutput_type: generate_until\ndoc_to_text: " + text +
         "\ndoc_to_target: \"{{ answer }}\"\n" + extra;
}

TEST_F(TaskFiles, BrokenFilesGiveNamedErrors) {
  const std::string file = dir_.file("tasks/broken.yaml");
  const std::vector<Broken> cases = {
      {"unknown top-level key", base_with("dataset_paht: x\n"),
       file + ": unknown key 'dataset_paht' (line 6)"},
      {"missing required key", "task: b\ndataset_path: qa.json\noutput_type: generate_until\n",
       file + ": missing required key 'doc_to_text'"},
      {"unknown nested key", base_with("generation_kwargs:\n  until: [x]\n  top_k: 5\n"),
       file + ": unknown key 'generation_kwargs.top_k' (line 8"},
      {"unknown metric option",
       base_with("metric_list:\n  - metric: exact_match\n    ignore_cas: true\n"),
       file + ": unknown key 'metric_list[0].ignore_cas'"},
      {"unknown metric", base_with("metric_list:\n  - metric: f1\n"),
       file + ": metric_list[0].metric: unknown metric 'f1'"},
      {"metric for another output type", base_with("metric_list:\n  - metric: acc_norm\n"),
       "metric_list[0].metric: metric 'acc_norm' does not apply to output_type generate_until"},
      {"wrong aggregation",
       base_with("metric_list:\n  - metric: exact_match\n    aggregation: bleu\n"),
       "metric_list[0].aggregation: metric 'exact_match' aggregates with 'mean', not 'bleu'"},
      {"bad regex to ignore",
       base_with(
           "metric_list:\n  - metric: exact_match\n    regexes_to_ignore: [\"ok\", \"[a-\"]\n"),
       file + ": metric_list[0].regexes_to_ignore[1]: invalid regex '[a-'"},
      {"bad filter regex",
       base_with("filter_list:\n  - name: f\n    filter:\n      - function: regex\n        "
                 "regex_pattern: \"(\"\n"),
       file + ": filter_list[0].filter[0].regex_pattern: invalid regex '('"},
      {"unknown filter",
       base_with("filter_list:\n  - name: f\n    filter:\n      - function: strip_all\n"),
       file + ": filter_list[0].filter[0].function: unknown filter 'strip_all'"},
      {"filter option of another filter",
       base_with("filter_list:\n  - name: f\n    filter:\n      - function: regex\n        "
                 "regex_pattern: x\n"
                 "        letters: AB\n"),
       file +
           ": filter_list[0].filter[0].letters: option 'letters' does not apply to filter 'regex'"},
      {"bad output type",
       "task: b\ndataset_path: qa.json\noutput_type: generate\ndoc_to_text: x\ndoc_to_target: y\n",
       file + ": output_type: expected generate_until, loglikelihood or multiple_choice, got "
              "'generate'"},
      {"non-integer num_fewshot", base_with("num_fewshot: five\n"),
       file + ": num_fewshot: expected an integer, got 'five' (line 6)"},
      {"bad sampler", base_with("fewshot_config: {sampler: best}\n"),
       file + ": fewshot_config.sampler: expected first_n or random, got 'best'"},
      {"template syntax", base_with("", "\"Q: {{ question \""),
       file + ": doc_to_text: line 1, column 4: unclosed '{{' (missing '}}')"},
      {"template unknown filter", base_with("", "\"{{ question | shout }}\""),
       file + ": doc_to_text: line 1, column 15: unknown filter 'shout'"},
      {"malformed YAML", "task: [unclosed\n", file + ": malformed YAML at line"},
      {"doc lacks a field", base_with("", "\"{{ question }} {{ E }}\""),
       file + ": doc_to_text: qa.json item 0 (doc 0): line 1, column 19: undefined field 'E'"},
      {"MC target not a choice",
       "task: b\ndataset_path: qa.json\noutput_type: multiple_choice\ndoc_to_text: x\n"
       "doc_to_choice: [\"{{ A }}\", \"{{ B }}\"]\ndoc_to_target: \"{{ question }}\"\n",
       file +
           ": doc_to_target: qa.json item 0 (doc 0): target '1+1?' is neither an index nor one of "
           "the choices 'one', 'two'"},
      {"MC index out of range",
       "task: b\ndataset_path: qa.json\noutput_type: multiple_choice\ndoc_to_text: x\n"
       "doc_to_choice: [\"{{ A }}\", \"{{ B }}\"]\ndoc_to_target: 5\n",
       "qa.json item 0 (doc 0): target index 5 is out of range for 2 choices"},
      {"choices not a list",
       "task: b\ndataset_path: qa.json\noutput_type: multiple_choice\ndoc_to_text: x\n"
       "doc_to_choice: \"{{ A }}\"\ndoc_to_target: 0\n",
       file + ": doc_to_choice: qa.json item 0 (doc 0): expected a list of choices, got string"},
      {"MC without choices",
       "task: b\ndataset_path: qa.json\noutput_type: multiple_choice\ndoc_to_text: x\n"
       "doc_to_target: 0\n",
       file + ": missing required key 'doc_to_choice'"},
      {"choices on a generation task", base_with("doc_to_choice: [a]\n"),
       file + ": doc_to_choice: applies only to output_type multiple_choice"},
      {"filters on multiple choice",
       "task: b\ndataset_path: qa.json\noutput_type: multiple_choice\ndoc_to_text: x\n"
       "doc_to_choice: [a]\ndoc_to_target: 0\nfilter_list:\n  - name: f\n    filter: []\n",
       file + ": filter_list: applies only to output_type generate_until"},
      {"yue tokenizer without lexicon",
       base_with("metric_list:\n  - metric: bleu\n    tokenize: yue\n"),
       file + ": metric_list[0]: tokenize 'yue' needs a 'lexicon'"},
      {"unknown tokenizer", base_with("metric_list:\n  - metric: bleu\n    tokenize: spacy\n"),
       file + ": metric_list[0].tokenize: unknown tokenizer 'spacy'"},
      {"missing lexicon file",
       base_with(
           "metric_list:\n  - metric: rouge_l\n    tokenize: yue\n    lexicon: nowhere.txt\n"),
       file + ": metric_list[0].lexicon: "},
      {"duplicate metric",
       base_with("metric_list:\n  - metric: exact_match\n  - metric: exact_match\n"),
       file + ": metric_list[1]: metric 'exact_match' is listed twice"},
      {"too many shots", base_with("num_fewshot: 4\n"),
       file + ": num_fewshot: 4 examples need 5 few-shot documents"},
      {"test_split on a file", base_with("test_split: a.json\n"),
       file + ": test_split: dataset_path 'qa.json' is a file"},
      {"both version spellings", base_with("version: 1\nmetadata: {version: 2}\n"),
       file + ": metadata: give the version either as 'version' or as 'metadata.version'"},
  };
  for (const Broken& c : cases) {
    const std::string message = error_of(c.yaml);
    EXPECT_NE(message.find(c.message), std::string::npos)
        << c.what << "\n  got:      " << message << "\n  expected: " << c.message;
  }
}

TEST_F(TaskFiles, MissingFilesAreNotFound) {
  write_task("nodata.yaml", base_with("").replace(base_with("").find("qa.json"), 7, "nope.json"));
  try {
    load("nodata.yaml");
    FAIL() << "no throw";
  } catch (const NotFound& e) {
    EXPECT_NE(e.message().find("dataset_path 'nope.json' not found"), std::string::npos)
        << e.message();
  }
  write_task("noinclude.yaml", "include: _missing.yaml\ntask: x\n");
  EXPECT_THROW(load("noinclude.yaml"), NotFound);
  EXPECT_THROW(Task::load(dir_.file("tasks/absent.yaml"), {dir_.file("data")}), NotFound);
}

TEST_F(TaskFiles, ErrorsInABaseFileNameTheBase) {
  write_task("_base.yaml", base_with("num_fewshot: lots\n"));
  write_task("leaf.yaml", "include: _base.yaml\ntask: leaf\n");
  try {
    load("leaf.yaml");
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(
        e.message().find(dir_.file("tasks/_base.yaml") + ": num_fewshot: expected an integer"),
        std::string::npos)
        << e.message();
  }
  write_task("cycle_a.yaml", "include: cycle_b.yaml\ntask: a\n");
  write_task("cycle_b.yaml", "include: cycle_a.yaml\ntask: b\n");
  try {
    load("cycle_a.yaml");
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("include cycle"), std::string::npos) << e.message();
  }
}

TEST_F(TaskFiles, BadDataFilesAreNamed) {
  dir_.write("data/bad.json", "[{\"question\": 1},\n 7]");
  write_task("bad.yaml", base_with("").replace(base_with("").find("qa.json"), 7, "bad.json"));
  try {
    load("bad.yaml");
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("bad.json: item 1 is int, expected an object"), std::string::npos)
        << e.message();
  }
  dir_.write("data/broken.json", "[{\"question\": ]");
  write_task("broken_json.yaml",
             base_with("").replace(base_with("").find("qa.json"), 7, "broken.json"));
  try {
    load("broken_json.yaml");
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("broken.json: malformed JSON at line 1, column 15"),
              std::string::npos)
        << e.message();
  }
}

// Regression (found by fuzz/eval_task_fuzz.cpp): a dataset_path or split
// name the file system refuses (here: longer than NAME_MAX) made
// std::filesystem throw filesystem_error out of Task::load instead of
// NotFound naming the key.
TEST_F(TaskFiles, FuzzOverlongDatasetPathIsNotFound) {
  const std::string long_name(300, '+');
  const std::string rest = "output_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n";
  EXPECT_NE(error_of("task: t\ndataset_path: Yue-MMLU" + long_name + "\n" + rest)
                .find("dataset_path 'Yue-MMLU++"),
            std::string::npos);
  EXPECT_NE(error_of("task: t\ndataset_path: .\ntest_split: " + long_name + ".json\n" + rest)
                .find("not found in"),
            std::string::npos);
  EXPECT_NE(error_of("task: t\ndataset_path: .\nfewshot_split: " + long_name + "\n" + rest)
                .find("not found in"),
            std::string::npos);
}

}  // namespace
}  // namespace tessera::eval
