#include "tessera/serve/block_manager.h"

#include <gtest/gtest.h>

#include <numeric>
#include <string>
#include <vector>

#include "tessera/core/error.h"

namespace tessera::serve {
namespace {

// Tokens base, base + 1, ..., base + n - 1.
std::vector<int64_t> iota_tokens(int64_t n, int64_t base = 100) {
  std::vector<int64_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), base);
  return t;
}

BlockManagerOptions options(int64_t num_blocks, int64_t block_size, bool caching = true) {
  BlockManagerOptions o;
  o.num_blocks = num_blocks;
  o.block_size = block_size;
  o.enable_prefix_caching = caching;
  return o;
}

// Allocates `seq` for all of `tokens` and marks every position computed, as
// the engine does after a full prefill.
void prefill(BlockManager& bm, SequenceId seq, const std::vector<int64_t>& tokens,
             const std::string& salt = "") {
  auto computed = bm.allocate(seq, tokens, salt, static_cast<int64_t>(tokens.size()));
  ASSERT_TRUE(computed.has_value());
  bm.mark_computed(seq, tokens, static_cast<int64_t>(tokens.size()));
}

template <typename Fn>
std::string error_message(Fn fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.message();
  }
  return "<no error>";
}

TEST(BlockManager, RejectsBadOptions) {
  EXPECT_THROW(BlockManager(options(0, 16)), InvalidArgument);
  EXPECT_THROW(BlockManager(options(4, 0)), InvalidArgument);
  EXPECT_THROW(BlockManager(options(int64_t{1} << 40, 16)), InvalidArgument);
}

TEST(BlockManager, AllocateAndFreeWithoutCaching) {
  BlockManager bm(options(10, 4, /*caching=*/false));
  EXPECT_EQ(bm.num_free_blocks(), 10);
  EXPECT_DOUBLE_EQ(bm.usage(), 0.0);
  auto tokens = iota_tokens(10);
  auto computed = bm.allocate(1, tokens, "", 10);
  ASSERT_TRUE(computed.has_value());
  EXPECT_EQ(*computed, 0);
  EXPECT_EQ(bm.block_table(1), (std::vector<BlockId>{0, 1, 2}));  // ceil(10 / 4) blocks
  EXPECT_EQ(bm.num_slots(1), 10);
  EXPECT_EQ(bm.num_free_blocks(), 7);
  EXPECT_DOUBLE_EQ(bm.usage(), 0.3);
  for (BlockId b : bm.block_table(1)) EXPECT_EQ(bm.ref_count(b), 1);
  bm.mark_computed(1, tokens, 10);
  EXPECT_EQ(bm.num_cached_blocks(), 0);  // caching off: nothing registered
  EXPECT_EQ(bm.prefix_cache_stats().queries, 0);
  bm.check_consistency();
  bm.free(1);
  EXPECT_EQ(bm.num_free_blocks(), 10);
  EXPECT_EQ(bm.num_evictable_blocks(), 0);
  EXPECT_FALSE(bm.has_sequence(1));
  bm.check_consistency();
}

TEST(BlockManager, ErrorsNameTheSequence) {
  BlockManager bm(options(4, 4));
  ASSERT_TRUE(bm.allocate(7, iota_tokens(3), "", 3).has_value());
  EXPECT_THROW((void)bm.allocate(7, iota_tokens(3), "", 3), FailedPrecondition);
  EXPECT_NE(error_message([&] { (void)bm.allocate(7, iota_tokens(3), "", 3); }).find("sequence 7"),
            std::string::npos);
  EXPECT_THROW((void)bm.allocate(8, {}, "", 1), InvalidArgument);
  EXPECT_THROW((void)bm.allocate(8, iota_tokens(3), "", 0), InvalidArgument);
  bm.free(7);
  EXPECT_THROW(bm.free(7), InvalidArgument);  // double free
  EXPECT_NE(error_message([&] { bm.free(7); }).find("sequence 7"), std::string::npos);
  EXPECT_THROW(bm.block_table(42), InvalidArgument);
  EXPECT_NE(error_message([&] { bm.block_table(42); }).find("sequence 42"), std::string::npos);
  std::vector<BlockCopy> copies;
  EXPECT_THROW((void)bm.append_slots(42, 1, &copies), InvalidArgument);
  EXPECT_THROW(bm.mark_computed(42, iota_tokens(1), 1), InvalidArgument);
  EXPECT_THROW(bm.ref_count(4), InvalidArgument);
  EXPECT_THROW(bm.ref_count(-1), InvalidArgument);
  bm.check_consistency();
}

