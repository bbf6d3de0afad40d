#include "tessera/eval/task.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "json_value.h"
#include "py_random.h"
#include "task_impl.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/eval/template.h"
#include "utf8.h"

namespace tessera::eval {

namespace fs = std::filesystem;

const char* output_type_name(OutputType type) {
  switch (type) {
    case OutputType::kGenerateUntil:
      return "generate_until";
    case OutputType::kLoglikelihood:
      return "loglikelihood";
    case OutputType::kMultipleChoice:
      return "multiple_choice";
  }
  return "?";
}

Tokens MetricRuntime::tokens(std::string_view text) const {
  std::string s(text);
  if (spec.lowercase) s = utf8::ascii_lower(s);
  switch (tokenizer) {
    case TokenizerKind::k13a:
      return split_whitespace(tokenize_13a(utf8::rstrip(s)));
    case TokenizerKind::kNone:
      return split_whitespace(s);
    case TokenizerKind::kYue:
      return segmenter->segment(s);
    case TokenizerKind::kYueChar:
      return segment_characters(s);
    case TokenizerKind::kRouge:
      return rouge_tokenize(s);
  }
  return {};
}

namespace {

// ---------------------------------------------------------------------------
// Reading YAML with includes.

// One top-level key of the merged configuration and the file it came from.
struct Entry {
  YAML::Node node;
  std::string file;
};
using RawConfig = std::map<std::string, Entry>;

std::string read_text_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, path, ": cannot open ", what);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  TESSERA_CHECK(!in.bad(), DataLoss, path, ": read error");
  return buffer.str();
}

void load_raw(const fs::path& path, RawConfig& out, std::vector<std::string>& chain) {
  const std::string name = path.lexically_normal().string();
  std::error_code ec;
  const fs::path canonical = fs::weakly_canonical(path, ec);
  const std::string key = ec ? name : canonical.string();
  for (const std::string& seen : chain) {
    if (seen == key) {
      std::string cycle;
      for (const std::string& c : chain) cycle += c + " -> ";
      TESSERA_THROW(InvalidArgument, name, ": include cycle: ", cycle, name);
    }
  }
  const std::string text = read_text_file(name, "task file");
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    TESSERA_THROW(InvalidArgument, name, ": malformed YAML at line ", e.mark.line + 1, ", column ",
                  e.mark.column + 1, ": ", e.msg);
  }
  TESSERA_CHECK(root.IsMap(), InvalidArgument, name,
                ": expected a mapping of task keys at the top level");
  chain.push_back(key);
  if (const YAML::Node include = root["include"]) {
    TESSERA_CHECK(include.IsScalar(), InvalidArgument, name, ": include: expected a file name");
    const fs::path base = path.parent_path() / include.Scalar();
    load_raw(base, out, chain);
  }
  chain.pop_back();
  for (const auto& kv : root) {
    TESSERA_CHECK(kv.first.IsScalar(), InvalidArgument, name, ": keys must be plain strings (line ",
                  kv.first.Mark().line + 1, ")");
    const std::string k = kv.first.Scalar();
    if (k == "include") continue;
    out[k] = Entry{kv.second, name};
  }
}

// Typed reads that name the file, key path and YAML line in every message.
class Reader {
 public:
  Reader(const Entry& entry, std::string path)
      : node_(entry.node), file_(entry.file), path_(std::move(path)) {}
  Reader(YAML::Node node, std::string file, std::string path)
      : node_(std::move(node)), file_(std::move(file)), path_(std::move(path)) {}

  std::string where() const { return file_ + ": " + path_; }
  [[noreturn]] void fail(const std::string& message) const {
    TESSERA_THROW(InvalidArgument, where(), ": ", message, " (line ", node_.Mark().line + 1, ")");
  }

