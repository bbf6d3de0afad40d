#include "tessera/serve/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <optional>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::serve {
namespace {

std::vector<int64_t> iota_tokens(int64_t n, int64_t base = 100) {
  std::vector<int64_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), base);
  return t;
}

SchedulerOptions small_options(int64_t num_blocks, int64_t block_size, int64_t budget,
                               int64_t max_seqs = 8) {
  SchedulerOptions o;
  o.max_num_seqs = max_seqs;
  o.max_num_batched_tokens = budget;
  o.block_manager.num_blocks = num_blocks;
  o.block_manager.block_size = block_size;
  return o;
}

Request request(std::vector<int64_t> prompt, int64_t max_new_tokens, int32_t priority = 0) {
  Request r;
  r.prompt_token_ids = std::move(prompt);
  r.max_new_tokens = max_new_tokens;
  r.priority = priority;
  return r;
}

// The token a test "model" samples for a sequence: 1000 + the position it
// will occupy, so that every generated token says where it belongs.
int64_t model_token(const ScheduledSequence& s) { return 1000 + s.context_length(); }

// Runs one step with model_token and returns the outputs.
std::vector<SequenceOutput> run(Scheduler& sched, const SchedulerStep& step) {
  std::vector<std::optional<int64_t>> sampled;
  for (const auto& s : step.sequences) {
    sampled.push_back(s.sample ? std::optional<int64_t>(model_token(s)) : std::nullopt);
  }
  auto out = sched.update(sampled);
  sched.check_invariants();
  return out;
}

std::vector<SequenceId> ids_of(const SchedulerStep& step) {
  std::vector<SequenceId> ids;
  for (const auto& s : step.sequences) ids.push_back(s.seq_id);
  return ids;
}

const ScheduledSequence* find(const SchedulerStep& step, SequenceId id) {
  for (const auto& s : step.sequences) {
    if (s.seq_id == id) return &s;
  }
  return nullptr;
}

TEST(Scheduler, RejectsBadOptionsAndRequests) {
  auto o = small_options(8, 4, 16);
  o.max_num_seqs = 0;
  EXPECT_THROW(Scheduler{o}, InvalidArgument);
  o = small_options(8, 4, 0);
  EXPECT_THROW(Scheduler{o}, InvalidArgument);
  o = small_options(8, 4, 16);
  o.enable_chunked_prefill = false;
  o.long_prefill_token_threshold = 4;
  EXPECT_THROW(Scheduler{o}, InvalidArgument);
  o = small_options(8, 4, 16);
  o.priority_aging_steps = -1;
  EXPECT_THROW(Scheduler{o}, InvalidArgument);

  Scheduler sched(small_options(4, 4, 16));  // 16 slots
  EXPECT_THROW(sched.add_request(request({}, 4)), InvalidArgument);
  EXPECT_THROW(sched.add_request(request({1}, 0)), InvalidArgument);
  EXPECT_NO_THROW(sched.add_request(request(iota_tokens(10), 7)));  // 16 tokens fed at most
  EXPECT_THROW(sched.add_request(request(iota_tokens(10), 8)), InvalidArgument);

  auto no_chunk = small_options(64, 4, 16);
  no_chunk.enable_chunked_prefill = false;
  Scheduler strict(no_chunk);
  EXPECT_NO_THROW(strict.add_request(request(iota_tokens(10), 7)));
  EXPECT_THROW(strict.add_request(request(iota_tokens(10), 8)), InvalidArgument);
}

TEST(Scheduler, OptionsFromConfig) {
  auto cfg = ConfigObject::parse(
      R"({"max_num_seqs": 3, "max_num_batched_tokens": 64, "enable_chunked_prefill": true,
          "long_prefill_token_threshold": 32, "priority_aging_steps": 10, "num_blocks": 100,
          "block_size": 8, "enable_prefix_caching": false})");
  auto o = SchedulerOptions::from_config(cfg);
  EXPECT_EQ(o.max_num_seqs, 3);
  EXPECT_EQ(o.max_num_batched_tokens, 64);
  EXPECT_EQ(o.long_prefill_token_threshold, 32);
  EXPECT_EQ(o.priority_aging_steps, 10);
  EXPECT_EQ(o.block_manager.num_blocks, 100);
  EXPECT_EQ(o.block_manager.block_size, 8);
  EXPECT_FALSE(o.block_manager.enable_prefix_caching);
  EXPECT_THROW(SchedulerOptions::from_config(ConfigObject::parse(R"({"max_num_seq": 3})")),
               InvalidArgument);
}

