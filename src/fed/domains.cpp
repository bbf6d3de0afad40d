#include "tessera/fed/domains.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tessera/core/error.h"
#include "tessera/tasks/arithmetic.h"

namespace tessera::fed {

namespace fs = std::filesystem;

const char* domain_name(Domain domain) { return domain_name(static_cast<int>(domain)); }

const char* domain_name(int domain) {
  switch (domain) {
    case 0:
      return "english";
    case 1:
      return "cantonese";
    case 2:
      return "code";
    case 3:
      return "arithmetic";
  }
  TESSERA_THROW(InvalidArgument, "no domain ", domain, " (0..", kNumDomains - 1, ")");
}

DomainSources default_sources(const std::string& source_tree, const std::string& testdata_dir) {
  DomainSources s;
  s.english_file = testdata_dir + "/text/moby-dick.txt";
  s.cantonese_dir = testdata_dir + "/yue-benchmark";
  s.code_dirs = {source_tree + "/src", source_tree + "/include"};
  return s;
}

namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in, NotFound, "cannot read '", path, "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Files below `dir` whose name matches `keep`, sorted by path.
std::vector<std::string> files_below(const std::string& dir, bool (*keep)(const fs::path&)) {
  TESSERA_CHECK(fs::is_directory(dir), NotFound, "no folder '", dir, "'");
  std::vector<std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file() && keep(entry.path())) files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

bool is_json(const fs::path& p) { return p.extension() == ".json"; }

bool is_code(const fs::path& p) {
  const std::string ext = p.extension().string();
  return ext == ".h" || ext == ".hpp" || ext == ".cpp" || ext == ".cc" || ext == ".py" ||
         ext == ".cmake" || ext == ".proto" || p.filename() == "CMakeLists.txt";
}

// The Cantonese text of one Yue-Benchmark item: its question, choices and
// answers (the English source sentences and the false answers left out).
std::string yue_item_text(const nlohmann::json& item, const std::string& file) {
  static const char* kKeys[] = {"question", "A",           "B",    "C",  "D",
                                "answer",   "best_answer", "true", "yue"};
  TESSERA_CHECK(item.is_object(), InvalidArgument, file, ": an item that is not a JSON object");
  std::string text;
  for (const char* key : kKeys) {
    auto it = item.find(key);
    if (it != item.end() && it->is_string()) text += it->get<std::string>() + "\n";
  }
  return text;
}

DomainCorpus make_corpus(Domain d, std::vector<int32_t> ids, const DomainSources& s,
                         const std::string& what) {
  if (static_cast<int64_t>(ids.size()) > s.max_tokens)
    ids.resize(static_cast<size_t>(s.max_tokens));
  TESSERA_CHECK(ids.size() >= 4096, InvalidArgument, "the ", domain_name(d), " corpus (", what,
                ") has ", ids.size(), " tokens, expected at least 4096");
  const size_t held =
      static_cast<size_t>(std::llround(static_cast<double>(ids.size()) * s.heldout_fraction));
  DomainCorpus c;
  c.domain = d;
  c.train.assign(ids.begin(), ids.end() - static_cast<std::ptrdiff_t>(held));
  c.heldout.assign(ids.end() - static_cast<std::ptrdiff_t>(held), ids.end());
  return c;
}

void append(std::vector<int32_t>& ids, const std::vector<int32_t>& more) {
  ids.insert(ids.end(), more.begin(), more.end());
}

}  // namespace

