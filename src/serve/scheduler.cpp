#include "tessera/serve/scheduler.h"

#include <algorithm>
#include <limits>
#include <unordered_set>
#include <utility>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"

namespace tessera::serve {

namespace {

constexpr const char* kLogModule = "serve";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
  }
  return "unknown";
}

SchedulerOptions SchedulerOptions::from_config(const ConfigObject& cfg) {
  SchedulerOptions o;
  o.max_num_seqs = cfg.get_int("max_num_seqs", o.max_num_seqs);
  o.max_num_batched_tokens = cfg.get_int("max_num_batched_tokens", o.max_num_batched_tokens);
  o.enable_chunked_prefill = cfg.get_bool("enable_chunked_prefill", o.enable_chunked_prefill);
  o.long_prefill_token_threshold =
      cfg.get_int("long_prefill_token_threshold", o.long_prefill_token_threshold);
  o.priority_aging_steps = cfg.get_int("priority_aging_steps", o.priority_aging_steps);
  o.block_manager.num_blocks = cfg.get_int("num_blocks", o.block_manager.num_blocks);
  o.block_manager.block_size = cfg.get_int("block_size", o.block_manager.block_size);
  o.block_manager.enable_prefix_caching =
      cfg.get_bool("enable_prefix_caching", o.block_manager.enable_prefix_caching);
  cfg.check_no_unknown_keys();
  return o;
}

Scheduler::Scheduler(const SchedulerOptions& options)
    : options_(options), blocks_(options.block_manager) {
  TESSERA_CHECK(options.max_num_seqs >= 1, InvalidArgument,
                "SchedulerOptions.max_num_seqs must be at least 1, got ", options.max_num_seqs);
  TESSERA_CHECK(options.max_num_batched_tokens >= 1, InvalidArgument,
                "SchedulerOptions.max_num_batched_tokens must be at least 1, got ",
                options.max_num_batched_tokens);
  TESSERA_CHECK(options.long_prefill_token_threshold >= 0, InvalidArgument,
                "SchedulerOptions.long_prefill_token_threshold must be non-negative, got ",
                options.long_prefill_token_threshold);
  TESSERA_CHECK(options.long_prefill_token_threshold == 0 || options.enable_chunked_prefill,
                InvalidArgument,
                "SchedulerOptions.long_prefill_token_threshold needs enable_chunked_prefill "
                "(it splits prompts)");
  // Bounded so that priority * aging + arrival_step stays far from overflow.
  TESSERA_CHECK(options.priority_aging_steps >= 0 &&
                    options.priority_aging_steps <= std::numeric_limits<int32_t>::max(),
                InvalidArgument, "SchedulerOptions.priority_aging_steps must be in [0, 2^31), got ",
                options.priority_aging_steps);
}

Scheduler::Sequence& Scheduler::get(SequenceId seq, const char* what) {
  auto it = sequences_.find(seq);
  TESSERA_CHECK(it != sequences_.end(), InvalidArgument, "Scheduler::", what, ": unknown sequence ",
                seq, " (never issued, or already finished)");
  return it->second;
}

const Scheduler::Sequence& Scheduler::get(SequenceId seq, const char* what) const {
  auto it = sequences_.find(seq);
  TESSERA_CHECK(it != sequences_.end(), InvalidArgument, "Scheduler::", what, ": unknown sequence ",
                seq, " (never issued, or already finished)");
  return it->second;
}

int64_t Scheduler::rank(const Sequence& s) const {
  // With aging, effective priority = priority - (now - arrival_step) / aging;
  // comparing two of those at the same `now` is comparing
  // priority * aging + arrival_step, which does not depend on `now`.
  if (options_.priority_aging_steps == 0) return s.priority;
  return static_cast<int64_t>(s.priority) * options_.priority_aging_steps + s.arrival_step;
}