  std::string str() const {
    if (!node_.IsScalar()) fail("expected a string");
    return node_.Scalar();
  }
  int64_t integer() const {
    if (!node_.IsScalar()) fail("expected an integer");
    const std::string s = node_.Scalar();
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || end != s.c_str() + s.size() || errno == ERANGE) {
      fail("expected an integer, got '" + s + "'");
    }
    return v;
  }
  double number() const {
    if (!node_.IsScalar()) fail("expected a number");
    const std::string s = node_.Scalar();
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (s.empty() || end != s.c_str() + s.size()) fail("expected a number, got '" + s + "'");
    return v;
  }
  bool boolean() const {
    if (!node_.IsScalar()) fail("expected true or false");
    const std::string s = node_.Scalar();
    if (s == "true" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "False" || s == "FALSE") return false;
    fail("expected true or false, got '" + s + "'");
  }
  // A list of strings; a single string counts as a list of one.
  std::vector<std::string> str_list() const {
    std::vector<std::string> out;
    if (node_.IsScalar()) {
      out.push_back(node_.Scalar());
      return out;
    }
    if (!node_.IsSequence()) fail("expected a string or a list of strings");
    for (size_t i = 0; i < node_.size(); ++i) out.push_back(item(i).str());
    return out;
  }
  Reader item(size_t i) const {
    return Reader(node_[i], file_, path_ + "[" + std::to_string(i) + "]");
  }
  size_t size() const {
    if (!node_.IsSequence()) fail("expected a list");
    return node_.size();
  }
  // The keys of a mapping, each checked against `known`.
  std::vector<std::string> keys(const std::set<std::string>& known) const {
    if (!node_.IsMap()) fail("expected a mapping");
    std::vector<std::string> out;
    for (const auto& kv : node_) {
      const std::string k = kv.first.Scalar();
      if (!known.count(k)) {
        std::string list;
        for (const auto& s : known) list += (list.empty() ? "" : ", ") + s;
        TESSERA_THROW(InvalidArgument, file_, ": unknown key '", path_, ".", k, "' (line ",
                      kv.first.Mark().line + 1, "; expected one of: ", list, ")");
      }
      out.push_back(k);
    }
    return out;
  }
  Reader field(const std::string& key) const {
    return Reader(node_[key], file_, path_ + "." + key);
  }
  bool has(const std::string& key) const { return node_.IsMap() && node_[key]; }
  const std::string& file() const { return file_; }
  const YAML::Node& node() const { return node_; }

 private:
  YAML::Node node_;
  std::string file_;
  std::string path_;
};

const std::set<std::string> kTopLevelKeys = {
    "task",           "dataset_path",      "test_split",        "fewshot_split",
    "output_type",    "doc_to_text",       "doc_to_target",     "doc_to_choice",
    "description",    "target_delimiter",  "fewshot_delimiter", "num_fewshot",
    "fewshot_config", "generation_kwargs", "metric_list",       "filter_list",
    "version",        "metadata"};

struct MetricInfo {
  const char* name;
  const char* aggregation;
  bool higher_is_better;
  std::set<std::string> options;
  std::set<OutputType> output_types;
};

const std::vector<MetricInfo>& metric_infos() {
  static const std::vector<MetricInfo> kInfos = {
      {"exact_match",
       "mean",
       true,
       {"ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"},
       {OutputType::kGenerateUntil}},
      {"bleu",
       "bleu",
       true,
       {"tokenize", "smooth_method", "smooth_value", "lowercase", "lexicon"},
       {OutputType::kGenerateUntil}},
      {"rouge_l", "mean", true, {"tokenize", "lowercase", "lexicon"}, {OutputType::kGenerateUntil}},
      {"acc", "mean", true, {}, {OutputType::kMultipleChoice, OutputType::kLoglikelihood}},
      {"acc_norm", "mean", true, {"length_unit"}, {OutputType::kMultipleChoice}},
      {"perplexity", "perplexity", false, {}, {OutputType::kLoglikelihood}},
  };
  return kInfos;
}

const MetricInfo* find_metric(const std::string& name) {
  for (const MetricInfo& m : metric_infos()) {
    if (name == m.name) return &m;
  }
  return nullptr;
}

std::vector<MetricSpec> default_metrics(OutputType type) {
  std::vector<std::string> names;
  switch (type) {
    case OutputType::kGenerateUntil:
      names = {"exact_match"};
      break;
    case OutputType::kMultipleChoice:
      names = {"acc", "acc_norm"};
      break;
    case OutputType::kLoglikelihood:
      names = {"perplexity", "acc"};
      break;
  }
  std::vector<MetricSpec> out;
  for (const auto& n : names) {
    const MetricInfo* info = find_metric(n);
    MetricSpec spec;
    spec.metric = n;
    spec.aggregation = info->aggregation;
    spec.higher_is_better = info->higher_is_better;
    out.push_back(spec);
  }
  return out;
}

