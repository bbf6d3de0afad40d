#include "tessera/eval/results.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>

#include "json_value.h"
#include "task_impl.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/eval/metrics.h"
#include "tessera/eval/task.h"
#include "utf8.h"

namespace tessera::eval {

// ---------------------------------------------------------------------------
// Scoring

namespace {

size_t argmax(const std::vector<double>& xs) {
  size_t best = 0;
  for (size_t i = 1; i < xs.size(); ++i) {
    if (xs[i] > xs[best]) best = i;  // first maximum wins, as numpy.argmax
  }
  return best;
}

}  // namespace

SampleRecord score_document(const Task& task, const DocRequests& requests,
                            const DocResponses& responses) {
  const auto& impl = TaskAccess::impl(task);
  const TaskConfig& c = impl.config;
  const size_t i = requests.doc_index;
  TESSERA_CHECK(i < task.size(), InvalidArgument, task.name(), ": document ", i, " does not exist");
  SampleRecord r;
  r.task = task.name();
  r.doc_index = i;
  r.source = impl.sources[i];
  r.prompt = requests.prompt;
  r.target = impl.targets[i];

  if (c.output_type == OutputType::kGenerateUntil) {
    TESSERA_CHECK(responses.generations.size() == requests.generate.size(), InvalidArgument,
                  task.name(), ": document ", i, " has ", requests.generate.size(),
                  " generate requests but ", responses.generations.size(), " responses");
    r.responses = responses.generations;
    for (const FilterPipeline& pipeline : impl.filters) {
      FilterResult f;
      f.filter = pipeline.name();
      f.response = pipeline.apply(r.responses);
      for (const MetricRuntime& m : impl.metrics) {
        MetricValue v;
        v.metric = m.spec.metric;
        if (m.spec.metric == "exact_match") {
          v.value = m.exact->score(f.response, r.target);
        } else if (m.spec.metric == "bleu") {
          v.reference = r.target;
          v.prediction = f.response;
        } else if (m.spec.metric == "rouge_l") {
          v.value = 100.0 * rouge_l(m.tokens(r.target), m.tokens(f.response)).fmeasure;
        }
        f.metrics.push_back(std::move(v));
      }
      r.filters.push_back(std::move(f));
    }
    return r;
  }

  TESSERA_CHECK(responses.loglikelihoods.size() == requests.loglikelihood.size(), InvalidArgument,
                task.name(), ": document ", i, " has ", requests.loglikelihood.size(),
                " log-likelihood requests but ", responses.loglikelihoods.size(), " results");
  r.loglikelihoods = responses.loglikelihoods;
  FilterResult f;
  f.filter = "none";
  if (c.output_type == OutputType::kMultipleChoice) {
    r.choices = impl.choices[i];
    TESSERA_CHECK(r.loglikelihoods.size() == r.choices.size(), InvalidArgument, task.name(),
                  ": document ", i, " has ", r.choices.size(), " choices but ",
                  r.loglikelihoods.size(), " results");
    std::vector<double> lls;
    for (const auto& ll : r.loglikelihoods) lls.push_back(ll.logprob);
    const size_t pred = argmax(lls);
    f.response = r.choices[pred];
    for (const MetricRuntime& m : impl.metrics) {
      MetricValue v;
      v.metric = m.spec.metric;
      if (m.spec.metric == "acc") {
        v.value = pred == impl.gold[i] ? 1.0 : 0.0;
      } else if (m.spec.metric == "acc_norm") {
        std::vector<double> normed;
        for (size_t k = 0; k < lls.size(); ++k) {
          // An empty choice counts as length 1 rather than dividing by zero.
          const size_t len = m.length_in_bytes ? r.choices[k].size() : utf8::length(r.choices[k]);
          normed.push_back(lls[k] / static_cast<double>(std::max<size_t>(len, 1)));
        }
        v.value = argmax(normed) == impl.gold[i] ? 1.0 : 0.0;
      }
      f.metrics.push_back(std::move(v));
    }
  } else {
    TESSERA_CHECK(r.loglikelihoods.size() == 1, InvalidArgument, task.name(), ": document ", i,
                  " needs exactly one log-likelihood result");
    f.response = r.loglikelihoods[0].is_greedy ? "greedy" : "not greedy";
    for (const MetricRuntime& m : impl.metrics) {
      MetricValue v;
      v.metric = m.spec.metric;
      v.value = m.spec.metric == "acc" ? (r.loglikelihoods[0].is_greedy ? 1.0 : 0.0)
                                       : r.loglikelihoods[0].logprob;
      f.metrics.push_back(std::move(v));
    }
  }
  r.filters.push_back(std::move(f));
  return r;
}

// ---------------------------------------------------------------------------
// Aggregation

TaskResult aggregate(const Task& task, const std::vector<SampleRecord>& records,
                     const AggregateOptions& options) {
  const auto& impl = TaskAccess::impl(task);
  const TaskConfig& c = impl.config;
  TESSERA_CHECK(!records.empty(), InvalidArgument, task.name(), ": no records to aggregate");
  std::set<size_t> seen;
  for (const SampleRecord& r : records) {
    TESSERA_CHECK(r.task == task.name(), InvalidArgument, task.name(), ": record of document ",
                  r.doc_index, " belongs to task '", r.task, "'");
    TESSERA_CHECK(r.doc_index < task.size(), InvalidArgument, task.name(), ": record for document ",
                  r.doc_index, " but the task has ", task.size());
    TESSERA_CHECK(seen.insert(r.doc_index).second, InvalidArgument, task.name(), ": document ",
                  r.doc_index, " has two records");
  }
  TaskResult out;
  out.task = task.name();
  out.version = c.version;
  out.n_shot = c.num_fewshot;
  out.n_samples = records.size();
  out.n_total = task.size();

  std::vector<std::string> filter_names;
  if (c.output_type == OutputType::kGenerateUntil) {
    for (const auto& f : c.filter_list) filter_names.push_back(f.name);
  } else {
    filter_names.push_back("none");
  }
  const size_t n = records.size();
  const bool want_stderr = options.bootstrap_iters > 0 && n >= 2;
  for (const std::string& filter : filter_names) {
    for (const MetricRuntime& m : impl.metrics) {
      // The values of this metric under this filter, one per record.
      std::vector<const MetricValue*> values;
      for (const SampleRecord& r : records) {
        const MetricValue* found = nullptr;
        for (const FilterResult& f : r.filters) {
          if (f.filter != filter) continue;
          for (const MetricValue& v : f.metrics) {
            if (v.metric == m.spec.metric) found = &v;
          }
        }
        TESSERA_CHECK(found != nullptr, InvalidArgument, task.name(), ": record of document ",
                      r.doc_index, " has no '", m.spec.metric, "' under filter '", filter, "'");
        values.push_back(found);
      }
      ResultRow row;
      row.filter = filter;
      row.metric = m.spec.metric;
      row.higher_is_better = m.spec.higher_is_better;
      if (m.spec.aggregation == "mean") {
        std::vector<double> xs;
        for (const MetricValue* v : values) xs.push_back(v->value);
        row.value = mean(xs);
        if (want_stderr) {
          if (options.bootstrap_means) {
            row.stderr_value = bootstrap_stderr(
                [&xs](const std::vector<size_t>& idx) {
                  double s = 0;
                  for (size_t k : idx) s += xs[k];
                  return s / static_cast<double>(idx.size());
                },
                n, {options.bootstrap_iters});
          } else {
            row.stderr_value = mean_stderr(xs);
          }
        }
      } else if (m.spec.aggregation == "bleu") {
        std::vector<BleuStats> stats;
        for (const MetricValue* v : values) {
          stats.push_back(bleu_stats(m.tokens(v->prediction), {m.tokens(v->reference)}));
        }
        auto corpus = [&](const std::vector<size_t>& idx) {
          BleuStats total;
          for (size_t k : idx) total += stats[k];
          return bleu_from_stats(total, m.bleu).score;
        };
        std::vector<size_t> all(n);
        for (size_t k = 0; k < n; ++k) all[k] = k;
        row.value = corpus(all);
        if (want_stderr) {
          row.stderr_value =
              bootstrap_stderr(corpus, n, {std::min<int64_t>(options.bootstrap_iters, 100)});
        }
      } else if (m.spec.aggregation == "perplexity") {
        std::vector<double> lls;
        for (const MetricValue* v : values) lls.push_back(v->value);
        auto perplexity = [&](const std::vector<size_t>& idx) {
          double s = 0;
          for (size_t k : idx) s += lls[k];
          return std::exp(-s / static_cast<double>(idx.size()));
        };
        std::vector<size_t> all(n);
        for (size_t k = 0; k < n; ++k) all[k] = k;
        row.value = perplexity(all);
        if (want_stderr) {
          row.stderr_value = bootstrap_stderr(perplexity, n, {options.bootstrap_iters});
        }
      }
      out.rows.push_back(std::move(row));
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Tables and JSON

namespace {

std::string format_4(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.4f", v);
  return buf;
}

std::string pad(const std::string& s, size_t width, char align) {
  const size_t len = utf8::length(s);
  if (len >= width) return s;
  const size_t gap = width - len;
  if (align == 'r') return std::string(gap, ' ') + s;
  if (align == 'c') return std::string(gap / 2, ' ') + s + std::string(gap - gap / 2, ' ');
  return s + std::string(gap, ' ');
}

}  // namespace

std::string format_results_table(const std::vector<TaskResult>& results) {
  const std::vector<std::string> headers = {"Tasks", "Version", "Filter", "n-shot", "Metric",
                                            "",      "Value",   "",       "Stderr"};
  const std::string align = "lrlrllrlr";  // per column: l(eft) or r(ight)
  std::vector<std::vector<std::string>> rows;
  for (const TaskResult& t : results) {
    std::vector<const ResultRow*> sorted;
    for (const ResultRow& r : t.rows) sorted.push_back(&r);
    std::stable_sort(sorted.begin(), sorted.end(), [](const ResultRow* a, const ResultRow* b) {
      return a->metric + "," + a->filter < b->metric + "," + b->filter;
    });
    bool first = true;
    for (const ResultRow* r : sorted) {
      rows.push_back({first ? t.task : "", first ? t.version : "", r->filter,
                      std::to_string(t.n_shot), r->metric, r->higher_is_better ? "↑" : "↓",
                      format_4(r->value), "±",
                      r->stderr_value ? format_4(*r->stderr_value) : "   N/A"});
      first = false;
    }
  }
  std::vector<size_t> widths(headers.size(), 3);
  for (size_t k = 0; k < headers.size(); ++k) {
    widths[k] = std::max(widths[k], utf8::length(headers[k]));
    for (const auto& row : rows) widths[k] = std::max(widths[k], utf8::length(row[k]));
  }
  std::string out = "|";
  for (size_t k = 0; k < headers.size(); ++k) out += pad(headers[k], widths[k], 'c') + "|";
  out += "\n|";
  for (size_t k = 0; k < headers.size(); ++k) {
    out += align[k] == 'r' ? std::string(widths[k] - 1, '-') + ":" : std::string(widths[k], '-');
    out += "|";
  }
  out += "\n";
  for (const auto& row : rows) {
    out += "|";
    for (size_t k = 0; k < headers.size(); ++k) out += pad(row[k], widths[k], align[k]) + "|";
    out += "\n";
  }
  return out;
}

std::string results_to_json(const std::vector<TaskResult>& results) {
  OrderedJson j = OrderedJson::object();
  j["results"] = OrderedJson::object();
  j["versions"] = OrderedJson::object();
  j["n-shot"] = OrderedJson::object();
  j["higher_is_better"] = OrderedJson::object();
  j["n-samples"] = OrderedJson::object();
  for (const TaskResult& t : results) {
    OrderedJson entry = OrderedJson::object();
    entry["alias"] = t.task;
    OrderedJson hib = OrderedJson::object();
    for (const ResultRow& r : t.rows) {
      entry[r.metric + "," + r.filter] = r.value;
      if (r.stderr_value) {
        entry[r.metric + "_stderr," + r.filter] = *r.stderr_value;
      } else {
        entry[r.metric + "_stderr," + r.filter] = "N/A";
      }
      hib[r.metric] = r.higher_is_better;
    }
    j["results"][t.task] = entry;
    j["versions"][t.task] = t.version;
    j["n-shot"][t.task] = t.n_shot;
    j["higher_is_better"][t.task] = hib;
    j["n-samples"][t.task] = {{"original", t.n_total}, {"effective", t.n_samples}};
  }
  return j.dump(2, ' ', false, OrderedJson::error_handler_t::replace);
}

// ---------------------------------------------------------------------------
// Sample records

namespace {

// JSON has no infinities; a log-probability of -inf is stored as a string.
OrderedJson number_to_json(double v) {
  if (std::isfinite(v)) return v;
  if (std::isnan(v)) return "nan";
  return v > 0 ? "inf" : "-inf";
}

double number_from_json(const OrderedJson& j, const std::string& where) {
  if (j.is_number()) return j.get<double>();
  if (j.is_string()) {
    const std::string s = j.get<std::string>();
    if (s == "nan") return std::nan("");
    if (s == "inf") return INFINITY;
    if (s == "-inf") return -INFINITY;
  }
  TESSERA_THROW(DataLoss, where, ": expected a number");
}

}  // namespace

std::string sample_record_to_json(const SampleRecord& r) {
  OrderedJson j = OrderedJson::object();
  j["task"] = r.task;
  j["doc_index"] = r.doc_index;
  j["source"] = r.source;
  j["prompt"] = r.prompt;
  j["target"] = r.target;
  if (!r.choices.empty()) j["choices"] = r.choices;
  if (!r.responses.empty()) j["responses"] = r.responses;
  if (!r.loglikelihoods.empty()) {
    OrderedJson lls = OrderedJson::array();
    for (const auto& ll : r.loglikelihoods)
      lls.push_back({number_to_json(ll.logprob), ll.is_greedy});
    j["loglikelihoods"] = lls;
  }
  OrderedJson filters = OrderedJson::object();
  for (const FilterResult& f : r.filters) {
    OrderedJson metrics = OrderedJson::object();
    for (const MetricValue& v : f.metrics) {
      if (v.metric == "bleu") {
        metrics[v.metric] = {v.reference, v.prediction};
      } else {
        metrics[v.metric] = number_to_json(v.value);
      }
    }
    filters[f.filter] = {{"response", f.response}, {"metrics", metrics}};
  }
  j["filters"] = filters;
  return j.dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
}

SampleRecord sample_record_from_json(std::string_view line, std::string_view where_view) {
  const std::string where(where_view);
  OrderedJson j;
  try {
    j = parse_json_text(line, where);
  } catch (const InvalidArgument& e) {
    throw DataLoss(e.message());
  }
  auto need = [&](const char* key) -> const OrderedJson& {
    if (!j.is_object() || !j.contains(key)) TESSERA_THROW(DataLoss, where, ": missing '", key, "'");
    return j.at(key);
  };
  try {
    SampleRecord r;
    r.task = need("task").get<std::string>();
    r.doc_index = need("doc_index").get<size_t>();
    r.source = need("source").get<std::string>();
    r.prompt = need("prompt").get<std::string>();
    r.target = need("target").get<std::string>();
    if (j.contains("choices")) r.choices = j.at("choices").get<std::vector<std::string>>();
    if (j.contains("responses")) r.responses = j.at("responses").get<std::vector<std::string>>();
    if (j.contains("loglikelihoods")) {
      for (const auto& ll : j.at("loglikelihoods")) {
        if (!ll.is_array() || ll.size() != 2)
          TESSERA_THROW(DataLoss, where, ": bad loglikelihoods entry");
        r.loglikelihoods.push_back({number_from_json(ll[0], where), ll[1].get<bool>()});
      }
    }
    for (auto it = need("filters").begin(); it != need("filters").end(); ++it) {
      FilterResult f;
      f.filter = it.key();
      f.response = it.value().at("response").get<std::string>();
      const OrderedJson& metrics = it.value().at("metrics");
      for (auto m = metrics.begin(); m != metrics.end(); ++m) {
        MetricValue v;
        v.metric = m.key();
        if (m.value().is_array()) {
          if (m.value().size() != 2) TESSERA_THROW(DataLoss, where, ": bad '", v.metric, "' item");
          v.reference = m.value()[0].get<std::string>();
          v.prediction = m.value()[1].get<std::string>();
        } else {
          v.value = number_from_json(m.value(), where);
        }
        f.metrics.push_back(std::move(v));
      }
      r.filters.push_back(std::move(f));
    }
    return r;
  } catch (const OrderedJson::exception& e) {
    TESSERA_THROW(DataLoss, where, ": malformed sample record: ", e.what());
  }
}

SampleLog read_sample_log(const std::string& path, const std::string& task_name) {
  SampleLog log;
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) {
    TESSERA_CHECK(!std::filesystem::exists(path), NotFound, path, ": cannot open the sample log");
    return log;
  }
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  TESSERA_CHECK(!in.bad(), DataLoss, path, ": read error");
  size_t pos = 0, line_number = 0;
  while (pos < content.size()) {
    const size_t newline = content.find('\n', pos);
    const bool complete = newline != std::string::npos;
    const size_t end = complete ? newline : content.size();
    const std::string_view line(content.data() + pos, end - pos);
    ++line_number;
    const std::string where = path + ":" + std::to_string(line_number);
    if (utf8::strip(line).empty()) {
      pos = complete ? newline + 1 : content.size();
      if (complete) log.valid_bytes = pos;
      continue;
    }
    SampleRecord r;
    try {
      r = sample_record_from_json(line, where);
    } catch (const DataLoss& e) {
      if (!complete) {
        // The writer died in the middle of this line: drop it, run it again.
        log.truncated_last_line = true;
        TESSERA_LOG(Warn, "eval") << path << ": line " << line_number
                                  << " is cut off (no newline, not valid JSON); dropping it";
        break;
      }
      throw;
    }
    if (!task_name.empty()) {
      TESSERA_CHECK(r.task == task_name, InvalidArgument, where, ": record of task '", r.task,
                    "', expected '", task_name, "'");
    }
    TESSERA_CHECK(log.done.insert(r.doc_index).second, DataLoss, where, ": document ", r.doc_index,
                  " is logged twice");
    log.records.push_back(std::move(r));
    // A complete record without its newline still counts; the writer adds
    // the newline before appending (valid_bytes excludes nothing of it).
    pos = complete ? newline + 1 : content.size();
    log.valid_bytes = pos;
  }
  return log;
}

SampleLogWriter::SampleLogWriter(const std::string& path, uint64_t keep_bytes) : path_(path) {
  std::error_code ec;
  const bool exists = std::filesystem::exists(path, ec);
  if (exists) {
    std::filesystem::resize_file(path, keep_bytes, ec);
    TESSERA_CHECK(!ec, DataLoss, path, ": cannot cut the sample log to ", keep_bytes,
                  " bytes: ", ec.message());
  }
  out_.open(path, std::ios::binary | std::ios::app);
  TESSERA_CHECK(out_.good(), NotFound, path, ": cannot open the sample log for writing");
  // A kept last record written without its newline gets one now.
  if (exists && keep_bytes > 0) {
    std::ifstream in(path, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(keep_bytes) - 1);
    char last = '\n';
    in.get(last);
    if (last != '\n') {
      out_ << '\n';
      out_.flush();
    }
  }
}

void SampleLogWriter::append(const SampleRecord& record) {
  out_ << sample_record_to_json(record) << '\n';
  out_.flush();
  TESSERA_CHECK(out_.good(), DataLoss, path_, ": write to the sample log failed");
}

}  // namespace tessera::eval
