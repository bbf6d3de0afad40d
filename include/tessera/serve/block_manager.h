// tessera/serve/block_manager.h — paged KV-cache bookkeeping with prefix caching.
//
// The KV cache of the serving engine is a pool of fixed-size blocks, each
// holding the keys and values of `block_size` consecutive token positions of
// one sequence. The BlockManager decides which block holds which positions;
// it owns no tensors (block ids index the engine's KV tensors). It provides:
//
//   * per-sequence block tables: position p of a sequence lives in slot
//     p % block_size of block table[p / block_size];
//   * reference counts, so blocks can be shared between sequences;
//   * prefix caching: a FULL block whose KV has been computed is registered
//     under a hash of (hash of the previous block, its token ids), where the
//     first block's "previous hash" is derived from a per-request salt (the
//     adapter id, a cache salt). A new sequence whose prompt starts with the
//     same full blocks under the same salt reuses them instead of recomputing;
//   * LRU eviction: a freed block whose hash is registered stays reusable
//     until its space is needed; allocation takes never-cached free blocks
//     first, then evicts the least recently freed cached block;
//   * copy-on-write: fork_sequence() shares every block of a sequence; appending to a
//     sequence whose last, partially filled block is shared moves it to a new
//     block and returns a copy instruction the engine must run first.
//
// The life of a sequence, as the engine drives it:
//
//   tessera::serve::BlockManagerOptions opts;
//   opts.num_blocks = 1024;                      // what fits in GPU memory
//   tessera::serve::BlockManager blocks(opts);
//   // Admit: reserve slots for the first 64 prompt tokens; reuse the cache.
//   auto computed = blocks.allocate(seq, prompt, /*salt=*/"", /*num_tokens=*/64);
//   if (!computed) { /* not enough free blocks: keep the request waiting */ }
//   // ... run the model on positions [*computed, 64) using block_table(seq) ...
//   blocks.mark_computed(seq, prompt, 64);       // full computed blocks get cached
//   // Decode: one more slot per step.
//   std::vector<tessera::serve::BlockCopy> copies;
//   if (!blocks.append_slots(seq, 1, &copies)) { /* preempt someone, retry */ }
//   // ... run `copies` on the KV tensors, then the model ...
//   blocks.free(seq);
//
// Thread-safety: not thread-safe; one thread (the engine's scheduler) owns a
// BlockManager. Const methods may run concurrently with each other only.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace tessera::serve {

// Index of a KV block in [0, num_blocks).
using BlockId = int32_t;
// Caller-chosen id of a sequence (one generation stream).
using SequenceId = int64_t;

struct BlockManagerOptions {
  // Blocks in the pool. Required (> 0). The engine derives it from the memory
  // it gives the KV cache: bytes / (block_size * bytes per token position).
  int64_t num_blocks = 0;
  // Token positions per block (> 0). Larger blocks mean shorter tables and
  // fewer copies, but coarser prefix reuse (only whole blocks are shared) and
  // more unused slots in each sequence's last block.
  int64_t block_size = 16;
  // Register full computed blocks and reuse them across sequences. Off: every
  // allocation computes from position 0 and freed blocks are forgotten.
  bool enable_prefix_caching = true;
};

// "Copy block src into block dst" (all block_size slots, every layer). Issued
// by copy-on-write; the engine runs every copy of a step before any of the
// step's model work writes to the cache.
struct BlockCopy {
  BlockId src = 0;
  BlockId dst = 0;
  bool operator==(const BlockCopy& other) const { return src == other.src && dst == other.dst; }
};

// Prefix-cache counters, in tokens, in the sense of vLLM's
// vllm:prefix_cache_queries / vllm:prefix_cache_hits.
struct PrefixCacheStats {
  int64_t queries = 0;  // prompt tokens looked up by successful allocate() calls
  int64_t hits = 0;     // of those, tokens found computed in the cache
};

class BlockManager {
 public:
  // InvalidArgument if num_blocks or block_size is not positive, or if
  // num_blocks does not fit in a BlockId.
  explicit BlockManager(const BlockManagerOptions& options);

  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;

  const BlockManagerOptions& options() const { return options_; }
  int64_t block_size() const { return options_.block_size; }
  int64_t num_blocks() const { return options_.num_blocks; }

  // Number of leading tokens of `tokens` whose KV allocate(.., salt, ..)
  // would find in the cache right now: whole cached blocks, and never all of
  // `tokens` (at least the last token is left to compute, since the model
  // needs a last position to produce logits). 0 when prefix caching is off.
  // Changes nothing (not even the counters).
  int64_t cached_prefix_tokens(const std::vector<int64_t>& tokens, const std::string& salt) const;

  // Creates the block table of a new sequence `seq` whose known tokens are
  // `tokens` (its prompt), with slots reserved for its first `num_tokens`
  // positions. Leading full blocks found in the prefix cache are shared
  // (their reference counts go up); the rest are new blocks.
  //
  // Returns the number of leading tokens whose KV is already computed
  // (a multiple of block_size, at most num_tokens - 1 and at most
  // tokens.size() - 1): the engine computes positions [result, num_tokens).
  // Returns nullopt, changing nothing, when the pool lacks free blocks.
  // With prefix caching on, adds tokens.size() to the query counter and the
  // result to the hit counter on success. `salt` separates caches: blocks are shared only between
  // sequences allocated with the same salt (use the adapter id, or "").
  //
  // InvalidArgument: tokens empty, num_tokens < 1. FailedPrecondition: `seq`
  // already has a block table.
  [[nodiscard]] std::optional<int64_t> allocate(SequenceId seq, const std::vector<int64_t>& tokens,
                                                const std::string& salt, int64_t num_tokens);