TEST(Scheduler, ChunkedPrefillSplitsALongPromptOverSteps) {
  Scheduler sched(small_options(16, 4, 8));
  auto prompt = iota_tokens(20);
  const SequenceId id = sched.add_request(request(prompt, 2));
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (start, length)
  for (int i = 0; i < 3; ++i) {
    auto step = sched.schedule();
    ASSERT_EQ(step.sequences.size(), 1u);
    const auto& s = step.sequences[0];
    EXPECT_EQ(s.seq_id, id);
    EXPECT_LE(step.num_batched_tokens, 8);
    EXPECT_EQ(s.token_ids, std::vector<int64_t>(prompt.begin() + s.start_position,
                                                prompt.begin() + s.context_length()));
    EXPECT_EQ(s.sample, i == 2);  // logits only for the chunk that ends the prompt
    EXPECT_EQ(static_cast<int64_t>(s.block_table.size()), (s.context_length() + 3) / 4);
    chunks.emplace_back(s.start_position, static_cast<int64_t>(s.token_ids.size()));
    auto out = run(sched, step);
    EXPECT_EQ(out.size(), i == 2 ? 1u : 0u);
  }
  EXPECT_EQ(chunks, (std::vector<std::pair<int64_t, int64_t>>{{0, 8}, {8, 8}, {16, 4}}));
  // Decode: one token at position 20.
  auto step = sched.schedule();
  ASSERT_EQ(step.sequences.size(), 1u);
  EXPECT_EQ(step.sequences[0].start_position, 20);
  EXPECT_EQ(step.sequences[0].token_ids, std::vector<int64_t>{1020});
  auto out = run(sched, step);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].finish_reason, FinishReason::kLength);
  EXPECT_FALSE(sched.has_unfinished());
  EXPECT_EQ(sched.block_manager().num_free_blocks(), 16);
}

TEST(Scheduler, LongPrefillThresholdCapsChunks) {
  auto o = small_options(16, 4, 64);
  o.long_prefill_token_threshold = 5;
  Scheduler sched(o);
  const SequenceId a = sched.add_request(request(iota_tokens(12), 4));
  const SequenceId b = sched.add_request(request(iota_tokens(3, 500), 4));
  auto step = sched.schedule();
  ASSERT_EQ(step.sequences.size(), 2u);
  EXPECT_EQ(find(step, a)->token_ids.size(), 5u);
  EXPECT_EQ(find(step, b)->token_ids.size(), 3u);
  EXPECT_EQ(step.num_batched_tokens, 8);
}

TEST(Scheduler, DecodesComeFirstAndTheBudgetHolds) {
  Scheduler sched(small_options(32, 4, 4));
  const SequenceId a = sched.add_request(request(iota_tokens(3), 10));
  auto step = sched.schedule();
  ASSERT_EQ(ids_of(step), std::vector<SequenceId>{a});
  run(sched, step);  // a is now decoding
  const SequenceId b = sched.add_request(request(iota_tokens(10, 500), 10));
  step = sched.schedule();
  ASSERT_EQ(ids_of(step), (std::vector<SequenceId>{a, b}));
  EXPECT_EQ(step.sequences[0].token_ids.size(), 1u);  // a's decode
  EXPECT_TRUE(step.sequences[0].sample);
  EXPECT_EQ(step.sequences[1].token_ids.size(), 3u);  // b gets what is left
  EXPECT_FALSE(step.sequences[1].sample);
  EXPECT_EQ(step.num_batched_tokens, 4);
  run(sched, step);
  // b's remaining prefill continues in later steps, after a's decode.
  step = sched.schedule();
  ASSERT_EQ(ids_of(step), (std::vector<SequenceId>{a, b}));
  EXPECT_EQ(step.sequences[1].start_position, 3);
  EXPECT_EQ(step.sequences[1].token_ids.size(), 3u);
}