MetricSpec parse_metric(const Reader& r, OutputType output_type) {
  if (!r.node().IsMap()) r.fail("expected a mapping with a 'metric' key");
  if (!r.has("metric")) r.fail("missing required key 'metric'");
  MetricSpec spec;
  spec.metric = r.field("metric").str();
  const MetricInfo* info = find_metric(spec.metric);
  if (!info) {
    r.field("metric").fail("unknown metric '" + spec.metric +
                           "' (expected exact_match, bleu, rouge_l, acc, acc_norm or perplexity)");
  }
  if (!info->output_types.count(output_type)) {
    r.field("metric").fail("metric '" + spec.metric + "' does not apply to output_type " +
                           output_type_name(output_type));
  }
  std::set<std::string> known = info->options;
  known.insert({"metric", "aggregation", "higher_is_better"});
  r.keys(known);
  spec.aggregation = info->aggregation;
  if (r.has("aggregation")) {
    const std::string agg = r.field("aggregation").str();
    if (agg != info->aggregation) {
      r.field("aggregation")
          .fail("metric '" + spec.metric + "' aggregates with '" + info->aggregation + "', not '" +
                agg + "'");
    }
  }
  spec.higher_is_better = info->higher_is_better;
  if (r.has("higher_is_better")) spec.higher_is_better = r.field("higher_is_better").boolean();
  if (r.has("ignore_case")) spec.ignore_case = r.field("ignore_case").boolean();
  if (r.has("ignore_punctuation"))
    spec.ignore_punctuation = r.field("ignore_punctuation").boolean();
  if (r.has("ignore_numbers")) spec.ignore_numbers = r.field("ignore_numbers").boolean();
  if (r.has("regexes_to_ignore")) spec.regexes_to_ignore = r.field("regexes_to_ignore").str_list();
  if (spec.metric == "bleu") spec.tokenize = "13a";
  if (spec.metric == "rouge_l") spec.tokenize = "rouge";
  if (r.has("tokenize")) {
    spec.tokenize = r.field("tokenize").str();
    const std::set<std::string> allowed =
        spec.metric == "bleu" ? std::set<std::string>{"13a", "none", "yue", "yue_char"}
                              : std::set<std::string>{"rouge", "none", "yue", "yue_char"};
    if (!allowed.count(spec.tokenize)) {
      std::string list;
      for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
      r.field("tokenize").fail("unknown tokenizer '" + spec.tokenize + "' (expected " + list + ")");
    }
  }
  if (r.has("smooth_method")) {
    spec.smooth_method = r.field("smooth_method").str();
    try {
      parse_bleu_smoothing(spec.smooth_method);
    } catch (const InvalidArgument& e) {
      r.field("smooth_method").fail(e.message());
    }
  }
  if (r.has("smooth_value")) spec.smooth_value = r.field("smooth_value").number();
  if (r.has("lowercase")) spec.lowercase = r.field("lowercase").boolean();
  if (r.has("lexicon")) {
    const fs::path base = fs::path(r.file()).parent_path();
    spec.lexicon = (base / r.field("lexicon").str()).lexically_normal().string();
  }
  if (spec.tokenize == "yue" && spec.lexicon.empty()) {
    r.fail("tokenize 'yue' needs a 'lexicon' (word list file, relative to the task file)");
  }
  if (r.has("length_unit")) {
    spec.length_unit = r.field("length_unit").str();
    if (spec.length_unit != "chars" && spec.length_unit != "bytes") {
      r.field("length_unit").fail("expected chars or bytes, got '" + spec.length_unit + "'");
    }
  }
  return spec;
}

FilterPipelineSpec parse_filter_pipeline(const Reader& r) {
  r.keys({"name", "filter"});
  if (!r.has("name")) r.fail("missing required key 'name'");
  if (!r.has("filter")) r.fail("missing required key 'filter'");
  FilterPipelineSpec spec;
  spec.name = r.field("name").str();
  const Reader list = r.field("filter");
  for (size_t i = 0; i < list.size(); ++i) {
    const Reader f = list.item(i);
    f.keys({"function", "regex_pattern", "group_select", "fallback", "letters"});
    if (!f.has("function")) f.fail("missing required key 'function'");
    FilterSpec fs_spec;
    fs_spec.function = f.field("function").str();
    const std::map<std::string, std::set<std::string>> allowed = {
        {"regex", {"regex_pattern", "group_select", "fallback"}},
        {"choice_letter", {"letters", "fallback"}},
        {"gsm8k_number", {"fallback"}},
    };
    const auto it = allowed.find(fs_spec.function);
    for (const auto& kv : f.node()) {
      const std::string k = kv.first.Scalar();
      if (k == "function") continue;
      if (it == allowed.end() || !it->second.count(k)) {
        f.field(k).fail("option '" + k + "' does not apply to filter '" + fs_spec.function + "'");
      }
    }
    if (f.has("regex_pattern")) fs_spec.regex_pattern = f.field("regex_pattern").str();
    if (f.has("group_select"))
      fs_spec.group_select = static_cast<int>(f.field("group_select").integer());
    if (f.has("fallback")) fs_spec.fallback = f.field("fallback").str();
    if (f.has("letters")) fs_spec.letters = f.field("letters").str();
    spec.filters.push_back(std::move(fs_spec));
  }
  return spec;
}

// ---------------------------------------------------------------------------
// Documents