  // Number of free blocks append_slots(seq, num_tokens, ..) would take: the
  // new blocks plus one if the last block must be copied. InvalidArgument:
  // unknown `seq`, num_tokens < 0.
  int64_t blocks_needed_to_append(SequenceId seq, int64_t num_tokens) const;

  // Reserves slots for positions [num_slots(seq), num_slots(seq) + num_tokens).
  // If the last block is partially filled and shared with another sequence,
  // it is replaced by a new private block and {old, new} is appended to
  // *copies: the engine must copy it before writing. Full shared blocks are
  // never copied (new tokens go to new blocks). Returns false, changing
  // nothing, when the pool lacks the blocks (blocks_needed_to_append).
  // InvalidArgument: unknown `seq`, num_tokens < 0, copies null.
  [[nodiscard]] bool append_slots(SequenceId seq, int64_t num_tokens,
                                  std::vector<BlockCopy>* copies);

  // Records that positions [0, num_computed_tokens) of `seq` now hold computed
  // KV, `tokens` being the sequence's known tokens (at least
  // num_computed_tokens of them; the same values as in earlier calls for the
  // same positions). Every block that is now full and computed is
  // registered in the prefix cache (unless caching is off, the block is
  // already registered, or an identical block is). Call after each model
  // step. InvalidArgument: unknown `seq`, num_computed_tokens smaller than
  // before, larger than num_slots(seq) or than tokens.size().
  void mark_computed(SequenceId seq, const std::vector<int64_t>& tokens,
                     int64_t num_computed_tokens);

  // Gives `child` the block table of `parent` (every block shared, reference
  // counts up), for parallel sampling. The child inherits the parent's slot
  // and computed counts and salt. InvalidArgument: unknown parent, child ==
  // parent. FailedPrecondition: child already has a table; the parent has
  // reserved slots that are not computed yet (the child would share KV that
  // does not exist).
  void fork_sequence(SequenceId parent, SequenceId child);

  // Releases the table of `seq`. Blocks no longer used by any sequence become
  // free: registered ones go to the evictable LRU list (the sequence's last
  // block first, so that tails are evicted before the prefixes they extend),
  // others to the never-cached free list. InvalidArgument: unknown `seq`
  // (never allocated, or already freed).
  void free(SequenceId seq);

  bool has_sequence(SequenceId seq) const;
  // InvalidArgument for an unknown `seq` in all three.
  const std::vector<BlockId>& block_table(SequenceId seq) const;
  int64_t num_slots(SequenceId seq) const;
  int64_t num_computed_tokens(SequenceId seq) const;
  std::vector<SequenceId> sequences() const;

  // Blocks not used by any sequence (never-cached plus evictable).
  int64_t num_free_blocks() const;
  // Free blocks whose hash is still registered (reusable by a cache hit).
  int64_t num_evictable_blocks() const;
  // Blocks whose hash is registered, used or not.
  int64_t num_cached_blocks() const { return static_cast<int64_t>(cached_.size()); }
  // 1 - free / total, in [0, 1] (vLLM's KV-cache usage).
  double usage() const;
  // True when `num_new_blocks` blocks can be taken now.
  bool can_allocate(int64_t num_new_blocks) const;
  // Reference count of `block` (0: free). InvalidArgument when out of range.
  int64_t ref_count(BlockId block) const;
  // Whether `block`'s hash is registered. InvalidArgument when out of range.
  bool is_cached(BlockId block) const;
  const PrefixCacheStats& prefix_cache_stats() const { return stats_; }

  // Throws Internal describing the first inconsistency found: a reference
  // count differing from the number of tables holding the block, a block
  // that is free and used, or in no list, a hash map entry pointing to the
  // wrong block, free + used != total, a table of the wrong length. O(total
  // blocks + table entries); meant for tests and debugging.
  void check_consistency() const;

 private:
  struct Sequence {
    std::vector<BlockId> table;
    int64_t num_slots = 0;     // positions reserved
    int64_t num_computed = 0;  // positions with computed KV
    uint64_t root_hash = 0;    // "previous hash" of block 0, from the salt
    // Content hashes of the leading full computed blocks, one per block.
    std::vector<uint64_t> block_hashes;
  };
  struct Block {
    int32_t ref_count = 0;
    bool cached = false;  // hash registered in cached_
    bool evictable = false;
    uint64_t hash = 0;
    uint64_t parent_hash = 0;                   // while cached: verifies hash hits exactly
    std::vector<int64_t> tokens;                // while cached: the block's token ids
    std::list<BlockId>::iterator lru_position;  // valid while evictable
  };

  Sequence& sequence(SequenceId seq, const char* what);
  const Sequence& sequence(SequenceId seq, const char* what) const;
  // Walks the cache along `tokens`: the cached blocks of the first
  // `max_blocks` full blocks, stopping at the first miss.
  std::vector<BlockId> find_cached_prefix(const std::vector<int64_t>& tokens, uint64_t root_hash,
                                          int64_t max_blocks) const;
  // Takes a free block (never-cached first, else evicts the LRU one) and
  // gives it reference count 1. The caller has checked one is free.
  BlockId take_free_block();
  // Reference count +1; revives an evictable block.
  void acquire(BlockId block);
  // Reference count -1; a block reaching 0 goes to a free list.
  void release(BlockId block);
  void uncache(BlockId block);
  void check_block(BlockId block) const;

  BlockManagerOptions options_;
  std::vector<Block> blocks_;
  std::vector<BlockId> never_cached_free_;  // stack: the back is taken first
  std::list<BlockId> evictable_;            // LRU order: the front is evicted first
  std::unordered_map<uint64_t, BlockId> cached_;
  std::unordered_map<SequenceId, Sequence> sequences_;
  PrefixCacheStats stats_;
};

}  // namespace tessera::serve