TEST(Scheduler, MaxNumSeqsLimitsAdmission) {
  Scheduler sched(small_options(32, 4, 64, /*max_seqs=*/2));
  const SequenceId a = sched.add_request(request(iota_tokens(2), 1));
  const SequenceId b = sched.add_request(request(iota_tokens(2), 3));
  const SequenceId c = sched.add_request(request(iota_tokens(2), 3));
  auto step = sched.schedule();
  EXPECT_EQ(ids_of(step), (std::vector<SequenceId>{a, b}));
  EXPECT_EQ(sched.status(c), SequenceStatus::kWaiting);
  auto out = run(sched, step);  // a finishes (max_new_tokens 1)
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].finish_reason, FinishReason::kLength);
  EXPECT_FALSE(sched.contains(a));
  step = sched.schedule();
  EXPECT_EQ(ids_of(step), (std::vector<SequenceId>{b, c}));
}

TEST(Scheduler, PriorityThenFirstComeFirstServed) {
  Scheduler sched(small_options(32, 4, 64, /*max_seqs=*/1));
  const SequenceId low1 = sched.add_request(request({1}, 1, /*priority=*/1));
  const SequenceId high1 = sched.add_request(request({2}, 1, /*priority=*/0));
  const SequenceId high2 = sched.add_request(request({3}, 1, /*priority=*/0));
  const SequenceId low2 = sched.add_request(request({4}, 1, /*priority=*/1));
  const SequenceId urgent = sched.add_request(request({5}, 1, /*priority=*/-3));
  EXPECT_EQ(sched.waiting(), (std::vector<SequenceId>{urgent, high1, high2, low1, low2}));
  std::vector<SequenceId> served;
  while (sched.has_unfinished()) {
    auto step = sched.schedule();
    ASSERT_EQ(step.sequences.size(), 1u);
    served.push_back(step.sequences[0].seq_id);
    run(sched, step);
  }
  EXPECT_EQ(served, (std::vector<SequenceId>{urgent, high1, high2, low1, low2}));
}

// Runs `steps` steps while a new high-priority request (2 prompt tokens, 2
// new tokens) arrives every step and one sequence runs at a time; returns the
// step at which the low-priority request arriving first was admitted, or -1.
int64_t admission_step_under_load(int64_t aging_steps, int64_t steps) {
  auto o = small_options(64, 4, 64, /*max_seqs=*/1);
  o.priority_aging_steps = aging_steps;
  Scheduler sched(o);
  const SequenceId low = sched.add_request(request({7, 7}, 2, /*priority=*/10));
  for (int64_t i = 0; i < steps; ++i) {
    sched.add_request(request({1, 2}, 2, /*priority=*/0));
    auto step = sched.schedule();
    if (find(step, low) != nullptr) return step.step;
    run(sched, step);
  }
  return -1;
}

TEST(Scheduler, AgingLetsLowPriorityRunUnderConstantLoad) {
  // Without aging the high-priority stream starves the low-priority request.
  EXPECT_EQ(admission_step_under_load(0, 400), -1);
  // With aging every 5 steps it ranks as 10 * 5 + 0 = 50: it goes ahead of
  // every request arriving after step 50. The queue holds about half of the
  // earlier arrivals then (each takes 2 steps), so it runs by step ~100.
  const int64_t admitted = admission_step_under_load(5, 400);
  EXPECT_GT(admitted, 50);
  EXPECT_LT(admitted, 110);
}

TEST(Scheduler, AgingOrderIsFixedByArrival) {
  auto o = small_options(64, 4, 64, /*max_seqs=*/1);
  o.priority_aging_steps = 4;
  Scheduler sched(o);
  const SequenceId low = sched.add_request(request({1}, 3, /*priority=*/2));  // rank 8
  // Let 9 steps pass so that the next arrival has rank 0 * 4 + 9 = 9.
  for (int i = 0; i < 9; ++i) {
    auto step = sched.schedule();
    if (!step.empty()) run(sched, step);
  }
  EXPECT_FALSE(sched.contains(low));
  const SequenceId low2 = sched.add_request(request({1}, 1, /*priority=*/2));  // 2*4 + 9 = 17
  const SequenceId high = sched.add_request(request({1}, 1, /*priority=*/0));  // 9
  const SequenceId mid = sched.add_request(request({1}, 1, /*priority=*/1));   // 13
  EXPECT_EQ(sched.waiting(), (std::vector<SequenceId>{high, mid, low2}));
}