struct LoadedDocs {
  std::vector<Value> docs;
  std::vector<std::string> sources;
};

void load_json_file(const fs::path& path, const std::string& label, LoadedDocs& out) {
  const std::string text = read_text_file(path.string(), "data file");
  const std::string ext = path.extension().string();
  if (ext == ".jsonl") {
    std::istringstream lines(text);
    std::string line;
    size_t number = 0, item = 0;
    while (std::getline(lines, line)) {
      ++number;
      if (utf8::strip(line).empty()) continue;
      const Value v =
          value_from_json(parse_json_text(line, label + " line " + std::to_string(number)));
      TESSERA_CHECK(v.is_object(), InvalidArgument, label, " line ", number,
                    ": expected a JSON object, got ", Value::kind_name(v.kind()));
      out.docs.push_back(v);
      out.sources.push_back(label + " item " + std::to_string(item++));
    }
    return;
  }
  const Value v = value_from_json(parse_json_text(text, label));
  TESSERA_CHECK(v.is_list(), InvalidArgument, label, ": expected a JSON array of objects, got ",
                Value::kind_name(v.kind()));
  const auto& items = v.as_list();
  for (size_t i = 0; i < items.size(); ++i) {
    TESSERA_CHECK(items[i].is_object(), InvalidArgument, label, ": item ", i, " is ",
                  Value::kind_name(items[i].kind()), ", expected an object");
    out.docs.push_back(items[i]);
    out.sources.push_back(label + " item " + std::to_string(i));
  }
}

bool is_data_file(const fs::path& p) {
  return p.extension() == ".json" || p.extension() == ".jsonl";
}

// Files of a split: `names` inside `dir` (or every data file of `dir` when
// `names` is empty and `all_when_empty`).
std::vector<fs::path> split_files(const fs::path& dir, const std::vector<std::string>& names,
                                  const std::string& where) {
  // std::error_code overloads throughout: a path the file system refuses
  // (too long, not readable) is a NotFound naming it, not a filesystem_error.
  std::vector<fs::path> files;
  std::error_code ec;
  if (names.empty()) {
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      std::error_code type_ec;
      if (it->is_regular_file(type_ec) && is_data_file(it->path())) files.push_back(it->path());
    }
    TESSERA_CHECK(!ec, NotFound, where, ": cannot list ", dir.string(), ": ", ec.message());
    std::sort(files.begin(), files.end());
    TESSERA_CHECK(!files.empty(), InvalidArgument, where, ": no .json or .jsonl files in ",
                  dir.string());
    return files;
  }
  for (const std::string& n : names) {
    const fs::path p = dir / n;
    TESSERA_CHECK(fs::is_regular_file(p, ec), NotFound, where, ": '", n, "' not found in ",
                  dir.string());
    files.push_back(p);
  }
  return files;
}

// ---------------------------------------------------------------------------
// Rendering

struct CompiledTemplates {
  std::string file_text, file_target, file_choice, file_description;
  std::optional<Template> text, target, description;
  std::vector<Template> choice;  // list form: one per choice; else one template yielding a list
};

// Renders one document; errors get the document's position.
struct RenderedDoc {
  std::string description, text, target;
  std::vector<std::string> choices;
  size_t gold = 0;
};

std::string relabel(const InvalidArgument& e, const std::string& file, const std::string& key,
                    const std::string& source, size_t doc) {
  // Template messages start with the template's name, "file: key: ".
  std::string message = e.message();
  const std::string prefix = file + ": " + key + ": ";
  if (message.compare(0, prefix.size(), prefix) == 0) message = message.substr(prefix.size());
  return file + ": " + key + ": " + source + " (doc " + std::to_string(doc) + "): " + message;
}

