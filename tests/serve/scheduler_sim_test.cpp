// Randomized simulation of the scheduler driving a fake engine.
//
// The fake engine keeps a KV cache of the real shape (blocks x slots) whose
// entry for position p of a sequence is a hash of the sequence's salt and
// tokens 0..p, which is what real KV depends on. Before every step it checks
// that each scheduled sequence would attend to the right KV through its block
// table (so prefix-cache reuse, copy-on-write and preemption bookkeeping are
// checked end to end), runs the copies, writes the new positions, and samples
// a token that is a function of the whole sequence. Requests arrive, get
// cancelled (waiting, running, preempted, in flight), finished by the engine
// and forked at random, in a pool small enough to force preemption.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/serve/scheduler.h"

namespace tessera::serve {
namespace {

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct SimConfig {
  uint64_t seed = 1;
  int64_t num_blocks = 12;
  int64_t block_size = 2;
  int64_t budget = 8;
  int64_t max_seqs = 4;
  bool caching = true;
  bool chunked = true;
  int64_t long_prefill_threshold = 0;
  int64_t aging = 0;
  int64_t arrival_steps = 2000;
  // Chance of each further arrival in a step (geometric: mean p / (1 - p)).
  double arrival_chance = 0.3;
};

struct SimTotals {
  int64_t steps = 0;
  int64_t preemptions = 0;
  int64_t prefix_hits = 0;
  int64_t forks = 0;
  int64_t copies = 0;
  int64_t cancels = 0;
  int64_t finished = 0;
  int64_t max_waiting = 0;
};

class Simulation {
 public:
  explicit Simulation(const SimConfig& c) : config_(c), rng_(c.seed), sched_(options(c)) {
    kv_.assign(static_cast<size_t>(c.num_blocks),
               std::vector<uint64_t>(static_cast<size_t>(c.block_size), 0));
    for (auto& t : templates_) {
      for (int i = 0; i < 8; ++i) t.push_back(uniform(1, 49));
    }
  }

  SimTotals run() {
    const int64_t max_steps = config_.arrival_steps * 20 + 1000;
    int64_t step_no = 0;
    for (; step_no < max_steps; ++step_no) {
      if (step_no >= config_.arrival_steps && !sched_.has_unfinished()) break;
      random_events(step_no < config_.arrival_steps);
      if (::testing::Test::HasFatalFailure()) break;
      one_step();
      if (::testing::Test::HasFatalFailure()) break;
    }
    EXPECT_LT(step_no, max_steps) << "requests did not finish";
    EXPECT_TRUE(live_.empty());
    EXPECT_FALSE(sched_.has_unfinished());
    EXPECT_EQ(sched_.block_manager().num_free_blocks(), config_.num_blocks);
    EXPECT_EQ(sched_.stats().num_running, 0);
    EXPECT_EQ(sched_.stats().num_waiting, 0);
    EXPECT_EQ(issued_, totals_.finished + totals_.cancels) << "a request was lost";
    totals_.steps = step_no;
    totals_.preemptions = sched_.stats().num_preemptions_total;
    totals_.prefix_hits = sched_.stats().prefix_cache.hits;
    return totals_;
  }

 private:
  struct Live {
    std::vector<int64_t> tokens;
    std::vector<uint64_t> prefix_hash;  // prefix_hash[p]: KV content of position p
    uint64_t salt_hash = 0;
    int64_t num_prompt = 0;
    int64_t max_new = 0;
    std::set<int64_t> stops;
    int64_t computed = -1;  // known computed count; -1 after (re)admission is pending
    std::vector<int64_t> streamed;
  };

  static SchedulerOptions options(const SimConfig& c) {
    SchedulerOptions o;
    o.max_num_seqs = c.max_seqs;
    o.max_num_batched_tokens = c.budget;
    o.enable_chunked_prefill = c.chunked;
    o.long_prefill_token_threshold = c.long_prefill_threshold;
    o.priority_aging_steps = c.aging;
    o.block_manager.num_blocks = c.num_blocks;
    o.block_manager.block_size = c.block_size;
    o.block_manager.enable_prefix_caching = c.caching;
    return o;
  }