TEST(BlockManager, NotEnoughBlocksChangesNothing) {
  BlockManager bm(options(3, 4));
  EXPECT_TRUE(bm.can_allocate(3));
  EXPECT_FALSE(bm.can_allocate(4));
  EXPECT_FALSE(bm.allocate(1, iota_tokens(13), "", 13).has_value());  // needs 4 blocks
  EXPECT_FALSE(bm.has_sequence(1));
  EXPECT_EQ(bm.num_free_blocks(), 3);
  EXPECT_EQ(bm.prefix_cache_stats().queries, 0);  // a failed allocation is not a query

  ASSERT_TRUE(bm.allocate(1, iota_tokens(5), "", 5).has_value());  // 2 blocks
  std::vector<BlockCopy> copies;
  EXPECT_EQ(bm.blocks_needed_to_append(1, 8), 2);  // 13 slots: 4 blocks
  EXPECT_FALSE(bm.append_slots(1, 8, &copies));
  EXPECT_EQ(bm.num_slots(1), 5);
  EXPECT_EQ(bm.block_table(1).size(), 2u);
  EXPECT_TRUE(copies.empty());
  EXPECT_TRUE(bm.append_slots(1, 7, &copies));  // 12 slots: 3 blocks
  EXPECT_EQ(bm.num_free_blocks(), 0);
  bm.check_consistency();
}