// Python's str.isdigit() for ASCII.
bool all_digits(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

RenderedDoc render_doc(const TaskConfig& config, const CompiledTemplates& t, const Value& doc,
                       const std::string& source, size_t index) {
  RenderedDoc out;
  auto guard = [&](const std::string& file, const std::string& key, auto&& fn) {
    try {
      fn();
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(relabel(e, file, key, source, index));
    }
  };
  if (t.description) {
    guard(t.file_description, "description", [&] { out.description = t.description->render(doc); });
  }
  guard(t.file_text, "doc_to_text", [&] { out.text = t.text->render(doc); });
  if (config.output_type != OutputType::kMultipleChoice) {
    guard(t.file_target, "doc_to_target", [&] { out.target = t.target->render(doc); });
    return out;
  }
  guard(t.file_choice, "doc_to_choice", [&] {
    if (config.doc_to_choice_is_list) {
      for (const Template& c : t.choice) out.choices.push_back(c.render(doc));
    } else {
      const Value v = t.choice[0].evaluate(doc);
      if (!v.is_list()) {
        TESSERA_THROW(InvalidArgument, "expected a list of choices, got ",
                      Value::kind_name(v.kind()),
                      " (write the template as a single {{ expression }} that yields a list)");
      }
      for (const Value& c : v.as_list()) out.choices.push_back(python_str(c));
    }
    if (out.choices.empty()) TESSERA_THROW(InvalidArgument, "no choices");
  });
  guard(t.file_target, "doc_to_target", [&] {
    const Value v = t.target->evaluate(doc);
    int64_t index = -1;
    if (v.is_int()) {
      index = v.as_int();
    } else if (v.is_string() && all_digits(v.as_string())) {
      index = std::strtoll(v.as_string().c_str(), nullptr, 10);
    } else if (v.is_string()) {
      const auto it = std::find(out.choices.begin(), out.choices.end(), v.as_string());
      if (it == out.choices.end()) {
        std::string list;
        for (const auto& c : out.choices) list += (list.empty() ? "'" : ", '") + c + "'";
        TESSERA_THROW(InvalidArgument, "target '", v.as_string(),
                      "' is neither an index nor one of the choices ", list);
      }
      index = it - out.choices.begin();
    } else {
      TESSERA_THROW(InvalidArgument, "target must be an index or a choice, got ",
                    Value::kind_name(v.kind()));
    }
    if (index < 0 || index >= static_cast<int64_t>(out.choices.size())) {
      TESSERA_THROW(InvalidArgument, "target index ", index, " is out of range for ",
                    out.choices.size(), " choices");
    }
    out.gold = static_cast<size_t>(index);
    out.target = out.choices[out.gold];
  });
  return out;
}

std::shared_ptr<const YueSegmenter> segmenter_for(
    const std::string& path, std::map<std::string, std::shared_ptr<const YueSegmenter>>& cache) {
  auto it = cache.find(path);
  if (it != cache.end()) return it->second;
  auto seg = std::make_shared<const YueSegmenter>(YueSegmenter::load(path));
  cache[path] = seg;
  return seg;
}

}  // namespace

// ---------------------------------------------------------------------------