  int64_t uniform(int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }
  bool chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; }

  static void extend_hash(Live& s) {
    const uint64_t prev = s.prefix_hash.empty() ? s.salt_hash : s.prefix_hash.back();
    s.prefix_hash.push_back(mix(prev ^ mix(static_cast<uint64_t>(s.tokens[s.prefix_hash.size()]))));
  }

  // The fake model's next token: a function of the salt and every token.
  static int64_t model_token(const Live& s) {
    return static_cast<int64_t>((s.prefix_hash.back() >> 11) % 50);
  }

  void add_request() {
    const int64_t capacity = config_.num_blocks * config_.block_size;
    const int64_t limit = config_.chunked ? capacity : std::min(capacity, config_.budget);
    Request r;
    const auto& tmpl = templates_[static_cast<size_t>(uniform(0, 2))];
    const int64_t shared = uniform(0, 8);
    r.prompt_token_ids.assign(tmpl.begin(), tmpl.begin() + shared);
    const int64_t extra = uniform(shared == 0 ? 1 : 0, 12);
    for (int64_t i = 0; i < extra; ++i) r.prompt_token_ids.push_back(uniform(1, 49));
    const int64_t prompt = static_cast<int64_t>(r.prompt_token_ids.size());
    if (prompt > limit) r.prompt_token_ids.resize(static_cast<size_t>(limit));
    const int64_t room = limit - static_cast<int64_t>(r.prompt_token_ids.size()) + 1;
    r.max_new_tokens = uniform(1, std::min<int64_t>(room, 14));
    r.priority = static_cast<int32_t>(uniform(0, 2));
    r.cache_salt = chance(0.5) ? "" : "adapter-7";
    if (chance(0.5)) r.stop_token_ids = {0, 1};
    Live s;
    s.tokens = r.prompt_token_ids;
    s.num_prompt = static_cast<int64_t>(s.tokens.size());
    s.max_new = r.max_new_tokens;
    s.stops.insert(r.stop_token_ids.begin(), r.stop_token_ids.end());
    s.salt_hash = mix(r.cache_salt.empty() ? 17 : 23);
    while (s.prefix_hash.size() < s.tokens.size()) extend_hash(s);
    const SequenceId id = sched_.add_request(r);
    ASSERT_EQ(live_.count(id), 0u);
    live_.emplace(id, std::move(s));
    ++issued_;
  }

  SequenceId random_live() {
    auto it = live_.begin();
    std::advance(it, uniform(0, static_cast<int64_t>(live_.size()) - 1));
    return it->first;
  }

  std::optional<FinishReason> expected_reason(const Live& s, int64_t token) const {
    if (s.stops.count(token) != 0) return FinishReason::kStop;
    if (static_cast<int64_t>(s.tokens.size()) - s.num_prompt >= s.max_new) {
      return FinishReason::kLength;
    }
    return std::nullopt;
  }

  void random_events(bool arrivals) {
    if (arrivals) {
      while (chance(config_.arrival_chance)) add_request();
    }
    if (!live_.empty() && chance(0.03)) {
      const SequenceId id = random_live();
      sched_.cancel(id);
      live_.erase(id);
      ++totals_.cancels;
    }
    if (!live_.empty() && chance(0.02)) {
      const SequenceId id = random_live();
      if (sched_.status(id) == SequenceStatus::kRunning) {
        sched_.finish(id, FinishReason::kStop);  // the engine saw a stop string
        live_.erase(id);
        ++totals_.finished;
      }
    }
    const std::vector<SequenceId> running = sched_.running();
    if (!running.empty() && chance(0.25)) {
      // fork_sequence() may take the running count past max_num_seqs (admission
      // then waits until it is below again).
      const SequenceId id =
          running[static_cast<size_t>(uniform(0, static_cast<int64_t>(running.size()) - 1))];
      Live& p = live_.at(id);
      if (!p.streamed.empty() &&
          sched_.num_computed_tokens(id) + 1 == static_cast<int64_t>(p.tokens.size())) {
        Live c = p;
        const int64_t alt = static_cast<int64_t>((p.prefix_hash.back() >> 29) % 50);
        c.tokens.back() = alt;
        c.prefix_hash.pop_back();
        extend_hash(c);
        c.streamed.back() = alt;
        const SequenceOutput out = sched_.fork_sequence(id, alt);
        ++totals_.forks;
        ++issued_;
        EXPECT_EQ(out.token, alt);
        // The child's last token is a fresh sample: the stop rule applies.
        const auto reason = c.stops.count(alt) != 0 ? std::optional(FinishReason::kStop)
                                                    : std::optional<FinishReason>();
        EXPECT_EQ(out.finish_reason, reason);
        if (out.finish_reason) {
          ++totals_.finished;
        } else {
          live_.emplace(out.seq_id, std::move(c));
        }
      }
    }
    sched_.check_invariants();
  }