SequenceId Scheduler::add_request(Request request) {
  TESSERA_CHECK(!request.prompt_token_ids.empty(), InvalidArgument,
                "Scheduler::add_request: the prompt is empty");
  TESSERA_CHECK(request.max_new_tokens >= 1, InvalidArgument,
                "Scheduler::add_request: max_new_tokens must be at least 1, got ",
                request.max_new_tokens);
  const int64_t prompt = static_cast<int64_t>(request.prompt_token_ids.size());
  // The most a sequence ever feeds: a recompute after preemption just before
  // its last token feeds everything but that token.
  const int64_t max_fed = prompt + request.max_new_tokens - 1;
  const int64_t blocks_needed = ceil_div(max_fed, blocks_.block_size());
  TESSERA_CHECK(blocks_needed <= blocks_.num_blocks(), InvalidArgument,
                "Scheduler::add_request: a prompt of ", prompt, " tokens with max_new_tokens ",
                request.max_new_tokens, " needs up to ", blocks_needed,
                " KV blocks, but the pool has ", blocks_.num_blocks());
  TESSERA_CHECK(options_.enable_chunked_prefill || max_fed <= options_.max_num_batched_tokens,
                InvalidArgument, "Scheduler::add_request: without chunked prefill, prompt (",
                prompt, ") + max_new_tokens (", request.max_new_tokens, ") - 1 must fit in ",
                "max_num_batched_tokens (", options_.max_num_batched_tokens, ")");
  Sequence s;
  s.id = next_id_++;
  s.num_prompt = prompt;
  s.tokens = std::move(request.prompt_token_ids);
  s.max_new_tokens = request.max_new_tokens;
  s.priority = request.priority;
  s.arrival_step = num_steps_;
  s.arrival_index = next_arrival_++;
  s.salt = std::move(request.cache_salt);
  s.stop_token_ids = std::move(request.stop_token_ids);
  s.status = SequenceStatus::kWaiting;
  waiting_.insert(queue_key(s));
  const SequenceId id = s.id;
  sequences_.emplace(id, std::move(s));
  return id;
}

int64_t Scheduler::prefill_chunk(int64_t remaining, int64_t budget) const {
  int64_t n = remaining;
  if (options_.long_prefill_token_threshold > 0) {
    n = std::min(n, options_.long_prefill_token_threshold);
  }
  if (options_.enable_chunked_prefill) return std::min(n, budget);
  return n <= budget ? n : 0;
}

void Scheduler::emit(SchedulerStep& step, Sequence& s, int64_t num_tokens) {
  ScheduledSequence out;
  out.seq_id = s.id;
  out.start_position = s.num_computed;
  out.token_ids.assign(s.tokens.begin() + s.num_computed,
                       s.tokens.begin() + s.num_computed + num_tokens);
  out.sample = s.num_computed + num_tokens == static_cast<int64_t>(s.tokens.size());
  out.block_table = blocks_.block_table(s.id);
  step.num_batched_tokens += num_tokens;
  in_flight_.push_back({s.id, num_tokens, out.sample});
  step.sequences.push_back(std::move(out));
}

void Scheduler::preempt(SchedulerStep& step, Sequence& s) {
  TESSERA_LOG(Debug, kLogModule) << "step " << step.step << ": preempting sequence " << s.id
                                 << " (priority " << s.priority << ", " << s.num_computed
                                 << " tokens computed, " << blocks_.block_table(s.id).size()
                                 << " blocks)";
  blocks_.free(s.id);
  running_.erase(std::find(running_.begin(), running_.end(), s.id));
  s.num_computed = 0;
  s.status = SequenceStatus::kWaiting;
  waiting_.insert(queue_key(s));
  step.preempted.push_back(s.id);
  ++num_preemptions_;
}

