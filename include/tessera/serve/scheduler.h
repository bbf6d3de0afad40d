// tessera/serve/scheduler.h — iteration-level (continuous) batching.
//
// The Scheduler decides, one model step at a time, which sequences run and
// which of their tokens are fed, in the manner of vLLM's v1 scheduler:
//
//   * every step has a token budget (max_num_batched_tokens) and at most
//     max_num_seqs sequences are running;
//   * running sequences that are decoding come first (one token each), then
//     prefill chunks of running sequences whose known tokens are not all
//     computed, then newly admitted waiting requests; a long prompt is split
//     over several steps (chunked prefill);
//   * the waiting queue is ordered by (effective priority, arrival): lower
//     priority values first, first come first served within a priority, and
//     optional aging so that low-priority requests cannot starve;
//   * KV blocks come from a BlockManager (prefix caching included) and are
//     handed out in service order (highest priority first). When a running
//     sequence cannot get a block, the scheduler preempts another running
//     sequence that comes after it in service order, choosing the lowest
//     priority, then the least progress (fewest computed tokens), then the
//     latest arrival; only when no such sequence is left is the asking
//     sequence itself preempted. A higher-priority sequence is never
//     preempted for a lower-priority one. A preempted sequence loses its
//     blocks and goes back to the waiting queue under its original
//     (priority, arrival) key, ahead of every later arrival of its priority;
//     when readmitted it recomputes prompt + generated tokens (reusing any
//     of its blocks still in the prefix cache) and continues where it
//     stopped: no token is generated or reported twice.
//
// The engine's loop:
//
//   tessera::serve::SchedulerOptions opts;
//   opts.block_manager.num_blocks = 4096;
//   tessera::serve::Scheduler scheduler(opts);
//   auto id = scheduler.add_request({/*prompt_token_ids=*/prompt, /*max_new_tokens=*/128});
//   while (scheduler.has_unfinished()) {
//     tessera::serve::SchedulerStep step = scheduler.schedule();
//     if (step.empty()) continue;              // only when nothing can run
//     copy_blocks(step.copies);                // before the forward pass
//     auto sampled = run_model(step.sequences);  // a token where .sample is set
//     for (const auto& out : scheduler.update(sampled)) stream(out);
//   }
//
// Sequence ids are handed out by the Scheduler (add_request, fork) and never
// reused. A sequence leaves the Scheduler when it finishes (a stop token, its
// max_new_tokens, finish(), cancel()); its id is unknown afterwards.
//
// Thread-safety: not thread-safe. The engine calls it from one thread, or
// guards every call with one mutex (cancel() from a request handler then
// takes the same mutex).
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "tessera/serve/block_manager.h"

namespace tessera {
class ConfigObject;
}

namespace tessera::serve {

enum class FinishReason {
  kStop,    // a stop token was sampled, or the engine saw a stop string
  kLength,  // max_new_tokens generated
  kAbort,   // cancelled
};
// "stop", "length", "abort" (OpenAI's finish_reason spelling for the first two).
const char* finish_reason_name(FinishReason reason);

enum class SequenceStatus {
  kWaiting,  // queued (new, or preempted); holds no blocks
  kRunning,  // admitted; holds a block table
};

struct Request {
  std::vector<int64_t> prompt_token_ids;  // non-empty
  int64_t max_new_tokens = 16;            // >= 1; counts every token sampled for the request
  // Lower values are served first (vLLM's convention); 0 is normal.
  int32_t priority = 0;
  // Prefix-cache namespace: blocks are shared only between requests with the
  // same salt. Use the adapter id (KV differs per adapter) plus any per-user
  // salt.
  std::string cache_salt;
  // Sampling one of these finishes the sequence with kStop (the token is kept
  // and reported, as EOS is).
  std::vector<int64_t> stop_token_ids;
};

struct SchedulerOptions {
  // Sequences running at once (admitted, holding blocks). fork_sequence() may exceed it.
  int64_t max_num_seqs = 256;
  // Tokens fed to the model in one step, summed over sequences (>= 1).
  int64_t max_num_batched_tokens = 2048;
  // Split prompts over steps to fit the budget. Off: a prefill runs whole in
  // one step, so every request's prompt + max_new_tokens - 1 (what a
  // preempted request recomputes) must fit in max_num_batched_tokens.
  bool enable_chunked_prefill = true;
  // > 0: at most this many prefill tokens of one sequence per step, so that
  // one long prompt cannot take the whole budget. Needs chunked prefill.
  int64_t long_prefill_token_threshold = 0;
  // > 0: a request's priority value improves by one for every this many
  // steps (schedule() calls) since its arrival, so low-priority requests
  // cannot starve. The order this gives never changes over time: request A
  // goes before B when A.priority * aging + A.arrival_step is smaller
  // (ties: earlier arrival). 0: plain (priority, arrival) order.
  int64_t priority_aging_steps = 0;
  BlockManagerOptions block_manager;