  void one_step() {
    const BlockManager& bm = sched_.block_manager();
    const int64_t bs = config_.block_size;
    // What the scheduler knows before planning.
    std::set<SequenceId> decode_ready;
    for (SequenceId id : sched_.running()) {
      if (sched_.num_computed_tokens(id) + 1 == static_cast<int64_t>(sched_.token_ids(id).size())) {
        decode_ready.insert(id);
      }
    }
    const std::vector<SequenceId> waiting_before = sched_.waiting();
    const std::vector<SequenceId> running_list = sched_.running();
    const std::set<SequenceId> running_before(running_list.begin(), running_list.end());

    totals_.max_waiting = std::max<int64_t>(totals_.max_waiting, sched_.stats().num_waiting);
    SchedulerStep step = sched_.schedule();
    totals_.copies += static_cast<int64_t>(step.copies.size());

    // Budget, seq limit, uniqueness.
    int64_t fed = 0;
    std::set<SequenceId> in_step;
    for (const auto& s : step.sequences) {
      fed += static_cast<int64_t>(s.token_ids.size());
      ASSERT_TRUE(in_step.insert(s.seq_id).second) << "sequence scheduled twice";
      ASSERT_GT(s.token_ids.size(), 0u);
    }
    ASSERT_EQ(fed, step.num_batched_tokens);
    ASSERT_LE(fed, config_.budget);

    // Preempted sequences were running and are now waiting, without blocks.
    for (SequenceId id : step.preempted) {
      ASSERT_TRUE(running_before.count(id)) << "preempted " << id << " was not running";
      ASSERT_EQ(sched_.status(id), SequenceStatus::kWaiting);
      ASSERT_EQ(in_step.count(id), 0u);
      live_.at(id).computed = -1;
    }
    // Decodes first: a step that feeds any prefill token left no running
    // decode behind (unless it was preempted).
    const bool any_prefill =
        std::any_of(step.sequences.begin(), step.sequences.end(),
                    [](const ScheduledSequence& s) { return s.token_ids.size() > 1 || !s.sample; });
    if (any_prefill) {
      for (SequenceId id : decode_ready) {
        const bool preempted = std::count(step.preempted.begin(), step.preempted.end(), id) > 0;
        ASSERT_TRUE(in_step.count(id) || preempted) << "decode of " << id << " skipped";
      }
    }
    // Admissions follow the waiting queue's order, and none after a preemption.
    std::vector<SequenceId> admitted;
    for (const auto& s : step.sequences) {
      if (!running_before.count(s.seq_id)) admitted.push_back(s.seq_id);
    }
    ASSERT_LE(admitted.size(), waiting_before.size());
    ASSERT_TRUE(std::equal(admitted.begin(), admitted.end(), waiting_before.begin()))
        << "admission out of queue order";
    if (!step.preempted.empty()) {
      ASSERT_TRUE(admitted.empty());
    }
    if (!admitted.empty()) {
      ASSERT_LE(static_cast<int64_t>(running_before.size() + admitted.size()), config_.max_seqs);
    }

    // Each sequence's chunk: the right tokens at the right positions.
    for (const auto& s : step.sequences) {
      Live& l = live_.at(s.seq_id);
      const int64_t len = static_cast<int64_t>(l.tokens.size());
      if (l.computed >= 0) {
        ASSERT_EQ(s.start_position, l.computed) << "sequence " << s.seq_id;
      } else {
        ASSERT_EQ(s.start_position % bs, 0);
        if (!config_.caching) {
          ASSERT_EQ(s.start_position, 0);
        }
      }
      ASSERT_LE(s.context_length(), len);
      ASSERT_EQ(s.token_ids, std::vector<int64_t>(l.tokens.begin() + s.start_position,
                                                  l.tokens.begin() + s.context_length()));
      ASSERT_EQ(s.sample, s.context_length() == len);
      if (config_.long_prefill_threshold > 0 && !(s.sample && s.token_ids.size() == 1)) {
        ASSERT_LE(static_cast<int64_t>(s.token_ids.size()), config_.long_prefill_threshold);
      }
      ASSERT_EQ(s.block_table, bm.block_table(s.seq_id));
      ASSERT_EQ(static_cast<int64_t>(s.block_table.size()), (s.context_length() + bs - 1) / bs);
    }

    // The engine: copies first, then attention reads, then KV writes.
    for (const BlockCopy& c : step.copies)
      kv_[static_cast<size_t>(c.dst)] = kv_[static_cast<size_t>(c.src)];
    for (const auto& s : step.sequences) {
      const Live& l = live_.at(s.seq_id);
      for (int64_t p = 0; p < s.start_position; ++p) {
        const BlockId b = s.block_table[static_cast<size_t>(p / bs)];
        ASSERT_EQ(kv_[static_cast<size_t>(b)][static_cast<size_t>(p % bs)],
                  l.prefix_hash[static_cast<size_t>(p)])
            << "sequence " << s.seq_id << " would read wrong KV at position " << p;
      }
    }
    std::set<std::pair<BlockId, int64_t>> written;
    for (const auto& s : step.sequences) {
      const Live& l = live_.at(s.seq_id);
      for (int64_t p = s.start_position; p < s.context_length(); ++p) {
        const BlockId b = s.block_table[static_cast<size_t>(p / bs)];
        ASSERT_EQ(bm.ref_count(b), 1) << "writing into shared block " << b;
        ASSERT_TRUE(written.insert({b, p % bs}).second) << "two writes to one slot";
        kv_[static_cast<size_t>(b)][static_cast<size_t>(p % bs)] =
            l.prefix_hash[static_cast<size_t>(p)];
      }
    }

    // Sample, sometimes cancelling a sequence while the step is in flight.
    std::vector<std::optional<int64_t>> sampled;
    for (const auto& s : step.sequences) {
      sampled.push_back(s.sample ? std::optional(model_token(live_.at(s.seq_id))) : std::nullopt);
    }
    if (!step.empty() && chance(0.03)) {
      const SequenceId id = step.sequences[static_cast<size_t>(uniform(
                                               0, static_cast<int64_t>(step.sequences.size()) - 1))]
                                .seq_id;
      sched_.cancel(id);
      live_.erase(id);
      ++totals_.cancels;
    }
    if (step.empty()) return;
    const std::vector<SequenceOutput> outputs = sched_.update(sampled);

    size_t next_output = 0;
    for (size_t i = 0; i < step.sequences.size(); ++i) {
      const auto& s = step.sequences[i];
      auto it = live_.find(s.seq_id);
      if (it == live_.end()) continue;  // cancelled in flight
      Live& l = it->second;
      l.computed = s.context_length();
      if (!s.sample) continue;
      ASSERT_LT(next_output, outputs.size());
      const SequenceOutput& out = outputs[next_output++];
      ASSERT_EQ(out.seq_id, s.seq_id);
      ASSERT_EQ(out.token, *sampled[i]);
      l.tokens.push_back(out.token);
      extend_hash(l);
      l.streamed.push_back(out.token);
      ASSERT_EQ(out.finish_reason, expected_reason(l, out.token)) << "sequence " << s.seq_id;
      if (out.finish_reason) {
        ASSERT_FALSE(sched_.contains(s.seq_id));
        ASSERT_LE(static_cast<int64_t>(l.streamed.size()), l.max_new);
        ++totals_.finished;
        live_.erase(it);
      }
    }
    ASSERT_EQ(next_output, outputs.size());

    // The scheduler and the simulation agree on every live sequence.
    sched_.check_invariants();
    std::vector<SequenceId> known = sched_.running();
    const std::vector<SequenceId> waiting = sched_.waiting();
    known.insert(known.end(), waiting.begin(), waiting.end());
    std::sort(known.begin(), known.end());
    std::vector<SequenceId> expected;
    for (const auto& [id, l] : live_) expected.push_back(id);
    ASSERT_EQ(known, expected);
    for (const auto& [id, l] : live_) {
      ASSERT_EQ(sched_.token_ids(id), l.tokens) << "sequence " << id;
      ASSERT_EQ(sched_.num_generated_tokens(id), static_cast<int64_t>(l.streamed.size()));
    }
  }

