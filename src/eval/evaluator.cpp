#include "tessera/eval/evaluator.h"

#include <algorithm>
#include <map>
#include <memory>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"

namespace tessera::eval {

RunReport run_task(const Task& task, Backend& backend, const RunOptions& options) {
  TESSERA_CHECK(options.batch_size > 0, InvalidArgument, "run_task: batch_size must be positive");
  BuildOptions build;
  build.limit = options.limit;
  const std::vector<DocRequests> requests = build_requests(task, build);
  const size_t n = requests.size();

  RunReport report;
  std::map<size_t, SampleRecord> records;
  std::unique_ptr<SampleLogWriter> writer;
  if (!options.sample_log_path.empty()) {
    SampleLog log = read_sample_log(options.sample_log_path, task.name());
    report.log_was_truncated = log.truncated_last_line;
    for (SampleRecord& r : log.records) {
      if (r.doc_index >= n) continue;  // logged by a run with a larger limit
      if (r.prompt != requests[r.doc_index].prompt) {
        TESSERA_THROW(FailedPrecondition, options.sample_log_path,
                      ": the logged prompt of document ", r.doc_index,
                      " differs from the prompt built now; the task or its data "
                      "changed since the log was written (remove the log to start over)");
      }
      records.emplace(r.doc_index, std::move(r));
    }
    report.resumed = records.size();
    writer = std::make_unique<SampleLogWriter>(options.sample_log_path, log.valid_bytes);
    if (report.resumed > 0) {
      TESSERA_LOG(Info, "eval") << task.name() << ": resuming, " << report.resumed << " of " << n
                                << " documents already in " << options.sample_log_path;
    }
  }

  std::vector<size_t> todo;
  for (size_t i = 0; i < n; ++i) {
    if (!records.count(i)) todo.push_back(i);
  }
  const bool generate = task.config().output_type == OutputType::kGenerateUntil;
  const Stopwatch watch;
  auto progress = [&] {
    if (!options.on_progress) return;
    RunProgress p;
    p.done = records.size();
    p.total = n;
    p.resumed = report.resumed;
    p.seconds = watch.seconds();
    options.on_progress(p);
  };
  progress();
  size_t next = 0;
  while (next < todo.size()) {
    // A batch of whole documents, at most batch_size requests unless one
    // document alone has more.
    std::vector<size_t> docs;
    size_t count = 0;
    while (next < todo.size()) {
      const DocRequests& d = requests[todo[next]];
      const size_t k = generate ? d.generate.size() : d.loglikelihood.size();
      if (!docs.empty() && count + k > options.batch_size) break;
      docs.push_back(todo[next++]);
      count += k;
    }
    std::vector<DocResponses> responses(docs.size());
    if (generate) {
      std::vector<GenerateRequest> batch;
      for (size_t i : docs)
        batch.insert(batch.end(), requests[i].generate.begin(), requests[i].generate.end());
      const std::vector<std::string> out = backend.generate(batch);
      TESSERA_CHECK(out.size() == batch.size(), Internal, task.name(), ": backend returned ",
                    out.size(), " generations for ", batch.size(), " requests");
      size_t k = 0;
      for (size_t j = 0; j < docs.size(); ++j) {
        for (size_t r = 0; r < requests[docs[j]].generate.size(); ++r) {
          responses[j].generations.push_back(out[k++]);
        }
      }
    } else {
      std::vector<LoglikelihoodRequest> batch;
      for (size_t i : docs) {
        batch.insert(batch.end(), requests[i].loglikelihood.begin(),
                     requests[i].loglikelihood.end());
      }
      const std::vector<LoglikelihoodResult> out = backend.loglikelihood(batch);
      TESSERA_CHECK(out.size() == batch.size(), Internal, task.name(), ": backend returned ",
                    out.size(), " log-likelihoods for ", batch.size(), " requests");
      size_t k = 0;
      for (size_t j = 0; j < docs.size(); ++j) {
        for (size_t r = 0; r < requests[docs[j]].loglikelihood.size(); ++r) {
          responses[j].loglikelihoods.push_back(out[k++]);
        }
      }
    }
    for (size_t j = 0; j < docs.size(); ++j) {
      SampleRecord record = score_document(task, requests[docs[j]], responses[j]);
      if (writer) writer->append(record);
      records.emplace(docs[j], std::move(record));
    }
    report.evaluated += docs.size();
    TESSERA_LOG(Debug, "eval") << task.name() << ": " << records.size() << "/" << n << " documents";
    progress();
  }
  report.seconds = watch.seconds();

  for (auto& [i, r] : records) report.records.push_back(std::move(r));
  report.result = aggregate(task, report.records, options.aggregate);
  TESSERA_LOG(Info, "eval") << task.name() << ": evaluated " << n << " documents ("
                            << report.resumed << " resumed)";
  return report;
}

}  // namespace tessera::eval