SchedulerStep Scheduler::schedule() {
  TESSERA_CHECK(in_flight_.empty(), FailedPrecondition, "Scheduler::schedule: step ",
                num_steps_ - 1, " has not been passed to update() yet");
  SchedulerStep step;
  step.step = num_steps_++;
  int64_t budget = options_.max_num_batched_tokens;

  std::sort(running_.begin(), running_.end(), [&](SequenceId a, SequenceId b) {
    const Sequence& x = sequences_.at(a);
    const Sequence& y = sequences_.at(b);
    return std::make_pair(rank(x), x.arrival_index) < std::make_pair(rank(y), y.arrival_index);
  });
  const std::vector<SequenceId> order = running_;

  // 1. Token budget: decodes first (one token each), then prefill chunks,
  // each pass in service order.
  std::unordered_map<SequenceId, int64_t> planned;
  for (int pass = 0; pass < 2 && budget > 0; ++pass) {
    const bool decode_pass = pass == 0;
    for (SequenceId id : order) {
      if (budget == 0) break;
      const Sequence& s = sequences_.at(id);
      const int64_t remaining = static_cast<int64_t>(s.tokens.size()) - s.num_computed;
      if ((remaining == 1) != decode_pass) continue;
      const int64_t n = decode_pass ? 1 : prefill_chunk(remaining, budget);
      if (n == 0) continue;
      planned[id] = n;
      budget -= n;
    }
  }

  // 2. Blocks, in service order, so that memory goes to the highest priority
  // first. A sequence that cannot get its blocks preempts the running
  // sequence after it in service order (not yet given blocks in this step)
  // with the lowest priority, then the fewest computed tokens (least work
  // lost), then the latest arrival; with none left, it is preempted itself.
  // A sequence already given blocks is never taken back, so no copy or
  // block table in the step is ever revised.
  std::unordered_set<SequenceId> visited;
  std::unordered_set<SequenceId> granted;
  auto pick_victim = [&]() -> Sequence* {
    Sequence* best = nullptr;
    auto key = [&](const Sequence& c) {
      return std::make_tuple(rank(c), -c.num_computed, c.arrival_index);
    };
    for (SequenceId id : running_) {
      if (visited.count(id) != 0) continue;
      Sequence& c = sequences_.at(id);
      if (best == nullptr || key(c) > key(*best)) best = &c;
    }
    return best;
  };
  for (SequenceId id : order) {
    Sequence& s = sequences_.at(id);
    if (s.status != SequenceStatus::kRunning) continue;  // a victim already
    visited.insert(id);
    auto plan = planned.find(id);
    if (plan == planned.end()) continue;
    const int64_t extra = s.num_computed + plan->second - blocks_.num_slots(id);
    bool got_slots = extra <= 0;
    while (!got_slots) {
      got_slots = blocks_.append_slots(id, extra, &step.copies);
      if (got_slots) break;
      Sequence* victim = pick_victim();
      if (victim == nullptr) break;
      preempt(step, *victim);
    }
    if (got_slots) {
      granted.insert(id);
    } else {
      preempt(step, s);
    }
  }
  for (int pass = 0; pass < 2; ++pass) {
    for (SequenceId id : order) {
      if (granted.count(id) == 0) continue;
      Sequence& s = sequences_.at(id);
      const bool decode = static_cast<int64_t>(s.tokens.size()) - s.num_computed == 1;
      if (decode == (pass == 0)) emit(step, s, planned.at(id));
    }
  }

  // 3. Admission, in queue order.
  if (step.preempted.empty()) {
    while (budget > 0 && !waiting_.empty() &&
           static_cast<int64_t>(running_.size()) < options_.max_num_seqs) {
      const SequenceId id = std::get<2>(*waiting_.begin());
      Sequence& s = sequences_.at(id);
      const int64_t cached = blocks_.cached_prefix_tokens(s.tokens, s.salt);
      const int64_t n = prefill_chunk(static_cast<int64_t>(s.tokens.size()) - cached, budget);
      if (n == 0) break;
      const std::optional<int64_t> computed = blocks_.allocate(id, s.tokens, s.salt, cached + n);
      if (!computed) break;
      TESSERA_CHECK(*computed == cached, Internal, "Scheduler: sequence ", id,
                    ": cache lookup found ", cached, " tokens but allocation reused ", *computed);
      waiting_.erase(waiting_.begin());
      s.status = SequenceStatus::kRunning;
      s.num_computed = cached;
      running_.push_back(id);
      emit(step, s, n);
      budget -= n;
    }
  }
  return step;
}

std::optional<FinishReason> Scheduler::finish_reason_after(const Sequence& s, int64_t token) const {
  if (std::find(s.stop_token_ids.begin(), s.stop_token_ids.end(), token) !=
      s.stop_token_ids.end()) {
    return FinishReason::kStop;
  }
  if (static_cast<int64_t>(s.tokens.size()) - s.num_prompt >= s.max_new_tokens) {
    return FinishReason::kLength;
  }
  return std::nullopt;
}