std::vector<DomainCorpus> load_domain_corpora(const DomainSources& s,
                                              const nn::Tokenizer& tokenizer) {
  TESSERA_CHECK(s.heldout_fraction > 0 && s.heldout_fraction < 1, InvalidArgument,
                "heldout_fraction ", s.heldout_fraction, " is outside (0, 1)");
  TESSERA_CHECK(s.max_tokens >= 4096, InvalidArgument, "max_tokens ", s.max_tokens,
                " is below 4096");
  std::vector<DomainCorpus> out;
  out.push_back(make_corpus(Domain::kEnglish, tokenizer.encode(read_text(s.english_file), false), s,
                            s.english_file));

  std::vector<int32_t> yue;
  const std::vector<std::string> json_files = files_below(s.cantonese_dir, is_json);
  TESSERA_CHECK(!json_files.empty(), InvalidArgument, "no *.json files below '", s.cantonese_dir,
                "'");
  for (const std::string& file : json_files) {
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(read_text(file));
    } catch (const nlohmann::json::exception& e) {
      TESSERA_THROW(InvalidArgument, file, ": not JSON (", e.what(), ")");
    }
    TESSERA_CHECK(doc.is_array(), InvalidArgument, file, ": expected a JSON list of items");
    for (const auto& item : doc) append(yue, tokenizer.encode(yue_item_text(item, file), false));
    if (static_cast<int64_t>(yue.size()) >= s.max_tokens) break;
  }
  out.push_back(make_corpus(Domain::kCantonese, std::move(yue), s, s.cantonese_dir));

  std::vector<int32_t> code;
  TESSERA_CHECK(!s.code_dirs.empty(), InvalidArgument, "no code folders");
  for (const std::string& dir : s.code_dirs) {
    for (const std::string& file : files_below(dir, is_code)) {
      append(code, tokenizer.encode(read_text(file), false));
      if (static_cast<int64_t>(code.size()) >= s.max_tokens) break;
    }
    if (static_cast<int64_t>(code.size()) >= s.max_tokens) break;
  }
  out.push_back(make_corpus(Domain::kCode, std::move(code), s, "code folders"));

  std::vector<int32_t> arithmetic;
  for (int64_t id : tasks::arithmetic_corpus(tokenizer, s.arithmetic_examples, s.arithmetic_seed)) {
    arithmetic.push_back(static_cast<int32_t>(id));
  }
  out.push_back(make_corpus(Domain::kArithmetic, std::move(arithmetic), s, "arithmetic examples"));
  return out;
}

std::array<double, kNumDomains> dirichlet_mixture(double alpha, int home, std::mt19937_64& rng) {
  TESSERA_CHECK(alpha > 0 && std::isfinite(alpha), InvalidArgument, "Dirichlet alpha is ", alpha,
                ", expected > 0");
  TESSERA_CHECK(home >= 0 && home < kNumDomains, InvalidArgument, "home domain ", home,
                " outside [0, ", kNumDomains, ")");
  std::array<double, kNumDomains> p{};
  double sum = 0;
  // Small alpha makes every Gamma draw underflow now and then: redraw.
  while (!(sum > 0)) {
    sum = 0;
    for (double& x : p) {
      std::gamma_distribution<double> gamma(alpha, 1.0);
      x = gamma(rng);
      sum += x;
    }
  }
  for (double& x : p) x /= sum;
  const auto largest = std::max_element(p.begin(), p.end()) - p.begin();
  std::swap(p[static_cast<size_t>(largest)], p[static_cast<size_t>(home)]);
  return p;
}