  SimConfig config_;
  std::mt19937_64 rng_;
  Scheduler sched_;
  std::vector<std::vector<uint64_t>> kv_;
  std::vector<int64_t> templates_[3];
  std::map<SequenceId, Live> live_;
  int64_t issued_ = 0;
  SimTotals totals_;
};

SimTotals simulate(const SimConfig& c) {
  Simulation sim(c);
  return sim.run();
}

TEST(SchedulerSimulation, TinyPoolWithPrefixCaching) {
  SimTotals total;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    SimConfig c;
    c.seed = seed;
    SimTotals t = simulate(c);
    if (HasFatalFailure()) return;
    total.preemptions += t.preemptions;
    total.prefix_hits += t.prefix_hits;
    total.forks += t.forks;
    total.copies += t.copies;
    total.cancels += t.cancels;
    total.finished += t.finished;
    total.steps += t.steps;
    total.max_waiting = std::max(total.max_waiting, t.max_waiting);
  }
  std::printf(
      "3 runs, %lld steps: %lld finished, %lld cancelled, %lld preemptions, %lld forks, "
      "%lld copies, %lld prefix-cache hit tokens, up to %lld waiting\n",
      static_cast<long long>(total.steps), static_cast<long long>(total.finished),
      static_cast<long long>(total.cancels), static_cast<long long>(total.preemptions),
      static_cast<long long>(total.forks), static_cast<long long>(total.copies),
      static_cast<long long>(total.prefix_hits), static_cast<long long>(total.max_waiting));
  // The setting exercises what it is meant to.
  EXPECT_GT(total.preemptions, 50);
  EXPECT_GT(total.forks, 50);
  EXPECT_GT(total.copies, 10);
  EXPECT_GT(total.prefix_hits, 100);
  EXPECT_GT(total.cancels, 50);
}

TEST(SchedulerSimulation, NoCachingNoChunking) {
  SimConfig c;
  c.seed = 11;
  c.caching = false;
  c.chunked = false;
  c.budget = 24;
  c.num_blocks = 10;
  c.block_size = 3;
  SimTotals t = simulate(c);
  EXPECT_GT(t.preemptions, 10);
  EXPECT_EQ(t.prefix_hits, 0);
}

TEST(SchedulerSimulation, BlockSizeOneWithAgingAndThreshold) {
  SimConfig c;
  c.seed = 21;
  c.block_size = 1;
  c.num_blocks = 24;
  c.budget = 6;
  c.max_seqs = 5;
  c.aging = 3;
  c.long_prefill_threshold = 4;
  SimTotals t = simulate(c);
  EXPECT_GT(t.preemptions, 10);
}

TEST(SchedulerSimulation, LargerBlocksManySequences) {
  SimConfig c;
  c.seed = 31;
  c.block_size = 4;
  c.num_blocks = 9;
  c.budget = 16;
  c.max_seqs = 8;
  SimTotals t = simulate(c);
  EXPECT_GT(t.preemptions, 10);
}

}  // namespace
}  // namespace tessera::serve