TEST(Scheduler, PreemptsLowestPriorityThenLeastProgress) {
  // One slot per block, 8 blocks: a, b and c fill the pool exactly.
  Scheduler sched(small_options(8, 1, 64));
  const SequenceId a = sched.add_request(request(iota_tokens(2, 10), 6, /*priority=*/0));
  const SequenceId b = sched.add_request(request(iota_tokens(4, 20), 4, /*priority=*/1));
  const SequenceId c = sched.add_request(request(iota_tokens(2, 30), 6, /*priority=*/1));
  auto step = sched.schedule();
  ASSERT_EQ(step.sequences.size(), 3u);
  EXPECT_EQ(sched.block_manager().num_free_blocks(), 0);
  run(sched, step);
  // a needs a block: b and c share the lowest priority, c has less progress.
  step = sched.schedule();
  EXPECT_EQ(step.preempted, std::vector<SequenceId>{c});
  EXPECT_EQ(ids_of(step), (std::vector<SequenceId>{a, b}));
  EXPECT_EQ(sched.status(c), SequenceStatus::kWaiting);
  EXPECT_EQ(sched.num_computed_tokens(c), 0);
  EXPECT_EQ(sched.stats().num_preemptions_total, 1);
}

TEST(Scheduler, NeverPreemptsHigherPriorityForLower) {
  // 4 blocks of 2: a (3 tokens) has a free slot in its last block, b (4
  // tokens) does not; b's decode needs a block and only a could give one.
  Scheduler sched(small_options(4, 2, 64));
  const SequenceId a = sched.add_request(request(iota_tokens(3, 10), 5, /*priority=*/0));
  const SequenceId b = sched.add_request(request(iota_tokens(4, 20), 5, /*priority=*/1));
  auto step = sched.schedule();
  ASSERT_EQ(step.sequences.size(), 2u);
  run(sched, step);
  step = sched.schedule();
  EXPECT_EQ(step.preempted, std::vector<SequenceId>{b});
  EXPECT_EQ(ids_of(step), std::vector<SequenceId>{a});
  EXPECT_TRUE(step.copies.empty());
}

TEST(Scheduler, PreemptedSequenceResumesWithPromptPlusGeneratedTokens) {
  auto o = small_options(4, 2, 64);  // 8 slots
  o.block_manager.enable_prefix_caching = false;
  Scheduler sched(o);
  const auto prompt_a = iota_tokens(3, 10);
  const auto prompt_b = iota_tokens(3, 20);
  const SequenceId a = sched.add_request(request(prompt_a, 5));
  const SequenceId b = sched.add_request(request(prompt_b, 5));
  std::map<SequenceId, std::vector<int64_t>> streamed;
  std::vector<int64_t> b_tokens_at_preemption;
  bool resumed_checked = false;
  while (sched.has_unfinished()) {
    auto step = sched.schedule();
    if (!step.preempted.empty()) {
      ASSERT_EQ(step.preempted, std::vector<SequenceId>{b});  // later arrival, less progress
      b_tokens_at_preemption = sched.token_ids(b);
    }
    const ScheduledSequence* sb = find(step, b);
    if (sb != nullptr && !b_tokens_at_preemption.empty() && !resumed_checked) {
      // Recompute from position 0 over prompt + the tokens generated before
      // the preemption, sampling the next new token at the end.
      EXPECT_EQ(sb->start_position, 0);
      EXPECT_EQ(sb->token_ids, b_tokens_at_preemption);
      EXPECT_TRUE(sb->sample);
      EXPECT_GT(b_tokens_at_preemption.size(), prompt_b.size());
      resumed_checked = true;
    }
    for (const auto& out : run(sched, step)) streamed[out.seq_id].push_back(out.token);
  }
  EXPECT_TRUE(resumed_checked);
  EXPECT_GE(sched.stats().num_preemptions_total, 1);
  // Each stream holds exactly max_new_tokens tokens, each token 1000 + its
  // position: nothing repeated or lost across the preemption.
  for (SequenceId id : {a, b}) {
    ASSERT_EQ(streamed[id].size(), 5u) << "sequence " << id;
    for (size_t i = 0; i < 5; ++i) EXPECT_EQ(streamed[id][i], 1000 + 3 + static_cast<int64_t>(i));
  }
  EXPECT_EQ(sched.block_manager().num_free_blocks(), 4);
}