std::vector<int64_t> block_order(int64_t blocks, uint64_t seed, int domain) {
  std::vector<int64_t> order(static_cast<size_t>(blocks));
  for (int64_t i = 0; i < blocks; ++i) order[static_cast<size_t>(i)] = i;
  std::mt19937_64 rng(seed * 1000003u + static_cast<uint64_t>(domain) + 1);
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

std::vector<ClientDataPlan> plan_client_data(const std::vector<DomainCorpus>& corpora,
                                             const DataPlanOptions& o) {
  TESSERA_CHECK(o.clients >= 1, InvalidArgument, "plan_client_data: clients is ", o.clients);
  TESSERA_CHECK(o.block_tokens >= 2, InvalidArgument, "plan_client_data: block_tokens is ",
                o.block_tokens);
  TESSERA_CHECK(o.tokens_per_client >= o.block_tokens, InvalidArgument,
                "plan_client_data: tokens_per_client ", o.tokens_per_client,
                " is below one block (", o.block_tokens, ")");
  TESSERA_CHECK(static_cast<int>(corpora.size()) == kNumDomains, InvalidArgument,
                "plan_client_data: ", corpora.size(), " corpora, expected ", kNumDomains);
  std::array<int64_t, kNumDomains> blocks{};
  for (int d = 0; d < kNumDomains; ++d) {
    blocks[d] = static_cast<int64_t>(corpora[d].train.size()) / o.block_tokens;
    TESSERA_CHECK(blocks[d] >= 1, InvalidArgument, "the ", domain_name(d),
                  " corpus is shorter than one block");
  }
  std::mt19937_64 rng(o.seed);
  std::array<int64_t, kNumDomains> next{};
  std::vector<ClientDataPlan> plans;
  const int64_t total_blocks = o.tokens_per_client / o.block_tokens;
  for (int k = 0; k < o.clients; ++k) {
    ClientDataPlan p;
    p.client = k;
    p.home = k % kNumDomains;
    p.mixture = dirichlet_mixture(o.alpha, p.home, rng);
    p.block_tokens = o.block_tokens;
    p.seed = o.seed;
    int64_t assigned = 0;
    for (int d = 0; d < kNumDomains; ++d) {
      p.block_count[d] = std::llround(p.mixture[d] * static_cast<double>(total_blocks));
      assigned += p.block_count[d];
    }
    // Rounding: the home domain absorbs the difference (it holds the
    // largest share, so it never goes negative).
    p.block_count[p.home] += total_blocks - assigned;
    for (int d = 0; d < kNumDomains; ++d) {
      p.block_begin[d] = next[d] % blocks[d];
      next[d] += p.block_count[d];
      if (next[d] > blocks[d]) p.wrapped = true;
    }
    plans.push_back(p);
  }
  return plans;
}

ClientDataset::ClientDataset(const std::vector<DomainCorpus>& corpora, const ClientDataPlan& plan) {
  TESSERA_CHECK(static_cast<int>(corpora.size()) == kNumDomains, InvalidArgument,
                "ClientDataset: ", corpora.size(), " corpora, expected ", kNumDomains);
  const int64_t bt = plan.block_tokens;
  for (int d = 0; d < kNumDomains; ++d) {
    const int64_t blocks = static_cast<int64_t>(corpora[d].train.size()) / bt;
    if (plan.block_count[d] == 0) continue;
    TESSERA_CHECK(blocks >= 1, InvalidArgument, "ClientDataset: the ", domain_name(d),
                  " corpus has no block");
    const std::vector<int64_t> order = block_order(blocks, plan.seed, d);
    for (int64_t i = 0; i < plan.block_count[d]; ++i) {
      const int64_t b = order[static_cast<size_t>((plan.block_begin[d] + i) % blocks)];
      const auto begin = corpora[d].train.begin() + b * bt;
      blocks_.emplace_back(begin, begin + bt);
    }
  }
  TESSERA_CHECK(!blocks_.empty(), InvalidArgument, "ClientDataset: client ", plan.client,
                "'s plan has no blocks");
}

int64_t ClientDataset::num_tokens() const {
  return static_cast<int64_t>(blocks_.size()) * static_cast<int64_t>(blocks_.front().size());
}

TokenBatch ClientDataset::batch(int64_t batch, int64_t seq_len, std::mt19937_64& rng) const {
  const int64_t block = static_cast<int64_t>(blocks_.front().size());
  TESSERA_CHECK(batch >= 1 && seq_len >= 1 && seq_len + 1 <= block, InvalidArgument, "batch ",
                batch, " windows of ", seq_len, " + 1 tokens do not fit blocks of ", block,
                " tokens");
  at::Tensor ids = at::empty({batch, seq_len + 1}, at::kLong);
  int64_t* out = ids.data_ptr<int64_t>();
  std::uniform_int_distribution<int64_t> pick_block(0, static_cast<int64_t>(blocks_.size()) - 1);
  std::uniform_int_distribution<int64_t> pick_start(0, block - (seq_len + 1));
  for (int64_t b = 0; b < batch; ++b) {
    const std::vector<int32_t>& blk = blocks_[static_cast<size_t>(pick_block(rng))];
    const int64_t start = pick_start(rng);
    for (int64_t t = 0; t <= seq_len; ++t)
      out[b * (seq_len + 1) + t] = blk[static_cast<size_t>(start + t)];
  }
  return {ids.narrow(1, 0, seq_len).contiguous(), ids.narrow(1, 1, seq_len).contiguous()};
}

TokenBatch heldout_windows(const DomainCorpus& corpus, int64_t windows, int64_t seq_len) {
  const int64_t n = static_cast<int64_t>(corpus.heldout.size());
  TESSERA_CHECK(windows >= 1 && seq_len >= 1 && n >= seq_len + 1, InvalidArgument, "the ",
                domain_name(corpus.domain), " held-out part (", n, " tokens) cannot give ", windows,
                " windows of ", seq_len, " + 1 tokens");
  at::Tensor ids = at::empty({windows, seq_len + 1}, at::kLong);
  int64_t* out = ids.data_ptr<int64_t>();
  const int64_t span = n - (seq_len + 1);
  for (int64_t w = 0; w < windows; ++w) {
    const int64_t start = windows == 1 ? 0 : span * w / (windows - 1);
    for (int64_t t = 0; t <= seq_len; ++t)
      out[w * (seq_len + 1) + t] = corpus.heldout[static_cast<size_t>(start + t)];
  }
  return {ids.narrow(1, 0, seq_len).contiguous(), ids.narrow(1, 1, seq_len).contiguous()};
}

}  // namespace tessera::fed