Task::Task(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

Task Task::load(const std::string& yaml_path, const TaskLoadOptions& options) {
  RawConfig raw;
  std::vector<std::string> chain;
  load_raw(fs::path(yaml_path), raw, chain);
  const std::string leaf = fs::path(yaml_path).lexically_normal().string();

  for (const auto& [key, entry] : raw) {
    if (!kTopLevelKeys.count(key)) {
      TESSERA_THROW(InvalidArgument, entry.file, ": unknown key '", key, "' (line ",
                    entry.node.Mark().line + 1, ")");
    }
  }
  auto require = [&](const std::string& key) -> const Entry& {
    const auto it = raw.find(key);
    TESSERA_CHECK(it != raw.end(), InvalidArgument, leaf, ": missing required key '", key, "'");
    return it->second;
  };
  auto reader = [&](const std::string& key) { return Reader(raw.at(key), key); };
  auto has = [&](const std::string& key) { return raw.count(key) > 0; };

  auto impl = std::make_shared<Impl>();
  TaskConfig& c = impl->config;
  c.source_path = leaf;
  c.task = Reader(require("task"), "task").str();
  TESSERA_CHECK(!c.task.empty(), InvalidArgument, raw.at("task").file, ": task: must not be empty");
  c.dataset_path = Reader(require("dataset_path"), "dataset_path").str();
  {
    const std::string type = Reader(require("output_type"), "output_type").str();
    if (type == "generate_until") {
      c.output_type = OutputType::kGenerateUntil;
    } else if (type == "loglikelihood") {
      c.output_type = OutputType::kLoglikelihood;
    } else if (type == "multiple_choice") {
      c.output_type = OutputType::kMultipleChoice;
    } else {
      reader("output_type")
          .fail("expected generate_until, loglikelihood or multiple_choice, got '" + type + "'");
    }
  }
  c.doc_to_text = Reader(require("doc_to_text"), "doc_to_text").str();
  c.doc_to_target = Reader(require("doc_to_target"), "doc_to_target").str();
  if (c.output_type == OutputType::kMultipleChoice) {
    const Entry& e = require("doc_to_choice");
    const Reader r(e, "doc_to_choice");
    if (e.node.IsSequence()) {
      c.doc_to_choice_is_list = true;
      c.doc_to_choice = r.str_list();
      if (c.doc_to_choice.empty()) r.fail("needs at least one choice");
    } else {
      c.doc_to_choice = {r.str()};
    }
  } else if (has("doc_to_choice")) {
    reader("doc_to_choice").fail("applies only to output_type multiple_choice");
  }
  if (has("test_split")) c.test_split = reader("test_split").str_list();
  if (has("fewshot_split")) c.fewshot_split = reader("fewshot_split").str_list();
  if (has("description")) c.description = reader("description").str();
  if (has("target_delimiter")) c.target_delimiter = reader("target_delimiter").str();
  if (has("fewshot_delimiter")) c.fewshot_delimiter = reader("fewshot_delimiter").str();
  if (has("num_fewshot")) {
    const int64_t n = reader("num_fewshot").integer();
    if (n < 0 || n > 1000) reader("num_fewshot").fail("expected 0..1000, got " + std::to_string(n));
    c.num_fewshot = static_cast<int>(n);
  }
  if (options.num_fewshot) {
    TESSERA_CHECK(*options.num_fewshot >= 0 && *options.num_fewshot <= 1000, InvalidArgument, leaf,
                  ": num_fewshot override: expected 0..1000, got ", *options.num_fewshot);
    c.num_fewshot = *options.num_fewshot;
  }
  if (!options.task_name.empty()) c.task = options.task_name;
  if (has("fewshot_config")) {
    const Reader r = reader("fewshot_config");
    r.keys({"sampler", "seed"});
    if (r.has("sampler")) {
      const std::string s = r.field("sampler").str();
      if (s == "first_n") {
        c.sampler = FewshotSampler::kFirstN;
      } else if (s == "random" || s == "default") {
        c.sampler = FewshotSampler::kRandom;
      } else {
        r.field("sampler").fail("expected first_n or random, got '" + s + "'");
      }
    }
    if (r.has("seed")) {
      const int64_t seed = r.field("seed").integer();
      if (seed < 0) r.field("seed").fail("expected a non-negative seed");
      c.fewshot_seed = static_cast<uint64_t>(seed);
    }
  }
  if (has("generation_kwargs")) {
    if (c.output_type != OutputType::kGenerateUntil) {
      reader("generation_kwargs").fail("applies only to output_type generate_until");
    }
    const Reader r = reader("generation_kwargs");
    r.keys({"until", "max_gen_toks", "temperature", "do_sample"});
    if (r.has("until")) c.generation_kwargs.until = r.field("until").str_list();
    if (r.has("max_gen_toks")) {
      const int64_t n = r.field("max_gen_toks").integer();
      if (n <= 0) r.field("max_gen_toks").fail("must be positive");
      c.generation_kwargs.max_gen_toks = static_cast<int>(n);
    }
    if (r.has("temperature")) {
      c.generation_kwargs.temperature = r.field("temperature").number();
      if (c.generation_kwargs.temperature < 0) r.field("temperature").fail("must not be negative");
    }
    if (r.has("do_sample")) c.generation_kwargs.do_sample = r.field("do_sample").boolean();
  }
  if (c.generation_kwargs.until.empty()) c.generation_kwargs.until = {c.fewshot_delimiter};
  if (has("version") && has("metadata")) {
    reader("metadata").fail("give the version either as 'version' or as 'metadata.version'");
  }
  if (has("version")) c.version = reader("version").str();
  if (has("metadata")) {
    const Reader r = reader("metadata");
    r.keys({"version"});
    if (r.has("version")) c.version = r.field("version").str();
  }
  if (has("metric_list")) {
    const Reader r = reader("metric_list");
    std::set<std::string> seen;
    for (size_t i = 0; i < r.size(); ++i) {
      MetricSpec m = parse_metric(r.item(i), c.output_type);
      if (!seen.insert(m.metric).second)
        r.item(i).fail("metric '" + m.metric + "' is listed twice");
      c.metric_list.push_back(std::move(m));
    }
    if (c.metric_list.empty()) r.fail("needs at least one metric");
  } else {
    c.metric_list = default_metrics(c.output_type);
  }
  if (has("filter_list")) {
    if (c.output_type != OutputType::kGenerateUntil) {
      reader("filter_list").fail("applies only to output_type generate_until");
    }
    const Reader r = reader("filter_list");
    std::set<std::string> seen;
    for (size_t i = 0; i < r.size(); ++i) {
      FilterPipelineSpec p = parse_filter_pipeline(r.item(i));
      if (!seen.insert(p.name).second) r.item(i).fail("filter '" + p.name + "' is listed twice");
      impl->filters.push_back(FilterPipeline::create(p, r.item(i).where()));
      c.filter_list.push_back(std::move(p));
    }
    if (c.filter_list.empty()) r.fail("needs at least one filter pipeline");
  } else {
    FilterSpec take_first;
    take_first.function = "take_first";
    FilterPipelineSpec none{"none", {take_first}};
    impl->filters.push_back(FilterPipeline::create(none, leaf + ": filter_list"));
    c.filter_list.push_back(std::move(none));
  }

  // Metrics ready to run.
  std::map<std::string, std::shared_ptr<const YueSegmenter>> segmenters;
  for (size_t i = 0; i < c.metric_list.size(); ++i) {
    const MetricSpec& m = c.metric_list[i];
    const std::string where =
        raw.count("metric_list")
            ? raw.at("metric_list").file + ": metric_list[" + std::to_string(i) + "]"
            : leaf + ": " + m.metric;
    MetricRuntime rt;
    rt.spec = m;
    if (m.metric == "exact_match") {
      ExactMatchOptions o;
      o.ignore_case = m.ignore_case;
      o.ignore_punctuation = m.ignore_punctuation;
      o.ignore_numbers = m.ignore_numbers;
      o.regexes_to_ignore = m.regexes_to_ignore;
      rt.exact = ExactMatcher::create(o, where);
    }
    if (m.tokenize == "13a") rt.tokenizer = TokenizerKind::k13a;
    if (m.tokenize == "none") rt.tokenizer = TokenizerKind::kNone;
    if (m.tokenize == "yue_char") rt.tokenizer = TokenizerKind::kYueChar;
    if (m.tokenize == "rouge") rt.tokenizer = TokenizerKind::kRouge;
    if (m.tokenize == "yue") {
      rt.tokenizer = TokenizerKind::kYue;
      try {
        rt.segmenter = segmenter_for(m.lexicon, segmenters);
      } catch (const Error& e) {
        throw_error(e.code(), where + ".lexicon: " + e.message());
      }
    }
    rt.bleu.smoothing = parse_bleu_smoothing(m.smooth_method);
    rt.bleu.smooth_value = m.smooth_value;
    rt.length_in_bytes = m.length_unit == "bytes";
    impl->metrics.push_back(std::move(rt));
  }

  // Templates.
  CompiledTemplates t;
  auto compile = [&](const std::string& key, const std::string& source, std::string* file_out) {
    const std::string file = raw.at(key).file;
    *file_out = file;
    return Template::compile(source, file + ": " + key);
  };
  t.text = compile("doc_to_text", c.doc_to_text, &t.file_text);
  t.target = compile("doc_to_target", c.doc_to_target, &t.file_target);
  if (has("description"))
    t.description = compile("description", c.description, &t.file_description);
  if (c.output_type == OutputType::kMultipleChoice) {
    for (size_t i = 0; i < c.doc_to_choice.size(); ++i) {
      const std::string key =
          c.doc_to_choice_is_list ? "doc_to_choice[" + std::to_string(i) + "]" : "doc_to_choice";
      t.file_choice = raw.at("doc_to_choice").file;
      t.choice.push_back(Template::compile(c.doc_to_choice[i], t.file_choice + ": " + key));
    }
  }

  // Documents.
  const std::string data_file = raw.at("dataset_path").file;
  fs::path dataset = c.dataset_path;
  if (dataset.is_relative()) dataset = fs::path(options.data_root) / dataset;
  std::error_code dataset_ec;
  TESSERA_CHECK(fs::exists(dataset, dataset_ec), NotFound, data_file, ": dataset_path '",
                c.dataset_path, "' not found (looked for ", dataset.string(),
                dataset_ec ? ": " + dataset_ec.message() : std::string(), ")");
  const fs::path label_base = fs::path(c.dataset_path);
  LoadedDocs test, shots;
  const bool folder = fs::is_directory(dataset, dataset_ec);
  if (folder) {
    for (const fs::path& f :
         split_files(dataset, c.test_split,
                     raw.count("test_split") ? raw.at("test_split").file + ": test_split"
                                             : data_file + ": dataset_path")) {
      load_json_file(f, (label_base / f.filename()).string(), test);
    }
  } else {
    if (has("test_split")) {
      reader("test_split")
          .fail("dataset_path '" + c.dataset_path +
                "' is a file; test_split names files inside a dataset folder");
    }
    load_json_file(dataset, label_base.string(), test);
  }
  TESSERA_CHECK(!test.docs.empty(), InvalidArgument, data_file, ": dataset_path '", c.dataset_path,
                "' holds no documents");
  const bool separate_fewshot = !c.fewshot_split.empty();
  if (separate_fewshot) {
    const fs::path dir = folder ? dataset : dataset.parent_path();
    const fs::path label_dir = folder ? label_base : label_base.parent_path();
    for (const fs::path& f :
         split_files(dir, c.fewshot_split, raw.at("fewshot_split").file + ": fewshot_split")) {
      load_json_file(f, (label_dir / f.filename()).string(), shots);
    }
  }

  const size_t n = test.docs.size();
  impl->docs = std::move(test.docs);
  impl->sources = std::move(test.sources);
  impl->descriptions.resize(n);
  impl->texts.resize(n);
  impl->targets.resize(n);
  impl->choices.resize(n);
  impl->gold.resize(n);
  for (size_t i = 0; i < n; ++i) {
    RenderedDoc r = render_doc(c, t, impl->docs[i], impl->sources[i], i);
    impl->descriptions[i] = std::move(r.description);
    impl->texts[i] = std::move(r.text);
    impl->targets[i] = std::move(r.target);
    impl->choices[i] = std::move(r.choices);
    impl->gold[i] = r.gold;
  }
  if (separate_fewshot) {
    for (size_t k = 0; k < shots.docs.size(); ++k) {
      RenderedDoc r = render_doc(c, t, shots.docs[k], shots.sources[k], k);
      impl->fewshot_texts.push_back(std::move(r.text));
      impl->fewshot_targets.push_back(std::move(r.target));
    }
  } else {
    impl->fewshot_texts = impl->texts;
    impl->fewshot_targets = impl->targets;
  }

  // Few-shot draws, in document order (lm-eval's ContextSampler).
  impl->fewshot.resize(n);
  if (c.num_fewshot > 0) {
    const size_t pool = impl->fewshot_texts.size();
    const size_t draw = static_cast<size_t>(c.num_fewshot) + (separate_fewshot ? 0 : 1);
    if (draw > pool) {
      const std::string key_file = options.num_fewshot
                                       ? leaf + " (num_fewshot override)"
                                       : (has("num_fewshot") ? raw.at("num_fewshot").file : leaf);
      TESSERA_THROW(InvalidArgument, key_file, ": num_fewshot: ", c.num_fewshot, " examples need ",
                    draw, " few-shot documents",
                    separate_fewshot
                        ? ""
                        : " (one more than asked, since the test documents serve as examples)",
                    " but there are ", pool);
    }
    PyRandom rng(c.fewshot_seed);
    for (size_t i = 0; i < n; ++i) {
      std::vector<size_t> drawn;
      if (c.sampler == FewshotSampler::kFirstN) {
        for (size_t k = 0; k < draw; ++k) drawn.push_back(k);
      } else {
        drawn = rng.sample(pool, draw);
      }
      std::vector<size_t>& chosen = impl->fewshot[i];
      for (size_t k : drawn) {
        if (!separate_fewshot && k == i) continue;
        if (chosen.size() < static_cast<size_t>(c.num_fewshot)) chosen.push_back(k);
      }
    }
  }
  TESSERA_LOG(Debug, "eval") << c.task << ": loaded " << n << " documents from " << c.dataset_path;
  return Task(std::move(impl));
}

const TaskConfig& Task::config() const { return impl_->config; }
const std::string& Task::name() const { return impl_->config.task; }
const std::string& Task::version() const { return impl_->config.version; }
size_t Task::size() const { return impl_->docs.size(); }

namespace {
void check_index(size_t i, size_t n, const char* what) {
  TESSERA_CHECK(i < n, InvalidArgument, what, " index ", i, " out of range (", n, ")");
}
}  // namespace

const Value& Task::doc(size_t i) const {
  check_index(i, size(), "document");
  return impl_->docs[i];
}
const std::string& Task::doc_source(size_t i) const {
  check_index(i, size(), "document");
  return impl_->sources[i];
}
const std::string& Task::description(size_t i) const {
  check_index(i, size(), "document");
  return impl_->descriptions[i];
}
const std::string& Task::text(size_t i) const {
  check_index(i, size(), "document");
  return impl_->texts[i];
}
const std::string& Task::target(size_t i) const {
  check_index(i, size(), "document");
  return impl_->targets[i];
}
const std::vector<std::string>& Task::choices(size_t i) const {
  check_index(i, size(), "document");
  return impl_->choices[i];
}
size_t Task::gold(size_t i) const {
  check_index(i, size(), "document");
  return impl_->gold[i];
}
const std::vector<size_t>& Task::fewshot_indices(size_t i) const {
  check_index(i, size(), "document");
  return impl_->fewshot[i];
}
const std::string& Task::fewshot_text(size_t k) const {
  check_index(k, fewshot_size(), "few-shot document");
  return impl_->fewshot_texts[k];
}
const std::string& Task::fewshot_target(size_t k) const {
  check_index(k, fewshot_size(), "few-shot document");
  return impl_->fewshot_targets[k];
}
size_t Task::fewshot_size() const { return impl_->fewshot_texts.size(); }

}  // namespace tessera::eval