TEST(Scheduler, PreemptedSequenceReusesItsCachedBlocks) {
  // 7 blocks of 2. a and b (5 prompt tokens, 3 new) take 3 blocks each; at
  // position 6 a takes the last free block and b has to give way. b's three
  // full blocks (positions 0-5, all computed) stay in the prefix cache, so
  // after a finishes b resumes at position 6.
  Scheduler sched(small_options(7, 2, 64));
  const SequenceId a = sched.add_request(request(iota_tokens(5, 10), 3));
  const SequenceId b = sched.add_request(request(iota_tokens(5, 20), 3));
  std::vector<int64_t> starts;
  bool preempted = false;
  while (sched.has_unfinished()) {
    auto step = sched.schedule();
    if (!step.preempted.empty()) {
      EXPECT_EQ(step.preempted, std::vector<SequenceId>{b});
      EXPECT_EQ(ids_of(step), std::vector<SequenceId>{a});
      preempted = true;
    }
    const ScheduledSequence* sb = find(step, b);
    if (preempted && sb != nullptr && starts.empty()) {
      starts.push_back(sb->start_position);
      EXPECT_EQ(sb->token_ids, std::vector<int64_t>{sched.token_ids(b).back()});
      EXPECT_FALSE(sched.contains(a));
    }
    run(sched, step);
  }
  ASSERT_TRUE(preempted);
  EXPECT_EQ(starts, std::vector<int64_t>{6});
  EXPECT_EQ(sched.stats().prefix_cache.hits, 6);
}

TEST(Scheduler, PrefixCacheSkipsComputedPromptBlocks) {
  Scheduler sched(small_options(32, 4, 64));
  auto prompt = iota_tokens(10);
  Request r1 = request(prompt, 2);
  r1.cache_salt = "adapter-1";
  sched.add_request(r1);
  auto step = sched.schedule();
  run(sched, step);
  // Same prompt, same salt: 8 tokens (2 blocks) come from the cache.
  const SequenceId b = sched.add_request(r1);
  Request r3 = r1;
  r3.cache_salt = "adapter-2";
  const SequenceId c = sched.add_request(r3);
  step = sched.schedule();
  ASSERT_NE(find(step, b), nullptr);
  EXPECT_EQ(find(step, b)->start_position, 8);
  EXPECT_EQ(find(step, b)->token_ids, (std::vector<int64_t>{108, 109}));
  EXPECT_EQ(find(step, c)->start_position, 0);
  EXPECT_EQ(sched.stats().prefix_cache.queries, 30);
  EXPECT_EQ(sched.stats().prefix_cache.hits, 8);
}

TEST(Scheduler, WithoutChunkingAPromptWaitsForAWholeBudget) {
  auto o = small_options(64, 4, 10);
  o.enable_chunked_prefill = false;
  Scheduler sched(o);
  const SequenceId a = sched.add_request(request(iota_tokens(6), 3));
  const SequenceId b = sched.add_request(request(iota_tokens(6, 200), 3));
  const SequenceId c = sched.add_request(request(iota_tokens(2, 300), 3));
  auto step = sched.schedule();
  // b does not fit in the 4 tokens left, and c may not overtake it.
  EXPECT_EQ(ids_of(step), std::vector<SequenceId>{a});
  EXPECT_EQ(step.sequences[0].token_ids.size(), 6u);
  run(sched, step);
  // Now b fits, and c after it.
  step = sched.schedule();
  EXPECT_EQ(ids_of(step), (std::vector<SequenceId>{a, b, c}));
  EXPECT_EQ(step.num_batched_tokens, 1 + 6 + 2);
}

TEST(Scheduler, StopTokensAndLengthFinishSequences) {
  Scheduler sched(small_options(32, 4, 64));
  Request r = request({1, 2, 3}, 10);
  r.stop_token_ids = {1004};  // what model_token samples at the second step
  const SequenceId a = sched.add_request(r);
  auto out = run(sched, sched.schedule());
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].token, 1003);
  EXPECT_FALSE(out[0].finish_reason.has_value());
  EXPECT_EQ(sched.num_generated_tokens(a), 1);
  out = run(sched, sched.schedule());
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].token, 1004);
  EXPECT_EQ(out[0].finish_reason, FinishReason::kStop);
  EXPECT_FALSE(sched.contains(a));
  EXPECT_THROW(sched.status(a), InvalidArgument);
  EXPECT_EQ(sched.block_manager().num_free_blocks(), 32);
  EXPECT_STREQ(finish_reason_name(FinishReason::kStop), "stop");
  EXPECT_STREQ(finish_reason_name(FinishReason::kLength), "length");
}

