// tessera/fed/domains.h — non-IID text for federated experiments: four
// domains of real text, a Dirichlet(alpha) mix of them per client, each
// client's private share, and fixed held-out windows per domain.
//
// Domains: English prose (a book), Cantonese (questions and answers of the
// Yue-Benchmark sets), source code (C++/CMake/Python trees), and
// synthetic arithmetic (tasks::arithmetic_corpus). Every corpus is
// tokenised (byte-level for the experiments), truncated to a token budget,
// and split into a training part and a held-out tail.
//
// Client k's mixture p_k ~ Dirichlet(alpha, ..., alpha) over the four
// domains, with its largest component moved to the client's home domain
// k mod 4, so every domain is some client's main one; small alpha makes
// clients nearly single-domain, large alpha mixes them. Each domain's
// training tokens are cut into blocks, shuffled once (seeded), and handed
// out to the clients in order, round(p_kd * tokens_per_client / block)
// blocks each, so clients' data are disjoint while the domain lasts (a
// domain that runs out wraps around, and the plan says so).
//
//   auto tok = tessera::nn::Tokenizer::bytes({"<|endoftext|>"});
//   auto corpora = tessera::fed::load_domain_corpora(sources, tok);
//   auto plans = tessera::fed::plan_client_data(corpora, {/*clients=*/8, /*alpha=*/0.1});
//   tessera::fed::ClientDataset data(corpora, plans[3]);
//   auto batch = data.batch(8, 64, rng);               // [8, 64] inputs and labels
//
// Pure functions and immutable objects; thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tessera/tokenizer/tokenizer.h"

namespace tessera::fed {

constexpr int kNumDomains = 4;
enum class Domain { kEnglish = 0, kCantonese = 1, kCode = 2, kArithmetic = 3 };
// "english", "cantonese", "code", "arithmetic".
const char* domain_name(Domain domain);
const char* domain_name(int domain);

struct DomainSources {
  std::string english_file;   // plain text (moby-dick.txt)
  std::string cantonese_dir;  // Yue-Benchmark folder: every *.json below it
  std::vector<std::string>
      code_dirs;  // *.h, *.hpp, *.cpp, *.cc, *.py, *.cmake, CMakeLists.txt below them
  int64_t arithmetic_examples = 100000;
  uint64_t arithmetic_seed = 7;
  // Each corpus keeps its first max_tokens tokens (files in sorted path
  // order); the last heldout_fraction of them is held out.
  int64_t max_tokens = int64_t{1} << 20;
  double heldout_fraction = 0.1;
};

// The standard sources under a source tree and the shared test data:
// <testdata>/text/moby-dick.txt, <testdata>/yue-benchmark, <tree>/src and
// <tree>/include.
DomainSources default_sources(const std::string& source_tree, const std::string& testdata_dir);

struct DomainCorpus {
  Domain domain = Domain::kEnglish;
  std::vector<int32_t> train;
  std::vector<int32_t> heldout;
};

// One corpus per domain, in Domain order. NotFound naming the path for a
// missing file or folder; InvalidArgument for a folder without usable
// files, a Yue-Benchmark file that is not a JSON list of objects, or a
// corpus shorter than 4096 tokens.
std::vector<DomainCorpus> load_domain_corpora(const DomainSources& sources,
                                              const nn::Tokenizer& tokenizer);

// p ~ Dirichlet(alpha * 1) over the domains (normalised Gamma(alpha, 1)
// draws), largest component swapped to `home`. InvalidArgument for
// alpha <= 0 or home outside [0, 4).
std::array<double, kNumDomains> dirichlet_mixture(double alpha, int home, std::mt19937_64& rng);

struct DataPlanOptions {
  int clients = 8;
  double alpha = 1.0;
  uint64_t seed = 0;
  int64_t tokens_per_client = 65536;  // private training tokens per client
  int64_t block_tokens = 256;         // unit of the split (a window never crosses one)
};

struct ClientDataPlan {
  int client = 0;
  int home = 0;                               // home domain (client mod 4)
  std::array<double, kNumDomains> mixture{};  // p_k
  // Blocks of each domain's shuffled block order this client owns:
  // positions [begin, begin + count) modulo the domain's block count.
  std::array<int64_t, kNumDomains> block_begin{};
  std::array<int64_t, kNumDomains> block_count{};
  bool wrapped = false;  // some domain ran out and blocks are shared
  int64_t block_tokens = 256;
  uint64_t seed = 0;  // of the block shuffle
};

// InvalidArgument for clients < 1, block_tokens < 2 or a corpus shorter
// than one block.
std::vector<ClientDataPlan> plan_client_data(const std::vector<DomainCorpus>& corpora,
                                             const DataPlanOptions& options);

// The shuffled block order of one domain, as plan_client_data uses it.
std::vector<int64_t> block_order(int64_t blocks, uint64_t seed, int domain);

struct TokenBatch {
  at::Tensor input_ids;  // [batch, seq_len] int64
  at::Tensor labels;     // [batch, seq_len] int64, inputs shifted by one
};

// A client's private training tokens (its blocks) and the windows it
// trains on.
class ClientDataset {
 public:
  // InvalidArgument when the plan does not fit the corpora.
  ClientDataset(const std::vector<DomainCorpus>& corpora, const ClientDataPlan& plan);
  int64_t num_tokens() const;
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  // `batch` windows of seq_len + 1 tokens, each inside one block chosen
  // uniformly (so domains appear in the plan's proportions).
  // InvalidArgument when seq_len + 1 exceeds the block.
  TokenBatch batch(int64_t batch, int64_t seq_len, std::mt19937_64& rng) const;

 private:
  std::vector<std::vector<int32_t>> blocks_;
};

// `windows` windows of seq_len + 1 tokens spread evenly over a domain's
// held-out tokens (the same for every client). InvalidArgument when the
// held-out part is too short.
TokenBatch heldout_windows(const DomainCorpus& corpus, int64_t windows, int64_t seq_len);

}  // namespace tessera::fed