  // Reads keys max_num_seqs, max_num_batched_tokens, enable_chunked_prefill,
  // long_prefill_token_threshold, priority_aging_steps, num_blocks,
  // block_size, enable_prefix_caching (each optional, defaults as above) and
  // rejects any other key (InvalidArgument naming it).
  static SchedulerOptions from_config(const ConfigObject& cfg);
};

// One sequence's share of a step.
struct ScheduledSequence {
  SequenceId seq_id = 0;
  // Tokens to feed, at positions start_position, start_position + 1, ...
  // Their KV is written into the block table's slots for those positions;
  // attention reads positions [0, start_position + token_ids.size()).
  std::vector<int64_t> token_ids;
  int64_t start_position = 0;
  // True when the chunk reaches the last known token: the model must produce
  // logits at its last position and the engine samples one token. False for
  // a non-final prefill chunk (no logits needed).
  bool sample = false;
  // The sequence's whole block table (position p: block_table[p / block_size],
  // slot p % block_size).
  std::vector<BlockId> block_table;

  int64_t context_length() const { return start_position + static_cast<int64_t>(token_ids.size()); }
};

// What schedule() decided for one step.
struct SchedulerStep {
  int64_t step = 0;  // 0-based schedule() call number
  std::vector<ScheduledSequence> sequences;
  // Copy-on-write block copies to run before the forward pass.
  std::vector<BlockCopy> copies;
  // Sequences preempted during this step (back in the waiting queue, blocks
  // freed). The engine drops per-sequence device state it keeps for them;
  // their streamed output stays valid.
  std::vector<SequenceId> preempted;
  int64_t num_batched_tokens = 0;  // sum of token_ids sizes

  bool empty() const { return sequences.empty(); }
};

// One sampled token recorded by update() (or a fork's first token).
struct SequenceOutput {
  SequenceId seq_id = 0;
  int64_t token = 0;
  // Set when this token ended the sequence; it has then left the scheduler.
  std::optional<FinishReason> finish_reason;
};

struct SchedulerStats {
  int64_t num_running = 0;
  int64_t num_waiting = 0;
  int64_t num_preemptions_total = 0;
  int64_t num_steps = 0;        // schedule() calls
  double kv_cache_usage = 0.0;  // BlockManager::usage()
  PrefixCacheStats prefix_cache;
};

class Scheduler {
 public:
  // InvalidArgument naming the field for an invalid option.
  explicit Scheduler(const SchedulerOptions& options);

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerOptions& options() const { return options_; }

  // Queues a request; returns its sequence id. InvalidArgument: empty prompt,
  // max_new_tokens < 1, or a request that could never run alone (its
  // prompt + max_new_tokens - 1 tokens need more blocks than the pool has,
  // or, without chunked prefill, more tokens than one step's budget).
  SequenceId add_request(Request request);

  // Plans the next step. The token budget goes to running decodes first,
  // then to running prefill chunks, each in service order ((effective
  // priority, arrival) order); then blocks are reserved in service order,
  // preempting as the file comment describes; then waiting requests are
  // admitted in queue order while the budget, max_num_seqs and free blocks
  // allow, stopping at the first that does not fit (so a large request at
  // the head is not overtaken forever). A step that preempts admits nobody
  // (memory is short). step.sequences lists decodes, then prefill chunks of
  // running sequences, then admissions. An empty step means nothing can run
  // (in particular, no requests). FailedPrecondition: the previous non-empty
  // step has not been passed to update() yet.
  SchedulerStep schedule();

  // Records the results of the last non-empty step: sampled[i] belongs to
  // step.sequences[i]; it holds a token exactly where .sample was set.
  // Entries for sequences finished or cancelled since schedule() are
  // ignored. Marks the fed positions computed (full blocks join the prefix
  // cache), appends sampled tokens, and finishes sequences that sampled a
  // stop token (kStop) or reached max_new_tokens (kLength). Returns one
  // output per sampled token, in step order. FailedPrecondition: no step in
  // flight. InvalidArgument (nothing changed): wrong size, a token missing
  // where one is needed or given where none is. An engine that cannot run a
  // step finishes its sequences (kAbort) and then calls update() with
  // nullopt everywhere, which clears the step.
  std::vector<SequenceOutput> update(const std::vector<std::optional<int64_t>>& sampled);