TEST(Scheduler, CancelWaitingRunningAndPreempted) {
  Scheduler sched(small_options(4, 2, 64));
  const SequenceId a = sched.add_request(request(iota_tokens(3, 10), 5));
  const SequenceId b = sched.add_request(request(iota_tokens(3, 20), 5));
  const SequenceId waiting = sched.add_request(request(iota_tokens(3, 30), 5));
  // Run until b is preempted.
  bool b_preempted = false;
  for (int i = 0; i < 10 && !b_preempted; ++i) {
    auto step = sched.schedule();
    b_preempted = std::count(step.preempted.begin(), step.preempted.end(), b) > 0;
    run(sched, step);
  }
  ASSERT_TRUE(b_preempted);
  EXPECT_EQ(sched.status(b), SequenceStatus::kWaiting);
  sched.cancel(b);  // preempted
  sched.cancel(waiting);
  EXPECT_EQ(sched.status(a), SequenceStatus::kRunning);
  sched.cancel(a);  // running
  sched.check_invariants();
  EXPECT_FALSE(sched.has_unfinished());
  EXPECT_EQ(sched.block_manager().num_free_blocks(), 4);
  EXPECT_THROW(sched.cancel(a), InvalidArgument);
  EXPECT_THROW(sched.finish(12345, FinishReason::kStop), InvalidArgument);
  EXPECT_TRUE(sched.schedule().empty());
}

TEST(Scheduler, CancelWhileAStepIsInFlight) {
  Scheduler sched(small_options(16, 4, 64));
  const SequenceId a = sched.add_request(request(iota_tokens(5), 5));
  const SequenceId b = sched.add_request(request(iota_tokens(5, 50), 5));
  auto step = sched.schedule();
  ASSERT_EQ(step.sequences.size(), 2u);
  sched.cancel(a);
  // The result for a is ignored, whatever it holds.
  auto out = sched.update({std::nullopt, 77});
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].seq_id, b);
  EXPECT_EQ(sched.token_ids(b).back(), 77);
  sched.check_invariants();
}

TEST(Scheduler, AStepThatCannotRunIsClearedByAbortingItsSequences) {
  Scheduler sched(small_options(16, 4, 64));
  const SequenceId a = sched.add_request(request(iota_tokens(5), 5));
  const SequenceId b = sched.add_request(request(iota_tokens(5, 50), 5));
  auto step = sched.schedule();
  ASSERT_EQ(step.sequences.size(), 2u);
  sched.finish(a, FinishReason::kAbort);
  sched.finish(b, FinishReason::kAbort);
  EXPECT_TRUE(sched.update({std::nullopt, std::nullopt}).empty());
  sched.check_invariants();
  EXPECT_EQ(sched.block_manager().num_free_blocks(), 16);
  const SequenceId c = sched.add_request(request(iota_tokens(3), 1));
  EXPECT_EQ(ids_of(sched.schedule()), std::vector<SequenceId>{c});
}

TEST(Scheduler, UpdateValidatesItsInput) {
  Scheduler sched(small_options(16, 4, 4));
  EXPECT_THROW(sched.update({}), FailedPrecondition);  // nothing in flight
  sched.add_request(request(iota_tokens(6), 5));
  auto step = sched.schedule();  // a non-final chunk of 4
  ASSERT_EQ(step.sequences.size(), 1u);
  ASSERT_FALSE(step.sequences[0].sample);
  EXPECT_THROW(sched.schedule(), FailedPrecondition);  // previous step not updated
  EXPECT_THROW(sched.update({}), InvalidArgument);     // wrong size
  EXPECT_THROW(sched.update({5}), InvalidArgument);    // a token where none is sampled
  EXPECT_EQ(sched.num_computed_tokens(step.sequences[0].seq_id), 0);  // nothing applied
  EXPECT_TRUE(sched.update({std::nullopt}).empty());
  EXPECT_EQ(sched.num_computed_tokens(step.sequences[0].seq_id), 4);
  step = sched.schedule();
  ASSERT_TRUE(step.sequences[0].sample);
  EXPECT_THROW(sched.update({std::nullopt}), InvalidArgument);  // token missing
  EXPECT_EQ(sched.update({9}).size(), 1u);
}