std::vector<SequenceOutput> Scheduler::update(const std::vector<std::optional<int64_t>>& sampled) {
  TESSERA_CHECK(!in_flight_.empty(), FailedPrecondition,
                "Scheduler::update: no step is awaiting results (schedule() returned none, or "
                "update() was already called)");
  TESSERA_CHECK(sampled.size() == in_flight_.size(), InvalidArgument, "Scheduler::update: step ",
                num_steps_ - 1, " scheduled ", in_flight_.size(), " sequences, got ",
                sampled.size(), " results");
  for (size_t i = 0; i < in_flight_.size(); ++i) {
    const InFlight& f = in_flight_[i];
    if (sequences_.count(f.seq) == 0) continue;
    TESSERA_CHECK(sampled[i].has_value() == f.sample, InvalidArgument, "Scheduler::update: result ",
                  i, " (sequence ", f.seq, ") ",
                  f.sample ? "needs a sampled token" : "must be empty (non-final prefill chunk)");
  }
  std::vector<SequenceOutput> outputs;
  for (size_t i = 0; i < in_flight_.size(); ++i) {
    const InFlight& f = in_flight_[i];
    auto it = sequences_.find(f.seq);
    if (it == sequences_.end()) continue;
    Sequence& s = it->second;
    s.num_computed += f.num_tokens;
    blocks_.mark_computed(s.id, s.tokens, s.num_computed);
    if (!f.sample) continue;
    const int64_t token = *sampled[i];
    s.tokens.push_back(token);
    SequenceOutput out{s.id, token, finish_reason_after(s, token)};
    if (out.finish_reason) remove(s);
    outputs.push_back(out);
  }
  in_flight_.clear();
  return outputs;
}

SequenceOutput Scheduler::fork_sequence(SequenceId parent, std::optional<int64_t> last_token) {
  Sequence& p = get(parent, "fork");
  TESSERA_CHECK(p.status == SequenceStatus::kRunning, FailedPrecondition,
                "Scheduler::fork: sequence ", parent,
                " is waiting; only a running sequence can be forked");
  // Decoding: everything but the last sampled token is computed. (A prompt
  // with one token left to prefill also has one uncomputed token, but that
  // token is the prompt's, not a sample.)
  TESSERA_CHECK(p.num_computed + 1 == static_cast<int64_t>(p.tokens.size()) &&
                    static_cast<int64_t>(p.tokens.size()) > p.num_prompt,
                FailedPrecondition, "Scheduler::fork: sequence ", parent, " has ",
                static_cast<int64_t>(p.tokens.size()) - p.num_computed, " uncomputed tokens and ",
                static_cast<int64_t>(p.tokens.size()) - p.num_prompt,
                " sampled; fork once its prompt is computed and a token sampled");
  for (const InFlight& f : in_flight_) {
    TESSERA_CHECK(f.seq != parent, FailedPrecondition, "Scheduler::fork: sequence ", parent,
                  " is in the step awaiting update()");
  }
  Sequence c = p;
  c.id = next_id_++;
  c.arrival_index = next_arrival_++;
  if (last_token) c.tokens.back() = *last_token;
  blocks_.fork_sequence(parent, c.id);
  running_.push_back(c.id);
  const SequenceId id = c.id;
  Sequence& child = sequences_.emplace(id, std::move(c)).first->second;
  SequenceOutput out{id, child.tokens.back(), finish_reason_after(child, child.tokens.back())};
  if (out.finish_reason) remove(child);
  return out;
}

void Scheduler::remove(Sequence& s) {
  if (s.status == SequenceStatus::kRunning) {
    blocks_.free(s.id);
    running_.erase(std::find(running_.begin(), running_.end(), s.id));
  } else {
    waiting_.erase(queue_key(s));
  }
  sequences_.erase(s.id);
}

void Scheduler::finish(SequenceId seq, FinishReason reason) {
  Sequence& s = get(seq, "finish");
  TESSERA_LOG(Debug, kLogModule) << "sequence " << seq << " finished ("
                                 << finish_reason_name(reason) << ")";
  remove(s);
}

void Scheduler::cancel(SequenceId seq) { finish(seq, FinishReason::kAbort); }