  // Parallel sampling: creates a running sequence that shares every block of
  // `parent` (copy-on-write) and its request settings, with the same tokens
  // except the last one (not yet computed), which becomes `last_token` when
  // given: the engine samples the child's own token from the same logits.
  // Returns the child's id and that first token, finished at once if it is a
  // stop token. FailedPrecondition: the parent is waiting, has prefill left
  // or no sampled token yet, or is in the step awaiting update().
  // InvalidArgument: unknown parent.
  SequenceOutput fork_sequence(SequenceId parent, std::optional<int64_t> last_token = std::nullopt);

  // Ends a sequence in any state (waiting, preempted, running, in the step
  // awaiting update()), freeing its blocks. InvalidArgument: unknown id
  // (never issued, or already finished).
  void finish(SequenceId seq, FinishReason reason);
  // finish(seq, FinishReason::kAbort).
  void cancel(SequenceId seq);

  bool contains(SequenceId seq) const { return sequences_.count(seq) != 0; }
  bool has_unfinished() const { return !sequences_.empty(); }
  // The accessors below throw InvalidArgument for an unknown id.
  SequenceStatus status(SequenceId seq) const;
  // Prompt followed by every token generated so far.
  const std::vector<int64_t>& token_ids(SequenceId seq) const;
  int64_t num_prompt_tokens(SequenceId seq) const;
  int64_t num_generated_tokens(SequenceId seq) const;
  // Leading positions with computed KV (0 while waiting).
  int64_t num_computed_tokens(SequenceId seq) const;

  // Running sequences in the service order of the last schedule() (those
  // admitted or forked since at the end); waiting ones in queue order.
  std::vector<SequenceId> running() const;
  std::vector<SequenceId> waiting() const;

  SchedulerStats stats() const;
  const BlockManager& block_manager() const { return blocks_; }

  // Throws Internal on the first broken invariant: running and waiting
  // disjoint and together every known sequence; running ones hold tables
  // with computed counts matching, waiting ones none; computed < known
  // tokens; the block manager's own check_consistency(). For tests.
  void check_invariants() const;

 private:
  struct Sequence {
    SequenceId id = 0;
    std::vector<int64_t> tokens;  // prompt + generated
    int64_t num_prompt = 0;
    int64_t num_computed = 0;
    int64_t max_new_tokens = 0;
    int32_t priority = 0;
    int64_t arrival_step = 0;
    int64_t arrival_index = 0;  // unique, increasing: the FCFS tie-break
    std::string salt;
    std::vector<int64_t> stop_token_ids;
    SequenceStatus status = SequenceStatus::kWaiting;
  };
  // (rank, arrival_index, id): the waiting queue's order.
  using QueueKey = std::tuple<int64_t, int64_t, SequenceId>;
  struct InFlight {
    SequenceId seq = 0;
    int64_t num_tokens = 0;
    bool sample = false;
  };

  Sequence& get(SequenceId seq, const char* what);
  const Sequence& get(SequenceId seq, const char* what) const;
  int64_t rank(const Sequence& s) const;
  QueueKey queue_key(const Sequence& s) const { return {rank(s), s.arrival_index, s.id}; }
  // Tokens of a prefill with `remaining` tokens left that fit in `budget`;
  // 0 when it does not fit (chunked prefill off).
  int64_t prefill_chunk(int64_t remaining, int64_t budget) const;
  void emit(SchedulerStep& step, Sequence& s, int64_t num_tokens);
  void preempt(SchedulerStep& step, Sequence& s);
  void remove(Sequence& s);
  std::optional<FinishReason> finish_reason_after(const Sequence& s, int64_t token) const;

  SchedulerOptions options_;
  BlockManager blocks_;
  std::unordered_map<SequenceId, Sequence> sequences_;
  std::set<QueueKey> waiting_;
  std::vector<SequenceId> running_;  // service order as of the last schedule()
  std::vector<InFlight> in_flight_;  // the step awaiting update(); empty: none
  SequenceId next_id_ = 0;
  int64_t next_arrival_ = 0;
  int64_t num_steps_ = 0;
  int64_t num_preemptions_ = 0;
};

}  // namespace tessera::serve
