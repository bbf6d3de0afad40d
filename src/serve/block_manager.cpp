#include "tessera/serve/block_manager.h"

#include <algorithm>
#include <limits>

#include "hash.h"
#include "tessera/core/error.h"

namespace tessera::serve {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

BlockManager::BlockManager(const BlockManagerOptions& options) : options_(options) {
  TESSERA_CHECK(options.num_blocks > 0, InvalidArgument,
                "BlockManagerOptions.num_blocks must be positive, got ", options.num_blocks);
  TESSERA_CHECK(options.num_blocks <= std::numeric_limits<BlockId>::max(), InvalidArgument,
                "BlockManagerOptions.num_blocks must be at most ",
                std::numeric_limits<BlockId>::max(), ", got ", options.num_blocks);
  TESSERA_CHECK(options.block_size > 0, InvalidArgument,
                "BlockManagerOptions.block_size must be positive, got ", options.block_size);
  blocks_.resize(static_cast<size_t>(options.num_blocks));
  never_cached_free_.reserve(blocks_.size());
  // Reversed, so that block 0 is handed out first.
  for (int64_t b = options.num_blocks - 1; b >= 0; --b) {
    never_cached_free_.push_back(static_cast<BlockId>(b));
  }
}

BlockManager::Sequence& BlockManager::sequence(SequenceId seq, const char* what) {
  auto it = sequences_.find(seq);
  TESSERA_CHECK(it != sequences_.end(), InvalidArgument, "BlockManager::", what, ": sequence ", seq,
                " has no block table (never allocated, or already freed)");
  return it->second;
}

const BlockManager::Sequence& BlockManager::sequence(SequenceId seq, const char* what) const {
  auto it = sequences_.find(seq);
  TESSERA_CHECK(it != sequences_.end(), InvalidArgument, "BlockManager::", what, ": sequence ", seq,
                " has no block table (never allocated, or already freed)");
  return it->second;
}

void BlockManager::check_block(BlockId block) const {
  TESSERA_CHECK(block >= 0 && block < options_.num_blocks, InvalidArgument, "block id ", block,
                " is outside [0, ", options_.num_blocks, ")");
}

std::vector<BlockId> BlockManager::find_cached_prefix(const std::vector<int64_t>& tokens,
                                                      uint64_t root_hash,
                                                      int64_t max_blocks) const {
  std::vector<BlockId> found;
  if (!options_.enable_prefix_caching) return found;
  const int64_t bs = options_.block_size;
  uint64_t parent = root_hash;
  for (int64_t i = 0; i < max_blocks; ++i) {
    const int64_t* begin = tokens.data() + i * bs;
    const uint64_t h = hash_token_block(parent, begin, bs);
    auto it = cached_.find(h);
    if (it == cached_.end()) break;
    // The hash names the block; the stored content proves it, so that a
    // 64-bit collision can never hand a sequence another prompt's KV.
    const Block& block = blocks_[static_cast<size_t>(it->second)];
    if (block.parent_hash != parent ||
        !std::equal(block.tokens.begin(), block.tokens.end(), begin)) {
      break;
    }
    found.push_back(it->second);
    parent = h;
  }
  return found;
}

int64_t BlockManager::cached_prefix_tokens(const std::vector<int64_t>& tokens,
                                           const std::string& salt) const {
  if (tokens.empty()) return 0;
  const int64_t max_blocks = (static_cast<int64_t>(tokens.size()) - 1) / options_.block_size;
  return static_cast<int64_t>(find_cached_prefix(tokens, hash_salt(salt), max_blocks).size()) *
         options_.block_size;
}

std::optional<int64_t> BlockManager::allocate(SequenceId seq, const std::vector<int64_t>& tokens,
                                              const std::string& salt, int64_t num_tokens) {
  TESSERA_CHECK(!tokens.empty(), InvalidArgument, "BlockManager::allocate: sequence ", seq,
                " has no tokens");
  TESSERA_CHECK(num_tokens >= 1, InvalidArgument, "BlockManager::allocate: sequence ", seq,
                ": num_tokens must be at least 1, got ", num_tokens);
  TESSERA_CHECK(sequences_.count(seq) == 0, FailedPrecondition, "BlockManager::allocate: sequence ",
                seq, " already has a block table");
  const int64_t bs = options_.block_size;
  const int64_t known = static_cast<int64_t>(tokens.size());
  const uint64_t root = hash_salt(salt);
  const int64_t max_hit_tokens = std::min(num_tokens, known) - 1;
  std::vector<BlockId> hits = find_cached_prefix(tokens, root, max_hit_tokens / bs);

  const int64_t total_blocks = ceil_div(num_tokens, bs);
  const int64_t new_blocks = total_blocks - static_cast<int64_t>(hits.size());
  // Reviving an evictable hit takes it out of the free pool as well.
  int64_t revived = 0;
  for (BlockId b : hits) revived += blocks_[static_cast<size_t>(b)].ref_count == 0 ? 1 : 0;
  if (new_blocks + revived > num_free_blocks()) return std::nullopt;

  Sequence s;
  s.root_hash = root;
  s.num_slots = num_tokens;
  s.num_computed = static_cast<int64_t>(hits.size()) * bs;
  s.table.reserve(static_cast<size_t>(total_blocks));
  uint64_t parent = root;
  for (BlockId b : hits) {
    acquire(b);
    s.table.push_back(b);
    parent = blocks_[static_cast<size_t>(b)].hash;
    s.block_hashes.push_back(parent);
  }
  for (int64_t i = 0; i < new_blocks; ++i) s.table.push_back(take_free_block());
  if (options_.enable_prefix_caching) {
    stats_.queries += known;
    stats_.hits += s.num_computed;
  }
  const int64_t computed = s.num_computed;
  sequences_.emplace(seq, std::move(s));
  return computed;
}

int64_t BlockManager::blocks_needed_to_append(SequenceId seq, int64_t num_tokens) const {
  const Sequence& s = sequence(seq, "blocks_needed_to_append");
  TESSERA_CHECK(num_tokens >= 0, InvalidArgument,
                "BlockManager::blocks_needed_to_append: sequence ", seq,
                ": num_tokens must be non-negative, got ", num_tokens);
  if (num_tokens == 0) return 0;
  const int64_t bs = options_.block_size;
  int64_t needed = ceil_div(s.num_slots + num_tokens, bs) - static_cast<int64_t>(s.table.size());
  if (s.num_slots % bs != 0 && blocks_[static_cast<size_t>(s.table.back())].ref_count > 1) {
    ++needed;  // the shared, partially filled last block is copied
  }
  return needed;
}

bool BlockManager::append_slots(SequenceId seq, int64_t num_tokens,
                                std::vector<BlockCopy>* copies) {
  TESSERA_CHECK(copies != nullptr, InvalidArgument, "BlockManager::append_slots: sequence ", seq,
                ": copies must not be null");
  const int64_t needed = blocks_needed_to_append(seq, num_tokens);
  if (num_tokens == 0) return true;
  if (needed > num_free_blocks()) return false;
  Sequence& s = sequence(seq, "append_slots");
  const int64_t bs = options_.block_size;
  if (s.num_slots % bs != 0) {
    BlockId& last = s.table.back();
    if (blocks_[static_cast<size_t>(last)].ref_count > 1) {
      const BlockId fresh = take_free_block();
      copies->push_back({last, fresh});
      release(last);
      last = fresh;
    }
  }
  s.num_slots += num_tokens;
  while (static_cast<int64_t>(s.table.size()) < ceil_div(s.num_slots, bs)) {
    s.table.push_back(take_free_block());
  }
  return true;
}

void BlockManager::mark_computed(SequenceId seq, const std::vector<int64_t>& tokens,
                                 int64_t num_computed_tokens) {
  Sequence& s = sequence(seq, "mark_computed");
  TESSERA_CHECK(num_computed_tokens >= s.num_computed, InvalidArgument,
                "BlockManager::mark_computed: sequence ", seq, ": computed tokens cannot go from ",
                s.num_computed, " down to ", num_computed_tokens);
  TESSERA_CHECK(num_computed_tokens <= s.num_slots, InvalidArgument,
                "BlockManager::mark_computed: sequence ", seq, ": ", num_computed_tokens,
                " computed tokens, but only ", s.num_slots, " slots are reserved");
  TESSERA_CHECK(num_computed_tokens <= static_cast<int64_t>(tokens.size()), InvalidArgument,
                "BlockManager::mark_computed: sequence ", seq, ": ", num_computed_tokens,
                " computed tokens, but only ", tokens.size(), " tokens given");
  s.num_computed = num_computed_tokens;
  if (!options_.enable_prefix_caching) return;
  const int64_t bs = options_.block_size;
  const int64_t full = num_computed_tokens / bs;
  for (int64_t i = static_cast<int64_t>(s.block_hashes.size()); i < full; ++i) {
    const uint64_t parent = i == 0 ? s.root_hash : s.block_hashes[static_cast<size_t>(i - 1)];
    const int64_t* begin = tokens.data() + i * bs;
    const uint64_t h = hash_token_block(parent, begin, bs);
    s.block_hashes.push_back(h);
    const BlockId id = s.table[static_cast<size_t>(i)];
    Block& block = blocks_[static_cast<size_t>(id)];
    // A block from a cache hit is registered already. If an identical block
    // is registered (two sequences computed the same prefix at once), this
    // one stays unregistered: one block per hash keeps eviction simple.
    if (block.cached || cached_.count(h) != 0) continue;
    block.cached = true;
    block.hash = h;
    block.parent_hash = parent;
    block.tokens.assign(begin, begin + bs);
    cached_.emplace(h, id);
  }
}

void BlockManager::fork_sequence(SequenceId parent, SequenceId child) {
  TESSERA_CHECK(parent != child, InvalidArgument, "BlockManager::fork: sequence ", parent,
                " cannot be forked into itself");
  const Sequence& p = sequence(parent, "fork");
  TESSERA_CHECK(sequences_.count(child) == 0, FailedPrecondition,
                "BlockManager::fork: child sequence ", child, " already has a block table");
  TESSERA_CHECK(p.num_computed == p.num_slots, FailedPrecondition, "BlockManager::fork: sequence ",
                parent, " has ", p.num_slots - p.num_computed,
                " reserved slots that are not computed yet; fork after the step that fills them");
  Sequence c = p;
  for (BlockId b : c.table) acquire(b);
  sequences_.emplace(child, std::move(c));
}

void BlockManager::free(SequenceId seq) {
  Sequence& s = sequence(seq, "free");
  for (auto it = s.table.rbegin(); it != s.table.rend(); ++it) release(*it);
  sequences_.erase(seq);
}

bool BlockManager::has_sequence(SequenceId seq) const { return sequences_.count(seq) != 0; }

const std::vector<BlockId>& BlockManager::block_table(SequenceId seq) const {
  return sequence(seq, "block_table").table;
}

int64_t BlockManager::num_slots(SequenceId seq) const {
  return sequence(seq, "num_slots").num_slots;
}

int64_t BlockManager::num_computed_tokens(SequenceId seq) const {
  return sequence(seq, "num_computed_tokens").num_computed;
}

std::vector<SequenceId> BlockManager::sequences() const {
  std::vector<SequenceId> ids;
  ids.reserve(sequences_.size());
  for (const auto& [id, s] : sequences_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int64_t BlockManager::num_free_blocks() const {
  return static_cast<int64_t>(never_cached_free_.size() + evictable_.size());
}

int64_t BlockManager::num_evictable_blocks() const {
  return static_cast<int64_t>(evictable_.size());
}

double BlockManager::usage() const {
  return 1.0 - static_cast<double>(num_free_blocks()) / static_cast<double>(options_.num_blocks);
}

bool BlockManager::can_allocate(int64_t num_new_blocks) const {
  return num_new_blocks <= num_free_blocks();
}

int64_t BlockManager::ref_count(BlockId block) const {
  check_block(block);
  return blocks_[static_cast<size_t>(block)].ref_count;
}

bool BlockManager::is_cached(BlockId block) const {
  check_block(block);
  return blocks_[static_cast<size_t>(block)].cached;
}

BlockId BlockManager::take_free_block() {
  BlockId id;
  if (!never_cached_free_.empty()) {
    id = never_cached_free_.back();
    never_cached_free_.pop_back();
  } else {
    TESSERA_CHECK(!evictable_.empty(), Internal, "BlockManager: no free block left to take");
    id = evictable_.front();
    evictable_.pop_front();
    Block& block = blocks_[static_cast<size_t>(id)];
    block.evictable = false;
    uncache(id);
  }
  blocks_[static_cast<size_t>(id)].ref_count = 1;
  return id;
}

void BlockManager::acquire(BlockId id) {
  Block& block = blocks_[static_cast<size_t>(id)];
  if (block.evictable) {
    evictable_.erase(block.lru_position);
    block.evictable = false;
  }
  ++block.ref_count;
}

void BlockManager::release(BlockId id) {
  Block& block = blocks_[static_cast<size_t>(id)];
  TESSERA_CHECK(block.ref_count > 0, Internal, "BlockManager: block ", id,
                " released with reference count 0");
  if (--block.ref_count > 0) return;
  if (block.cached) {
    block.lru_position = evictable_.insert(evictable_.end(), id);
    block.evictable = true;
  } else {
    never_cached_free_.push_back(id);
  }
}

void BlockManager::uncache(BlockId id) {
  Block& block = blocks_[static_cast<size_t>(id)];
  if (!block.cached) return;
  cached_.erase(block.hash);
  block.cached = false;
  block.hash = 0;
  block.parent_hash = 0;
  block.tokens.clear();
}

void BlockManager::check_consistency() const {
  const int64_t bs = options_.block_size;
  std::vector<int64_t> holders(blocks_.size(), 0);
  for (const auto& [id, s] : sequences_) {
    TESSERA_CHECK(static_cast<int64_t>(s.table.size()) == ceil_div(s.num_slots, bs), Internal,
                  "sequence ", id, " has ", s.table.size(), " blocks for ", s.num_slots, " slots");
    TESSERA_CHECK(s.num_computed >= 0 && s.num_computed <= s.num_slots, Internal, "sequence ", id,
                  " has ", s.num_computed, " computed tokens for ", s.num_slots, " slots");
    TESSERA_CHECK(static_cast<int64_t>(s.block_hashes.size()) <= s.num_computed / bs, Internal,
                  "sequence ", id, " has hashes for ", s.block_hashes.size(), " blocks but only ",
                  s.num_computed, " computed tokens");
    std::vector<BlockId> sorted = s.table;
    std::sort(sorted.begin(), sorted.end());
    TESSERA_CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(), Internal,
                  "sequence ", id, " holds a block twice");
    for (BlockId b : s.table) {
      TESSERA_CHECK(b >= 0 && b < options_.num_blocks, Internal, "sequence ", id,
                    " holds block id ", b, " outside the pool");
      ++holders[static_cast<size_t>(b)];
    }
  }
  std::vector<int> in_free(blocks_.size(), 0);
  for (BlockId b : never_cached_free_) ++in_free[static_cast<size_t>(b)];
  for (BlockId b : evictable_) ++in_free[static_cast<size_t>(b)];
  int64_t used = 0;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    const Block& block = blocks_[b];
    TESSERA_CHECK(block.ref_count == holders[b], Internal, "block ", b, " has reference count ",
                  block.ref_count, " but ", holders[b], " tables hold it");
    TESSERA_CHECK((block.ref_count == 0) == (in_free[b] == 1) && in_free[b] <= 1, Internal,
                  "block ", b, " with reference count ", block.ref_count, " appears ", in_free[b],
                  " times in the free lists");
    TESSERA_CHECK(block.evictable == (block.ref_count == 0 && block.cached), Internal, "block ", b,
                  " is ", block.evictable ? "" : "not ", "evictable with reference count ",
                  block.ref_count, (block.cached ? " and a registered hash" : " and no hash"));
    if (block.cached) {
      auto it = cached_.find(block.hash);
      TESSERA_CHECK(it != cached_.end() && it->second == static_cast<BlockId>(b), Internal,
                    "block ", b, " is marked cached but the hash map does not point to it");
      TESSERA_CHECK(static_cast<int64_t>(block.tokens.size()) == bs, Internal, "cached block ", b,
                    " stores ", block.tokens.size(), " token ids");
    }
    if (block.ref_count > 0) ++used;
  }
  for (const auto& [h, b] : cached_) {
    TESSERA_CHECK(
        blocks_[static_cast<size_t>(b)].cached && blocks_[static_cast<size_t>(b)].hash == h,
        Internal, "hash map entry points to block ", b, " which does not carry it");
  }
  TESSERA_CHECK(used + num_free_blocks() == options_.num_blocks, Internal, used, " used + ",
                num_free_blocks(), " free blocks != ", options_.num_blocks, " total");
}

}  // namespace tessera::serve