SequenceStatus Scheduler::status(SequenceId seq) const { return get(seq, "status").status; }

const std::vector<int64_t>& Scheduler::token_ids(SequenceId seq) const {
  return get(seq, "token_ids").tokens;
}

int64_t Scheduler::num_prompt_tokens(SequenceId seq) const {
  return get(seq, "num_prompt_tokens").num_prompt;
}

int64_t Scheduler::num_generated_tokens(SequenceId seq) const {
  const Sequence& s = get(seq, "num_generated_tokens");
  return static_cast<int64_t>(s.tokens.size()) - s.num_prompt;
}

int64_t Scheduler::num_computed_tokens(SequenceId seq) const {
  return get(seq, "num_computed_tokens").num_computed;
}

std::vector<SequenceId> Scheduler::running() const { return running_; }

std::vector<SequenceId> Scheduler::waiting() const {
  std::vector<SequenceId> ids;
  ids.reserve(waiting_.size());
  for (const QueueKey& k : waiting_) ids.push_back(std::get<2>(k));
  return ids;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats st;
  st.num_running = static_cast<int64_t>(running_.size());
  st.num_waiting = static_cast<int64_t>(waiting_.size());
  st.num_preemptions_total = num_preemptions_;
  st.num_steps = num_steps_;
  st.kv_cache_usage = blocks_.usage();
  st.prefix_cache = blocks_.prefix_cache_stats();
  return st;
}

void Scheduler::check_invariants() const {
  TESSERA_CHECK(running_.size() + waiting_.size() == sequences_.size(), Internal, running_.size(),
                " running + ", waiting_.size(), " waiting != ", sequences_.size(), " sequences");
  std::unordered_set<SequenceId> seen;
  for (SequenceId id : running_) {
    auto it = sequences_.find(id);
    TESSERA_CHECK(it != sequences_.end(), Internal, "running sequence ", id, " is unknown");
    TESSERA_CHECK(seen.insert(id).second, Internal, "sequence ", id, " is running twice");
    const Sequence& s = it->second;
    TESSERA_CHECK(s.status == SequenceStatus::kRunning, Internal, "sequence ", id,
                  " is in the running list but not marked running");
    TESSERA_CHECK(blocks_.has_sequence(id), Internal, "running sequence ", id, " has no blocks");
    TESSERA_CHECK(blocks_.num_computed_tokens(id) == s.num_computed, Internal, "sequence ", id,
                  ": scheduler counts ", s.num_computed, " computed tokens, block manager ",
                  blocks_.num_computed_tokens(id));
    TESSERA_CHECK(blocks_.num_slots(id) >= s.num_computed, Internal, "sequence ", id,
                  " has fewer slots than computed tokens");
  }
  for (const QueueKey& k : waiting_) {
    const SequenceId id = std::get<2>(k);
    auto it = sequences_.find(id);
    TESSERA_CHECK(it != sequences_.end(), Internal, "waiting sequence ", id, " is unknown");
    TESSERA_CHECK(seen.insert(id).second, Internal, "sequence ", id,
                  " is queued twice or both queued and running");
    const Sequence& s = it->second;
    TESSERA_CHECK(s.status == SequenceStatus::kWaiting && queue_key(s) == k, Internal, "sequence ",
                  id, " is queued under a stale key or status");
    TESSERA_CHECK(!blocks_.has_sequence(id) && s.num_computed == 0, Internal, "waiting sequence ",
                  id, " holds blocks or computed tokens");
  }
  for (const auto& [id, s] : sequences_) {
    TESSERA_CHECK(s.num_computed < static_cast<int64_t>(s.tokens.size()), Internal, "sequence ", id,
                  " has every known token computed (it would have nothing to feed)");
    TESSERA_CHECK(static_cast<int64_t>(s.tokens.size()) - s.num_prompt < s.max_new_tokens, Internal,
                  "sequence ", id, " reached max_new_tokens but is not finished");
  }
  TESSERA_CHECK(blocks_.sequences().size() == running_.size(), Internal, "block manager holds ",
                blocks_.sequences().size(), " tables for ", running_.size(), " running sequences");
  blocks_.check_consistency();
}

}  // namespace tessera::serve