TEST(Scheduler, ForkSharesThePromptAndCopiesThePartialBlock) {
  Scheduler sched(small_options(16, 4, 64));
  const SequenceId parent = sched.add_request(request(iota_tokens(6), 4));
  auto step = sched.schedule();
  auto out = run(sched, step);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].token, 1006);

  // The engine sampled a second first token, 555, from the same logits.
  SequenceOutput child_out = sched.fork_sequence(parent, 555);
  const SequenceId child = child_out.seq_id;
  EXPECT_EQ(child_out.token, 555);
  EXPECT_FALSE(child_out.finish_reason.has_value());
  std::vector<int64_t> expected = iota_tokens(6);
  expected.push_back(555);
  EXPECT_EQ(sched.token_ids(child), expected);
  EXPECT_EQ(sched.num_generated_tokens(child), 1);
  EXPECT_EQ(sched.num_computed_tokens(child), 6);
  EXPECT_EQ(sched.block_manager().block_table(child), sched.block_manager().block_table(parent));
  sched.check_invariants();

  step = sched.schedule();
  ASSERT_EQ(ids_of(step), (std::vector<SequenceId>{parent, child}));
  // Position 6 lies in the shared, partially filled second block: the parent
  // gets a copy; the child then owns the original alone.
  ASSERT_EQ(step.copies.size(), 1u);
  const auto& tp = step.sequences[0].block_table;
  const auto& tc = step.sequences[1].block_table;
  EXPECT_EQ(tp[0], tc[0]);
  EXPECT_EQ(step.copies[0].src, tc[1]);
  EXPECT_EQ(step.copies[0].dst, tp[1]);
  EXPECT_EQ(step.sequences[0].token_ids, std::vector<int64_t>{1006});
  EXPECT_EQ(step.sequences[1].token_ids, std::vector<int64_t>{555});
  run(sched, step);
  while (sched.has_unfinished()) run(sched, sched.schedule());
  EXPECT_EQ(sched.block_manager().num_free_blocks(), 16);
}

TEST(Scheduler, ForkPreconditions) {
  Scheduler sched(small_options(16, 4, 4));
  const SequenceId a = sched.add_request(request(iota_tokens(5), 4));
  EXPECT_THROW(sched.fork_sequence(a), FailedPrecondition);  // waiting
  auto step = sched.schedule();                              // first chunk of 4
  EXPECT_THROW(sched.fork_sequence(a), FailedPrecondition);  // in flight
  run(sched, step);
  // One prompt token left to prefill: not yet a sampled sequence.
  EXPECT_EQ(sched.num_computed_tokens(a) + 1, static_cast<int64_t>(sched.token_ids(a).size()));
  EXPECT_THROW(sched.fork_sequence(a), FailedPrecondition);
  run(sched, sched.schedule());
  EXPECT_THROW(sched.fork_sequence(999), InvalidArgument);
  auto forked = sched.fork_sequence(a);  // an identical copy
  EXPECT_EQ(sched.token_ids(forked.seq_id), sched.token_ids(a));
}

TEST(Scheduler, ForkedStopTokenFinishesTheChildAtOnce) {
  Scheduler sched(small_options(16, 4, 64));
  Request r = request(iota_tokens(3), 4);
  r.stop_token_ids = {2};
  const SequenceId a = sched.add_request(r);
  run(sched, sched.schedule());
  auto out = sched.fork_sequence(a, 2);
  EXPECT_EQ(out.finish_reason, FinishReason::kStop);
  EXPECT_FALSE(sched.contains(out.seq_id));
  sched.check_invariants();
}

TEST(Scheduler, StatsReportQueueAndCache) {
  Scheduler sched(small_options(8, 4, 64, /*max_seqs=*/1));
  sched.add_request(request(iota_tokens(5), 3));
  sched.add_request(request(iota_tokens(5), 3));
  auto st = sched.stats();
  EXPECT_EQ(st.num_waiting, 2);
  EXPECT_EQ(st.num_running, 0);
  run(sched, sched.schedule());
  st = sched.stats();
  EXPECT_EQ(st.num_waiting, 1);
  EXPECT_EQ(st.num_running, 1);
  EXPECT_EQ(st.num_steps, 1);
  EXPECT_DOUBLE_EQ(st.kv_cache_usage, 2.0 / 8.0);
}

}  // namespace
}  // namespace tessera::serve