TEST(BlockManager, AppendSlotsTakesABlockAtEachBoundary) {
  BlockManager bm(options(8, 4));
  ASSERT_TRUE(bm.allocate(1, iota_tokens(3), "", 3).has_value());
  std::vector<BlockCopy> copies;
  EXPECT_EQ(bm.blocks_needed_to_append(1, 1), 0);
  ASSERT_TRUE(bm.append_slots(1, 1, &copies));  // slot 3: same block
  EXPECT_EQ(bm.block_table(1).size(), 1u);
  EXPECT_EQ(bm.blocks_needed_to_append(1, 1), 1);
  ASSERT_TRUE(bm.append_slots(1, 1, &copies));  // slot 4: a new block
  EXPECT_EQ(bm.block_table(1).size(), 2u);
  EXPECT_EQ(bm.blocks_needed_to_append(1, 8), 2);  // 13 slots: 4 blocks
  ASSERT_TRUE(bm.append_slots(1, 8, &copies));
  EXPECT_EQ(bm.block_table(1).size(), 4u);
  EXPECT_EQ(bm.num_slots(1), 13);
  EXPECT_TRUE(bm.append_slots(1, 0, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_THROW((void)bm.append_slots(1, -1, &copies), InvalidArgument);
  EXPECT_THROW((void)bm.append_slots(1, 1, nullptr), InvalidArgument);
  bm.check_consistency();
}

TEST(BlockManager, PrefixHitReusesFullComputedBlocks) {
  BlockManager bm(options(16, 4));
  auto a = iota_tokens(10);
  prefill(bm, 1, a);
  // Blocks 0 and 1 are full and computed; block 2 (2 tokens) is not full.
  EXPECT_EQ(bm.num_cached_blocks(), 2);
  EXPECT_TRUE(bm.is_cached(bm.block_table(1)[0]));
  EXPECT_TRUE(bm.is_cached(bm.block_table(1)[1]));
  EXPECT_FALSE(bm.is_cached(bm.block_table(1)[2]));

  std::vector<int64_t> b(a.begin(), a.begin() + 8);
  b.push_back(7);
  b.push_back(8);
  b.push_back(9);  // 11 tokens: first 8 shared with `a`
  EXPECT_EQ(bm.cached_prefix_tokens(b, ""), 8);
  auto computed = bm.allocate(2, b, "", 11);
  ASSERT_TRUE(computed.has_value());
  EXPECT_EQ(*computed, 8);
  EXPECT_EQ(bm.num_computed_tokens(2), 8);
  const auto& ta = bm.block_table(1);
  const auto& tb = bm.block_table(2);
  ASSERT_EQ(tb.size(), 3u);
  EXPECT_EQ(tb[0], ta[0]);
  EXPECT_EQ(tb[1], ta[1]);
  EXPECT_NE(tb[2], ta[2]);
  EXPECT_EQ(bm.ref_count(ta[0]), 2);
  EXPECT_EQ(bm.ref_count(ta[1]), 2);
  EXPECT_EQ(bm.ref_count(tb[2]), 1);
  EXPECT_EQ(bm.prefix_cache_stats().queries, 10 + 11);
  EXPECT_EQ(bm.prefix_cache_stats().hits, 8);
  bm.check_consistency();

  // A different first block: nothing matches, even though later blocks
  // have equal tokens (each hash covers the whole prefix).
  auto c = a;
  c[0] = -5;
  EXPECT_EQ(bm.cached_prefix_tokens(c, ""), 0);
}

TEST(BlockManager, BlocksAreCachedOnlyOnceComputed) {
  BlockManager bm(options(16, 4));
  auto a = iota_tokens(12);
  ASSERT_TRUE(bm.allocate(1, a, "", 12).has_value());
  EXPECT_EQ(bm.cached_prefix_tokens(a, ""), 0);  // allocated, not computed
  bm.mark_computed(1, a, 6);                     // block 0 full and computed; block 1 half
  EXPECT_EQ(bm.num_cached_blocks(), 1);
  EXPECT_EQ(bm.cached_prefix_tokens(a, ""), 4);
  bm.mark_computed(1, a, 12);
  EXPECT_EQ(bm.num_cached_blocks(), 3);
  EXPECT_EQ(bm.cached_prefix_tokens(a, ""), 8);  // the last token is always left to compute
  EXPECT_THROW(bm.mark_computed(1, a, 11), InvalidArgument);  // going down
  bm.check_consistency();
}

TEST(BlockManager, AlwaysLeavesOnePromptTokenToCompute) {
  BlockManager bm(options(16, 4));
  auto a = iota_tokens(8);
  prefill(bm, 1, a);
  EXPECT_EQ(bm.num_cached_blocks(), 2);
  // Same 8 tokens: both blocks are cached, but only the first is reused so
  // that position 7 is computed again and produces logits.
  auto computed = bm.allocate(2, a, "", 8);
  ASSERT_TRUE(computed.has_value());
  EXPECT_EQ(*computed, 4);
  EXPECT_EQ(bm.block_table(2)[0], bm.block_table(1)[0]);
  EXPECT_NE(bm.block_table(2)[1], bm.block_table(1)[1]);
  // A shorter reservation limits the reuse too: only what lies before
  // num_tokens - 1.
  auto longer = iota_tokens(12);
  auto computed3 = bm.allocate(3, longer, "", 5);
  ASSERT_TRUE(computed3.has_value());
  EXPECT_EQ(*computed3, 4);
  EXPECT_EQ(bm.block_table(3).size(), 2u);
  bm.check_consistency();
}

TEST(BlockManager, SaltsSeparateCaches) {
  BlockManager bm(options(16, 4));
  auto a = iota_tokens(9);
  prefill(bm, 1, a, "adapter-a");
  EXPECT_EQ(bm.cached_prefix_tokens(a, "adapter-a"), 8);
  EXPECT_EQ(bm.cached_prefix_tokens(a, "adapter-b"), 0);
  EXPECT_EQ(bm.cached_prefix_tokens(a, ""), 0);
  auto computed = bm.allocate(2, a, "adapter-b", 9);
  ASSERT_TRUE(computed.has_value());
  EXPECT_EQ(*computed, 0);
  bm.mark_computed(2, a, 9);
  // Both salts now have their own cached copies.
  EXPECT_EQ(bm.num_cached_blocks(), 4);
  EXPECT_EQ(bm.cached_prefix_tokens(a, "adapter-b"), 8);
  bm.check_consistency();
}

TEST(BlockManager, FreedCachedBlocksAreEvictedLruTailFirst) {
  // 6 blocks of 2 tokens.
  BlockManager bm(options(6, 2));
  auto a = iota_tokens(4, 100);
  prefill(bm, 1, a);  // blocks 0, 1, both cached
  const std::vector<BlockId> a_blocks = bm.block_table(1);
  bm.free(1);
  EXPECT_EQ(bm.num_free_blocks(), 6);
  EXPECT_EQ(bm.num_evictable_blocks(), 2);
  EXPECT_TRUE(bm.is_cached(a_blocks[0]));

  // Never-cached blocks are taken before any cached one is evicted.
  ASSERT_TRUE(bm.allocate(2, iota_tokens(8, 500), "", 8).has_value());  // 4 blocks
  for (BlockId b : bm.block_table(2)) {
    EXPECT_NE(b, a_blocks[0]);
    EXPECT_NE(b, a_blocks[1]);
  }
  EXPECT_EQ(bm.num_evictable_blocks(), 2);
  EXPECT_EQ(bm.cached_prefix_tokens(iota_tokens(5, 100), ""), 4);

  // The next block evicts a's tail block first, keeping its prefix block.
  ASSERT_TRUE(bm.allocate(3, iota_tokens(1, 900), "", 1).has_value());
  EXPECT_EQ(bm.block_table(3)[0], a_blocks[1]);
  EXPECT_FALSE(bm.is_cached(a_blocks[1]));
  EXPECT_TRUE(bm.is_cached(a_blocks[0]));
  EXPECT_EQ(bm.cached_prefix_tokens(iota_tokens(5, 100), ""), 2);
  bm.check_consistency();
}

TEST(BlockManager, EvictionFollowsFreeOrderAcrossSequences) {
  BlockManager bm(options(4, 2));
  auto x = iota_tokens(3, 100);  // one full block
  auto y = iota_tokens(3, 200);
  prefill(bm, 1, x);
  prefill(bm, 2, y);
  const BlockId x_block = bm.block_table(1)[0];
  const BlockId y_block = bm.block_table(2)[0];
  bm.free(1);  // x's blocks become least recently used
  bm.free(2);
  EXPECT_EQ(bm.num_evictable_blocks(), 2);
  EXPECT_EQ(bm.num_free_blocks(), 4);
  // Two never-cached free blocks (the partial ones), then x's, then y's.
  ASSERT_TRUE(bm.allocate(3, iota_tokens(4, 300), "", 4).has_value());
  EXPECT_TRUE(bm.is_cached(x_block));
  EXPECT_TRUE(bm.is_cached(y_block));
  ASSERT_TRUE(bm.allocate(4, iota_tokens(1, 400), "", 1).has_value());
  EXPECT_EQ(bm.block_table(4)[0], x_block);
  EXPECT_TRUE(bm.is_cached(y_block));
  EXPECT_EQ(bm.cached_prefix_tokens(x, ""), 0);
  EXPECT_EQ(bm.cached_prefix_tokens(y, ""), 2);
  bm.check_consistency();
}

TEST(BlockManager, CacheHitRevivesAnEvictableBlock) {
  BlockManager bm(options(3, 2));
  auto a = iota_tokens(4);
  prefill(bm, 1, a);
  const std::vector<BlockId> a_blocks = bm.block_table(1);
  bm.free(1);
  EXPECT_EQ(bm.num_evictable_blocks(), 2);

  // Reusing both cached blocks and taking one new block needs all 3 free
  // blocks: the revived ones leave the free pool too.
  auto b = iota_tokens(6);
  auto too_big = iota_tokens(7);
  EXPECT_FALSE(bm.allocate(2, too_big, "", 7).has_value());  // 2 revived + 2 new > 3
  EXPECT_EQ(bm.num_evictable_blocks(), 2);
  auto computed = bm.allocate(2, b, "", 6);
  ASSERT_TRUE(computed.has_value());
  EXPECT_EQ(*computed, 4);
  EXPECT_EQ(bm.block_table(2)[0], a_blocks[0]);
  EXPECT_EQ(bm.block_table(2)[1], a_blocks[1]);
  EXPECT_EQ(bm.num_evictable_blocks(), 0);
  EXPECT_EQ(bm.num_free_blocks(), 0);
  EXPECT_EQ(bm.ref_count(a_blocks[0]), 1);
  bm.check_consistency();
}

TEST(BlockManager, IdenticalConcurrentBlocksRegisterOnce) {
  BlockManager bm(options(8, 2));
  auto a = iota_tokens(4);
  ASSERT_TRUE(bm.allocate(1, a, "", 4).has_value());
  ASSERT_TRUE(bm.allocate(2, a, "", 4).has_value());  // nothing cached yet: own blocks
  bm.mark_computed(1, a, 4);
  bm.mark_computed(2, a, 4);
  EXPECT_EQ(bm.num_cached_blocks(), 2);
  EXPECT_TRUE(bm.is_cached(bm.block_table(1)[0]));
  EXPECT_FALSE(bm.is_cached(bm.block_table(2)[0]));
  bm.free(2);  // its uncached duplicates go straight to the never-cached list
  EXPECT_EQ(bm.num_evictable_blocks(), 0);
  bm.check_consistency();
}

TEST(BlockManager, ForkSharesBlocksAndCopiesOnWriteOfAPartialBlock) {
  BlockManager bm(options(8, 4));
  auto p = iota_tokens(6);
  prefill(bm, 1, p);  // blocks [full, 2 of 4 used]
  bm.fork_sequence(1, 2);
  EXPECT_EQ(bm.block_table(2), bm.block_table(1));
  const BlockId full = bm.block_table(1)[0];
  const BlockId partial = bm.block_table(1)[1];
  EXPECT_EQ(bm.ref_count(full), 2);
  EXPECT_EQ(bm.ref_count(partial), 2);
  EXPECT_EQ(bm.num_computed_tokens(2), 6);
  bm.check_consistency();

  std::vector<BlockCopy> copies;
  EXPECT_EQ(bm.blocks_needed_to_append(1, 1), 1);  // the copy
  ASSERT_TRUE(bm.append_slots(1, 1, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, partial);
  EXPECT_NE(copies[0].dst, partial);
  EXPECT_EQ(bm.block_table(1), (std::vector<BlockId>{full, copies[0].dst}));
  EXPECT_EQ(bm.ref_count(full), 2);  // full shared blocks are never copied
  EXPECT_EQ(bm.ref_count(partial), 1);
  // The child now owns the old partial block alone: no copy for it.
  copies.clear();
  EXPECT_EQ(bm.blocks_needed_to_append(2, 1), 0);
  ASSERT_TRUE(bm.append_slots(2, 1, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(bm.block_table(2), (std::vector<BlockId>{full, partial}));
  bm.check_consistency();
  bm.free(1);
  bm.free(2);
  EXPECT_EQ(bm.num_free_blocks(), 8);
  bm.check_consistency();
}

TEST(BlockManager, ForkOfAFullLastBlockNeedsNoCopy) {
  BlockManager bm(options(8, 4));
  auto p = iota_tokens(8);
  prefill(bm, 1, p);
  bm.fork_sequence(1, 2);
  std::vector<BlockCopy> copies;
  ASSERT_TRUE(bm.append_slots(1, 1, &copies));
  ASSERT_TRUE(bm.append_slots(2, 1, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(bm.block_table(1).size(), 3u);
  EXPECT_NE(bm.block_table(1)[2], bm.block_table(2)[2]);
  EXPECT_EQ(bm.ref_count(bm.block_table(1)[1]), 2);
  bm.check_consistency();
}

TEST(BlockManager, CopyOnWriteFailsCleanlyWithoutAFreeBlock) {
  BlockManager bm(options(2, 4));
  auto p = iota_tokens(6);
  prefill(bm, 1, p);
  bm.fork_sequence(1, 2);
  std::vector<BlockCopy> copies;
  EXPECT_FALSE(bm.append_slots(1, 1, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(bm.num_slots(1), 6);
  EXPECT_EQ(bm.ref_count(bm.block_table(1)[1]), 2);
  bm.check_consistency();
}

TEST(BlockManager, ForkPreconditions) {
  BlockManager bm(options(8, 4));
  auto p = iota_tokens(6);
  ASSERT_TRUE(bm.allocate(1, p, "", 6).has_value());
  EXPECT_THROW(bm.fork_sequence(1, 2), FailedPrecondition);  // slots not computed yet
  bm.mark_computed(1, p, 6);
  EXPECT_THROW(bm.fork_sequence(1, 1), InvalidArgument);
  EXPECT_THROW(bm.fork_sequence(9, 2), InvalidArgument);
  bm.fork_sequence(1, 2);
  EXPECT_THROW(bm.fork_sequence(1, 2), FailedPrecondition);  // child exists
  bm.check_consistency();
}

TEST(BlockManager, MarkComputedValidatesCounts) {
  BlockManager bm(options(8, 4));
  auto p = iota_tokens(6);
  ASSERT_TRUE(bm.allocate(1, p, "", 6).has_value());
  EXPECT_THROW(bm.mark_computed(1, p, 7), InvalidArgument);  // beyond the slots
  std::vector<int64_t> short_tokens(p.begin(), p.begin() + 3);
  EXPECT_THROW(bm.mark_computed(1, short_tokens, 4), InvalidArgument);  // beyond the tokens
  bm.mark_computed(1, p, 4);
  EXPECT_THROW(bm.mark_computed(1, p, 3), InvalidArgument);
  EXPECT_EQ(bm.num_computed_tokens(1), 4);
}

TEST(BlockManager, GeneratedTokensJoinTheCacheToo) {
  BlockManager bm(options(8, 2));
  std::vector<int64_t> seq = {1, 2, 3};
  ASSERT_TRUE(bm.allocate(1, seq, "", 3).has_value());
  bm.mark_computed(1, seq, 3);
  EXPECT_EQ(bm.num_cached_blocks(), 1);
  // Decode: the sampled token 4 is fed at position 3.
  seq.push_back(4);
  std::vector<BlockCopy> copies;
  ASSERT_TRUE(bm.append_slots(1, 1, &copies));
  bm.mark_computed(1, seq, 4);
  EXPECT_EQ(bm.num_cached_blocks(), 2);
  EXPECT_EQ(bm.cached_prefix_tokens({1, 2, 3, 4, 5}, ""), 4);
}

}  // namespace
}  // namespace tessera::serve
