// Save planning, asynchronous save with a collective commit, and box-wise
// parallel loading. The format is described in docs/ckpt.md.
#include "tessera/ckpt/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <future>
#include <iomanip>
#include <mutex>
#include <random>
#include <sstream>

#include "crc32c.h"
#include "host_memory.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/core/tensor.h"
#include "tessera/core/thread_pool.h"

namespace tessera::ckpt {

using dist::Box;
using detail::crc32c;
using detail::BounceSlots;
using detail::HugeBuffer;
using detail::stream_copy;

// ---------------------------------------------------------------------------
// State

void State::add(const std::string& name, at::Tensor local, dist::Layout layout,
                std::map<std::string, std::string> attrs) {
  TESSERA_CHECK(!name.empty(), InvalidArgument, "checkpoint state: empty tensor name");
  TESSERA_CHECK(local.defined(), InvalidArgument, "checkpoint state: tensor '", name,
                "' is undefined; pass an empty tensor of the right dtype when this rank holds "
                "nothing");
  bool added =
      entries.emplace(name, Entry{std::move(local), std::move(layout), std::move(attrs)}).second;
  TESSERA_CHECK(added, InvalidArgument, "checkpoint state: tensor '", name, "' added twice");
}

void State::add_replicated(const std::string& name, at::Tensor tensor, int world_size) {
  auto shape = tensor.sizes().vec();
  add(name, std::move(tensor), dist::Layout::replicated(shape, world_size));
}

namespace {

// Waits for every task (none may outlive the buffers they use), then
// rethrows the first failure.
void wait_all(std::vector<std::future<void>>& tasks) {
  std::exception_ptr first_error;
  for (auto& f : tasks) {
    try {
      f.get();
    } catch (...) {
      if (!first_error) first_error = std::current_exception();
    }
  }
  if (first_error) std::rethrow_exception(first_error);
}

constexpr double kProgressSeconds = 10.0;
constexpr uint64_t kBounceChunkBytes = uint64_t{1} << 20;
// A load's direct reads: a few checksum blocks per read.
constexpr uint64_t kLoadPieceBytes = uint64_t{4} << 20;
// Where copies for writing are placed relative to their file offset: the
// largest direct-I/O alignment a Storage reports (4 KiB for local files).
constexpr uint64_t kDirectAlign = 4096;

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// Writes [off, off + n) of `out` from `data`. When `data` sits at an
// address congruent to `off` modulo the file's direct-I/O alignment, the
// aligned middle goes as one direct write and the unaligned ends (at most
// one alignment unit each) through the page cache.
void write_range(WritableFile& out, uint64_t off, const uint8_t* data, uint64_t n) {
  const uint64_t align = out.direct_alignment();
  if (align == 0 || (reinterpret_cast<uintptr_t>(data) - off) % align != 0) {
    out.write_at(off, data, n);
    return;
  }
  const uint64_t a = round_up(off, align), b = (off + n) / align * align;
  if (b <= a) {
    out.write_at(off, data, n);
    return;
  }
  if (a > off) out.write_at(off, data, a - off);
  out.write_at(a, data + (a - off), b - a);
  if (off + n > b) out.write_at(b, data + (b - off), off + n - b);
}

std::string mib(uint64_t bytes) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << static_cast<double>(bytes) / (1 << 20) << " MiB";
  return out.str();
}

std::string rank_file_name(int rank) {
  std::ostringstream out;
  out << "rank_" << std::setw(5) << std::setfill('0') << rank << ".bin";
  return out.str();
}

std::string parent_of(const std::string& dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  auto slash = d.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : d.substr(0, slash);
}

std::string strip_slash(std::string d) {
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}

std::string join_ranks(const std::vector<int>& ranks) {
  std::ostringstream out;
  for (size_t i = 0; i < ranks.size(); ++i) out << (i ? ", " : "") << ranks[i];
  return out.str();
}

int rank_of(const std::shared_ptr<dist::ProcessGroup>& g) { return g ? g->rank() : 0; }
int size_of(const std::shared_ptr<dist::ProcessGroup>& g) { return g ? g->size() : 1; }

// Every rank's `mine` (same length everywhere), concatenated in rank order.
std::vector<int64_t> all_gather_ints(const std::shared_ptr<dist::ProcessGroup>& g,
                                     const std::vector<int64_t>& mine) {
  if (!g || g->size() == 1) return mine;
  at::Tensor in = at::from_blob(const_cast<int64_t*>(mine.data()),
                                {static_cast<int64_t>(mine.size())}, at::kLong)
                      .clone();
  at::Tensor out = at::empty({static_cast<int64_t>(mine.size()) * g->size()}, at::kLong);
  g->all_gather(out, in).wait();
  return std::vector<int64_t>(out.data_ptr<int64_t>(), out.data_ptr<int64_t>() + out.numel());
}

int64_t broadcast_int(const std::shared_ptr<dist::ProcessGroup>& g, int64_t value) {
  if (!g || g->size() == 1) return value;
  at::Tensor t = at::full({1}, value, at::kLong);
  g->broadcast(t, 0).wait();
  return t.item<int64_t>();
}

// FNV-1a over 64-bit words: a fingerprint of what every rank is about to
// save, compared across ranks before anything is written.
struct Fingerprint {
  uint64_t h = 1469598103934665603ull;
  void add(uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xFF;
      h *= 1099511628211ull;
    }
  }
  void add(const std::string& s) {
    add(s.size());
    for (unsigned char c : s) {
      h ^= c;
      h *= 1099511628211ull;
    }
  }
};

// ---------------------------------------------------------------------------
// Save plan: which rank writes which distinct box where. A pure function of
// the layouts, so every rank computes the same plan without talking.

struct PlanBox {
  int entry = 0;  // index into SavePlan::names
  Box box;
  std::vector<int> ranks;  // holders
  int writer = 0;
  int64_t writer_local_offset = 0;  // element offset in the writer's local tensor
  uint64_t bytes = 0;
  uint64_t byte_offset = 0;  // in the writer's file
  int first_block = 0;       // index into the writer's checksum list
  int num_blocks = 0;
};

struct SavePlan {
  std::vector<std::string> names;
  std::vector<at::ScalarType> dtypes;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<PlanBox> boxes;        // in (writer, entry, box) order: file order
  std::vector<uint64_t> file_bytes;  // tensor bytes per rank's file
  std::vector<int> blocks;           // checksum blocks per rank
  int max_blocks = 0;
};

int64_t blocks_of(uint64_t bytes, uint64_t block) {
  return static_cast<int64_t>((bytes + block - 1) / block);
}

std::shared_ptr<const SavePlan> build_plan(const State& state, int world, uint64_t block) {
  auto plan = std::make_shared<SavePlan>();
  struct Candidate {
    int entry;
    Box box;
    std::vector<std::pair<int, int64_t>> holders;  // (rank, local offset), rank order
    uint64_t bytes;
  };
  std::vector<Candidate> cands;
  int e = 0;
  for (const auto& [name, entry] : state.entries) {
    const dist::Layout& layout = entry.layout;
    TESSERA_CHECK(layout.covers_exactly(), InvalidArgument, "checkpoint save: tensor '", name,
                  "': its layout does not tile the tensor (some element has no holder or two "
                  "holders' boxes partially overlap): ",
                  layout.to_string());
    plan->names.push_back(name);
    plan->dtypes.push_back(entry.local.scalar_type());
    plan->shapes.push_back(layout.global_shape());
    const uint64_t es = dtype_size(entry.local.scalar_type());
    std::map<Box, std::vector<std::pair<int, int64_t>>> distinct;
    for (int r = 0; r < world; ++r) {
      for (const auto& c : layout.chunks(r)) {
        if (c.box.numel() > 0) distinct[c.box].emplace_back(r, c.local_offset);
      }
    }
    for (auto& [box, holders] : distinct) {
      cands.push_back({e, box, std::move(holders), static_cast<uint64_t>(box.numel()) * es});
    }
    ++e;
  }
  // Largest first, each to the holder with the fewest bytes so far (ties:
  // the lowest rank): replicated boxes are written once, spread evenly.
  std::stable_sort(cands.begin(), cands.end(), [](const Candidate& a, const Candidate& b) {
    if (a.bytes != b.bytes) return a.bytes > b.bytes;
    if (a.entry != b.entry) return a.entry < b.entry;
    return a.box < b.box;
  });
  std::vector<uint64_t> load(world, 0);
  for (auto& c : cands) {
    size_t best = 0;
    for (size_t i = 1; i < c.holders.size(); ++i) {
      if (load[c.holders[i].first] < load[c.holders[best].first]) best = i;
    }
    PlanBox pb;
    pb.entry = c.entry;
    pb.box = c.box;
    for (const auto& h : c.holders) pb.ranks.push_back(h.first);
    pb.writer = c.holders[best].first;
    pb.writer_local_offset = c.holders[best].second;
    pb.bytes = c.bytes;
    load[pb.writer] += c.bytes;
    plan->boxes.push_back(std::move(pb));
  }
  std::sort(plan->boxes.begin(), plan->boxes.end(), [](const PlanBox& a, const PlanBox& b) {
    if (a.writer != b.writer) return a.writer < b.writer;
    if (a.entry != b.entry) return a.entry < b.entry;
    return a.box < b.box;
  });
  plan->file_bytes.assign(world, 0);
  plan->blocks.assign(world, 0);
  for (auto& pb : plan->boxes) {
    pb.byte_offset = plan->file_bytes[pb.writer];
    pb.first_block = plan->blocks[pb.writer];
    pb.num_blocks = static_cast<int>(blocks_of(pb.bytes, block));
    plan->file_bytes[pb.writer] += pb.bytes;
    plan->blocks[pb.writer] += pb.num_blocks;
  }
  plan->max_blocks = *std::max_element(plan->blocks.begin(), plan->blocks.end());
  return plan;
}

// Validates this rank's entries and fingerprints every rank's layouts.
uint64_t fingerprint_state(const State& state, int rank, int world, uint64_t block) {
  Fingerprint f;
  f.add(static_cast<uint64_t>(world));
  f.add(block);
  for (const auto& [name, entry] : state.entries) {
    const dist::Layout& l = entry.layout;
    TESSERA_CHECK(entry.local.defined(), InvalidArgument, "checkpoint: tensor '", name,
                  "' on rank ", rank, " is undefined");
    TESSERA_CHECK(l.world_size() == world, InvalidArgument, "checkpoint: tensor '", name,
                  "' has a layout over ", l.world_size(), " ranks but the group has ", world,
                  " (rank ", rank, ")");
    TESSERA_CHECK(entry.local.numel() == l.local_numel(rank), InvalidArgument,
                  "checkpoint: tensor '", name, "' on rank ", rank, " has ", entry.local.numel(),
                  " elements but its layout gives this rank ", l.local_numel(rank));
    f.add(name);
    f.add(dtype_name(entry.local.scalar_type()));
    f.add(static_cast<uint64_t>(l.is_flat()));
    for (int64_t s : l.global_shape()) f.add(static_cast<uint64_t>(s));
    for (int r = 0; r < world; ++r) {
      f.add(0xC0FFEEull + static_cast<uint64_t>(r));
      for (const auto& c : l.chunks(r)) {
        for (int64_t v : c.box.offset) f.add(static_cast<uint64_t>(v));
        for (int64_t v : c.box.length) f.add(static_cast<uint64_t>(v));
        f.add(static_cast<uint64_t>(c.local_offset));
      }
    }
  }
  return f.h;
}

// RNG states: [u32 count] then per entry [u32 name length][name][u64 size][bytes].
std::string encode_blob(const std::map<std::string, std::string>& rng) {
  std::string out;
  auto put = [&out](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  uint32_t count = static_cast<uint32_t>(rng.size());
  put(&count, 4);
  for (const auto& [name, bytes] : rng) {
    uint32_t n = static_cast<uint32_t>(name.size());
    uint64_t b = bytes.size();
    put(&n, 4);
    put(name.data(), n);
    put(&b, 8);
    put(bytes.data(), bytes.size());
  }
  return out;
}

std::map<std::string, std::string> decode_blob(const std::string& blob, const std::string& where) {
  std::map<std::string, std::string> rng;
  size_t pos = 0;
  auto take = [&](void* p, size_t n) {
    TESSERA_CHECK(pos + n <= blob.size(), DataLoss, where, ": RNG state blob is truncated");
    std::memcpy(p, blob.data() + pos, n);
    pos += n;
  };
  uint32_t count = 0;
  take(&count, 4);
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t n = 0;
    take(&n, 4);
    std::string name(n, '\0');
    take(name.data(), n);
    uint64_t b = 0;
    take(&b, 8);
    TESSERA_CHECK(b <= blob.size() - pos, DataLoss, where, ": RNG state blob is truncated");
    std::string bytes(b, '\0');
    take(bytes.data(), b);
    rng.emplace(std::move(name), std::move(bytes));
  }
  return rng;
}

// Logs progress at most every kProgressSeconds; thread-safe.
class Progress {
 public:
  Progress(std::string what, uint64_t total) : what_(std::move(what)), total_(total) {}
  void add(uint64_t bytes) {
    uint64_t done = done_.fetch_add(bytes) + bytes;
    std::lock_guard<std::mutex> lock(mu_);
    if (last_.seconds() < kProgressSeconds) return;
    last_.reset();
    TESSERA_LOG(Info, "ckpt") << what_ << ": " << mib(done) << " of " << mib(total_) << " ("
                              << static_cast<int>(100.0 * done / std::max<uint64_t>(total_, 1))
                              << "%, " << mib(static_cast<uint64_t>(done / watch_.seconds()))
                              << "/s)";
  }
  uint64_t done() const { return done_.load(); }

 private:
  std::string what_;
  uint64_t total_;
  std::atomic<uint64_t> done_{0};
  Stopwatch watch_;
  std::mutex mu_;
  Stopwatch last_;  // guarded by mu_
};

}  // namespace

// ---------------------------------------------------------------------------
// Staging buffers: at most two (ping-pong), reused across saves.

struct Staging {
  at::Tensor pinned;  // kByte, capacity: page-locked, for device tensors
  HugeBuffer host;    // capacity: huge pages, for host tensors
  bool in_use = false;

  uint64_t capacity(bool want_pinned) const {
    return want_pinned ? static_cast<uint64_t>(pinned.defined() ? pinned.numel() : 0)
                       : host.size();
  }
};

// The pool of staging buffers. Shared by the Checkpointer and its handles
// (a handle may copy into a buffer after the Checkpointer is gone).
struct StagingPool {
  std::mutex mu;
  std::condition_variable freed;
  std::vector<std::unique_ptr<Staging>> staging;  // guarded by mu

  // A buffer of at least `bytes`; blocks while two are in use.
  std::shared_ptr<uint8_t> acquire(uint64_t bytes, bool pinned) {
    std::unique_lock<std::mutex> lock(mu);
    Staging* got = nullptr;
    freed.wait(lock, [&] {
      for (auto& s : staging) {
        if (!s->in_use) return true;
      }
      return staging.size() < 2;
    });
    for (auto& s : staging) {
      if (!s->in_use && (!got || s->capacity(pinned) > got->capacity(pinned))) got = s.get();
    }
    if (!got) {
      staging.push_back(std::make_unique<Staging>());
      got = staging.back().get();
    }
    bytes = std::max<uint64_t>(bytes, 1);
    uint8_t* ptr = nullptr;
    if (pinned) {
      if (got->capacity(true) < bytes) {
        got->pinned = at::Tensor();  // free the old one first
        got->pinned = at::empty({static_cast<int64_t>(bytes)},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      }
      ptr = got->pinned.data_ptr<uint8_t>();
    } else {
      if (got->capacity(false) < bytes) {
        got->host = HugeBuffer();  // free the old one first
        got->host = HugeBuffer(bytes);
      }
      ptr = got->host.data();
    }
    got->in_use = true;
    // Returned to the pool when the last user (the write phase) lets go;
    // every holder of a buffer also holds the pool.
    return std::shared_ptr<uint8_t>(ptr, [this, got](uint8_t*) {
      std::lock_guard<std::mutex> l(mu);
      got->in_use = false;
      freed.notify_all();
    });
  }
};

struct Checkpointer::Impl {
  std::shared_ptr<StagingPool> pool = std::make_shared<StagingPool>();
  std::map<uint64_t, std::shared_ptr<const SavePlan>> plans;  // used by the caller's thread only
  // The coordinator runs each save's write phase (and, with a control
  // group, its commit) in submission order. Declared last: destroyed first,
  // finishing queued saves while the members above still exist.
  ThreadPool coordinator{1};
};

// ---------------------------------------------------------------------------
// SaveHandle

struct SaveHandle::Impl {
  std::string dir, tmp_dir, file;
  int rank = 0, world = 1;
  std::shared_ptr<dist::ProcessGroup> group;
  SaveOptions options;
  std::shared_ptr<Storage> storage;
  std::shared_ptr<const SavePlan> plan;
  uint64_t nonce = 0;
  // What rank 0 writes into the metadata (copied at save_async).
  int64_t step = 0, data_position = 0;
  std::map<std::string, std::string> user;
  std::vector<std::map<std::string, std::string>> attrs;  // per plan entry

  // What the data file holds, in file order: each segment's bytes are at
  // `data` (the staging buffer, or a tensor's memory in a synchronous save).
  struct Segment {
    uint64_t offset = 0, bytes = 0;
    const uint8_t* data = nullptr;
  };
  std::vector<Segment> segments;
  std::shared_ptr<uint8_t> staging;  // released when written; null if direct
  std::vector<at::Tensor> sources;   // keeps direct segments' tensors alive
  std::string rng_blob;              // direct saves write the blob from here
  uint64_t rng_bytes = 0;

  // Writing from the tensors (a synchronous save, or SaveOptions::defer_copy
  // of CPU tensors): each write task copies its chunk out of the tensors'
  // memory into a bounce buffer placed for direct I/O and writes from
  // there. With defer_copy, release_tensors() copies the chunks no task has
  // started into a staging buffer; tasks for those chunks then read there.
  enum class Chunk : uint8_t {
    kPending,  // not started; reads the tensors when it starts
    kReading,  // a task is reading the tensors
    kCopying,  // release_tensors() is copying it to staging; tasks wait
    kStaged,   // in staging at staged_at[k]
    kLost,     // release_tensors() failed before copying it
    kDone,
  };
  struct ChunkRange {
    uint64_t begin = 0, end = 0;  // file offsets
    size_t first_block = 0, last_block = 0;  // blocks starting in [begin, end)
  };
  bool from_tensors = false;
  std::shared_ptr<StagingPool> pool;  // where release_tensors() gets a buffer
  // Set in save_async (plan_chunks), read-only afterwards.
  std::vector<std::pair<uint64_t, uint64_t>> blocks;  // (file offset, length) in file order
  std::vector<ChunkRange> chunk_ranges;
  std::mutex chunk_mu;
  std::condition_variable chunk_cv;
  std::vector<Chunk> chunks;                 // guarded by chunk_mu
  std::vector<const uint8_t*> staged_at;     // guarded by chunk_mu
  std::shared_ptr<uint8_t> released_staging;  // guarded by chunk_mu
  bool write_done = false;                    // guarded by chunk_mu
  bool released = false;                      // caller's thread only

  // The segment holding file offset `off`, and the byte there.
  const Segment& segment_at(uint64_t off) const {
    auto it = std::upper_bound(segments.begin(), segments.end(), off,
                               [](uint64_t o, const Segment& g) { return o < g.offset; });
    return *std::prev(it);
  }
  const uint8_t* byte_at(uint64_t off) const {
    const Segment& g = segment_at(off);
    return g.data + (off - g.offset);
  }

  // Written by the write phase, read after io completes.
  bool io_ok = false;
  std::exception_ptr io_error;
  std::vector<uint32_t> crcs;  // this rank's blocks, in file order
  uint32_t rng_crc = 0;

  std::shared_future<void> io;  // write phase (+ commit with a control group)
  std::mutex mu;
  bool finished = false;            // guarded by mu
  std::exception_ptr outcome;       // guarded by mu
  SaveStats stats;                  // guarded by mu after save_async returns
  Stopwatch total;

  void phase(SavePhase p) {
    if (options.on_phase) options.on_phase(p);
  }
  // Lists this rank's checksum blocks and splits the file into the write
  // tasks' chunks of write_bytes (from the tensors: about 1 MiB, ending on
  // block boundaries, so a block is checksummed from the same bytes that
  // are written).
  void plan_chunks();
  // Called by chunk k's task before it reads: false if its bytes were lost
  // (release_tensors() failed); otherwise `staged` is where the chunk's
  // bytes start in a staging buffer, or null to read the segments (then,
  // when writing from the tensors, the task copies them out and calls
  // finish_chunk).
  // Waits while release_tensors() copies the chunk.
  bool start_chunk(size_t k, const uint8_t*& staged);
  // Chunk k no longer reads the tensors.
  void finish_chunk(size_t k);
  // Copies [begin, end) of the file's bytes from the segments to `dst`.
  void copy_out(uint64_t begin, uint64_t end, uint8_t* dst) const;
  void release_tensors();
  // The write phase no longer reads the tensors or staging buffers.
  void end_reads();
  void write_phase();
  void commit(const std::shared_ptr<dist::ProcessGroup>& g);
  void commit_rank0(const std::vector<int64_t>& gathered, int64_t per_rank);
};

void SaveHandle::Impl::plan_chunks() {
  const uint64_t total = plan->file_bytes[rank] + rng_bytes;
  const uint64_t block = options.checksum_block;
  // This rank's checksum blocks in file order: (file offset, length).
  blocks.clear();
  for (const auto& pb : plan->boxes) {
    if (pb.writer != rank) continue;
    for (uint64_t b = 0; b < pb.bytes; b += block) {
      blocks.emplace_back(pb.byte_offset + b, std::min(block, pb.bytes - b));
    }
  }
  chunk_ranges.clear();
  // release_tensors() waits for the chunks being copied from the tensors,
  // and each task holds a bounce buffer of a chunk, so these chunks are
  // small.
  const uint64_t chunk_bytes =
      from_tensors ? std::min(options.write_bytes, kBounceChunkBytes) : options.write_bytes;
  const uint64_t step_bytes = std::max(chunk_bytes, block);
  size_t next_block = 0;
  for (uint64_t begin = 0; begin < total;) {
    ChunkRange c;
    c.begin = begin;
    c.end = std::min(total, begin + step_bytes);
    c.first_block = next_block;
    while (next_block < blocks.size() && blocks[next_block].first < c.end) ++next_block;
    c.last_block = next_block;
    // A chunk copied out of the tensors is checksummed from its copy, so
    // it must hold its blocks whole; a staged chunk's blocks may run on
    // into the next chunk (the bytes are in one stable place), and its
    // chunks stay aligned.
    if (from_tensors && c.last_block > c.first_block) {
      const auto& last = blocks[c.last_block - 1];
      c.end = std::max(c.end, last.first + last.second);
    }
    chunk_ranges.push_back(c);
    begin = c.end;
  }
  std::lock_guard<std::mutex> lock(chunk_mu);
  chunks.assign(chunk_ranges.size(), Chunk::kPending);
  staged_at.assign(chunk_ranges.size(), nullptr);
}

bool SaveHandle::Impl::start_chunk(size_t k, const uint8_t*& staged) {
  staged = nullptr;
  if (!from_tensors) return true;
  std::unique_lock<std::mutex> lock(chunk_mu);
  chunk_cv.wait(lock, [&] { return chunks[k] != Chunk::kCopying; });
  if (chunks[k] == Chunk::kPending) {
    chunks[k] = Chunk::kReading;
    return true;
  }
  staged = staged_at[k];
  return chunks[k] == Chunk::kStaged;
}

void SaveHandle::Impl::finish_chunk(size_t k) {
  if (!from_tensors) return;
  std::lock_guard<std::mutex> lock(chunk_mu);
  chunks[k] = Chunk::kDone;
  chunk_cv.notify_all();
}

void SaveHandle::Impl::release_tensors() {
  if (!from_tensors || !options.defer_copy || released) return;
  released = true;
  Stopwatch watch;
  std::vector<size_t> to_copy;
  uint64_t bytes = 0;
  {
    std::unique_lock<std::mutex> lock(chunk_mu);
    if (write_done) return;
    for (size_t k = 0; k < chunks.size(); ++k) {
      if (chunks[k] != Chunk::kPending) continue;
      chunks[k] = Chunk::kCopying;
      to_copy.push_back(k);
      bytes += chunk_ranges[k].end - chunk_ranges[k].begin;
    }
    // Tasks already reading the tensors finish first.
    chunk_cv.wait(lock, [&] {
      return std::none_of(chunks.begin(), chunks.end(),
                          [](Chunk c) { return c == Chunk::kReading; });
    });
  }
  // Each chunk lands at an address congruent to its file offset modulo the
  // direct-I/O alignment, so that its aligned middle can bypass the page
  // cache.
  std::vector<uint64_t> place(to_copy.size());
  uint64_t cursor = 0;
  for (size_t i = 0; i < to_copy.size(); ++i) {
    const ChunkRange& c = chunk_ranges[to_copy[i]];
    place[i] = round_up(cursor, kDirectAlign) + c.begin % kDirectAlign;
    cursor = place[i] + (c.end - c.begin);
  }
  std::exception_ptr error;
  std::vector<const uint8_t*> where(to_copy.size(), nullptr);
  std::shared_ptr<uint8_t> buffer;
  if (!to_copy.empty()) {
    try {
      buffer = pool->acquire(cursor, /*pinned=*/false);
      for (size_t i = 0; i < to_copy.size(); ++i) {
        const ChunkRange& c = chunk_ranges[to_copy[i]];
        copy_out(c.begin, c.end, buffer.get() + place[i]);
        where[i] = buffer.get() + place[i];
      }
    } catch (...) {
      error = std::current_exception();
    }
  }
  {
    std::lock_guard<std::mutex> lock(chunk_mu);
    for (size_t i = 0; i < to_copy.size(); ++i) {
      chunks[to_copy[i]] = error ? Chunk::kLost : Chunk::kStaged;
      staged_at[to_copy[i]] = where[i];
    }
    // Held until the write phase ends (it may have failed already).
    if (!write_done) released_staging = std::move(buffer);
    chunk_cv.notify_all();
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    stats.blocked_seconds += watch.seconds();
    if (!error) stats.bytes_copied += bytes;
  }
  if (error) std::rethrow_exception(error);
}

void SaveHandle::Impl::copy_out(uint64_t begin, uint64_t end, uint8_t* dst) const {
  // A range may span segments (the last tensor box and the RNG blob).
  for (uint64_t off = begin; off < end;) {
    const Segment& g = segment_at(off);
    const uint64_t n = std::min(end, g.offset + g.bytes) - off;
    stream_copy(dst + (off - begin), g.data + (off - g.offset), n);
    off += n;
  }
}

void SaveHandle::Impl::end_reads() {
  staging.reset();
  sources.clear();
  std::lock_guard<std::mutex> lock(chunk_mu);
  released_staging.reset();
  write_done = true;
}

void SaveHandle::Impl::write_phase() {
  Stopwatch watch;
  try {
    storage->create_dirs(tmp_dir);
    auto out = storage->create(tmp_dir + "/" + file);
    const uint64_t tensor_bytes = plan->file_bytes[rank];
    const uint64_t total = tensor_bytes + rng_bytes;
    out->reserve(total);
    crcs.assign(blocks.size(), 0);
    Progress progress("saving " + dir, total);
    const size_t threads = std::max<size_t>(1, options.io_threads);
    // Tasks writing from the tensors copy their chunk into a bounce slot
    // of their own, placed for direct I/O, then write from it.
    uint64_t slot_bytes = 0;
    for (const ChunkRange& c : chunk_ranges) slot_bytes = std::max(slot_bytes, c.end - c.begin);
    slot_bytes = round_up(slot_bytes, kDirectAlign) + kDirectAlign;
    BounceSlots bounce = from_tensors ? BounceSlots(threads, slot_bytes) : BounceSlots();
    {
      ThreadPool pool(threads);
      std::vector<std::future<void>> done;
      for (size_t k = 0; k < chunk_ranges.size(); ++k) {
        done.push_back(pool.submit([&, k] {
          const ChunkRange& c = chunk_ranges[k];
          const uint8_t* staged = nullptr;
          if (!start_chunk(k, staged)) {
            finish_chunk(k);
            TESSERA_THROW(Aborted, "checkpoint '", dir, "': bytes ", c.begin, "..", c.end, " of ",
                          file, " were never copied to a staging buffer (release_tensors failed)");
          }
          BounceSlots::Slot slot;  // one per pool thread
          if (from_tensors && !staged) {
            slot = bounce.take();
            uint8_t* dst = slot.data() + c.begin % kDirectAlign;
            copy_out(c.begin, c.end, dst);
            finish_chunk(k);
            staged = dst;
          }
          try {
            if (staged) {
              // The chunk's bytes, contiguous, holding its blocks whole.
              for (size_t b = c.first_block; b < c.last_block; ++b) {
                crcs[b] = crc32c(staged + (blocks[b].first - c.begin), blocks[b].second);
              }
              write_range(*out, c.begin, staged, c.end - c.begin);
            } else {
              // A block may run past the chunk's end; never across a
              // segment (both follow boxes).
              for (size_t b = c.first_block; b < c.last_block; ++b) {
                crcs[b] = crc32c(byte_at(blocks[b].first), blocks[b].second);
              }
              for (uint64_t at = c.begin; at < c.end;) {
                const Segment& g = segment_at(at);
                const uint64_t n = std::min(c.end, g.offset + g.bytes) - at;
                write_range(*out, at, g.data + (at - g.offset), n);
                at += n;
              }
            }
          } catch (...) {
            finish_chunk(k);
            throw;
          }
          finish_chunk(k);
          progress.add(c.end - c.begin);
        }));
      }
      wait_all(done);
    }
    rng_crc = crc32c(byte_at(tensor_bytes), rng_bytes);
    end_reads();  // buffers back to the pool: the next save may stage now
    phase(SavePhase::kFileWritten);
    out->sync();
    out->close();
    phase(SavePhase::kFileSynced);
    io_ok = true;
  } catch (...) {
    io_error = std::current_exception();
    end_reads();
  }
  std::lock_guard<std::mutex> lock(mu);
  stats.write_seconds = watch.seconds();
  stats.bytes_written = io_ok ? plan->file_bytes[rank] + rng_bytes : 0;
}

void SaveHandle::Impl::commit_rank0(const std::vector<int64_t>& gathered, int64_t per_rank) {
  phase(SavePhase::kBeforeCommit);
  Metadata m;
  m.world_size = world;
  m.step = step;
  m.data_position = data_position;
  m.checksum_block = options.checksum_block;
  m.user = user;
  for (int r = 0; r < world; ++r) {
    const int64_t* row = gathered.data() + r * per_rank;
    const uint64_t rng_len = static_cast<uint64_t>(row[1]);
    m.files.push_back({rank_file_name(r), plan->file_bytes[r] + rng_len});
    m.rank_state.push_back({rank_file_name(r), plan->file_bytes[r], rng_len,
                            static_cast<uint32_t>(row[2])});
  }
  for (size_t e = 0; e < plan->names.size(); ++e) {
    TensorMeta tm;
    tm.dtype = dtype_name(plan->dtypes[e]);
    tm.shape = plan->shapes[e];
    tm.attrs = attrs[e];
    m.tensors.emplace(plan->names[e], std::move(tm));
  }
  for (const auto& pb : plan->boxes) {
    SavedBox sb;
    sb.box = pb.box;
    sb.ranks = pb.ranks;
    sb.file = rank_file_name(pb.writer);
    sb.byte_offset = pb.byte_offset;
    sb.byte_length = pb.bytes;
    const int64_t* row = gathered.data() + pb.writer * per_rank + 3;
    for (int k = 0; k < pb.num_blocks; ++k) {
      sb.crc32c.push_back(static_cast<uint32_t>(row[pb.first_block + k]));
    }
    m.tensors.at(plan->names[pb.entry]).boxes.push_back(std::move(sb));
  }
  const std::string text = m.to_json(1);
  auto meta = storage->create(tmp_dir + "/" + kMetadataFile);
  meta->write_at(0, text.data(), text.size());
  meta->sync();
  meta->close();
  storage->sync_dir(tmp_dir);
  std::string old;
  if (storage->exists(dir)) {
    TESSERA_CHECK(options.overwrite, FailedPrecondition, "checkpoint '", dir,
                  "' already exists (set SaveOptions::overwrite to replace it)");
    old = dir + ".old-" + std::to_string(nonce);
    storage->rename(dir, old);
  }
  storage->rename(tmp_dir, dir);
  storage->sync_dir(parent_of(dir));
  phase(SavePhase::kCommitted);
  if (!old.empty()) storage->remove_all(old);
  if (options.keep_last > 0) {
    try {
      apply_retention(parent_of(dir), options.keep_last, storage);
    } catch (const std::exception& e) {
      // The checkpoint is committed; a failed cleanup must not fail the save.
      TESSERA_LOG(Warn, "ckpt") << "retention in '" << parent_of(dir) << "' failed: " << e.what();
    }
  }
}

void SaveHandle::Impl::commit(const std::shared_ptr<dist::ProcessGroup>& g) {
  // One all_gather tells rank 0 who succeeded and every box's checksums:
  // [ok, rng bytes, rng crc, block crcs..., padding] per rank.
  const int64_t per_rank = 3 + plan->max_blocks;
  std::vector<int64_t> mine(per_rank, 0);
  mine[0] = io_ok ? 1 : 0;
  mine[1] = static_cast<int64_t>(rng_bytes);
  mine[2] = rng_crc;
  for (size_t k = 0; k < crcs.size(); ++k) mine[3 + k] = crcs[k];
  std::vector<int64_t> gathered = all_gather_ints(g, mine);
  std::vector<int> failed;
  for (int r = 0; r < world; ++r) {
    if (gathered[r * per_rank] != 1) failed.push_back(r);
  }
  // 0: committed; 1: some rank failed to write; 2: rank 0 failed to commit.
  int64_t result = failed.empty() ? 0 : 1;
  std::exception_ptr commit_error;
  if (rank == 0) {
    if (failed.empty()) {
      try {
        commit_rank0(gathered, per_rank);
      } catch (...) {
        commit_error = std::current_exception();
        result = 2;
      }
    }
    if (result != 0) {
      try {
        storage->remove_all(tmp_dir);
      } catch (const std::exception& e) {
        TESSERA_LOG(Warn, "ckpt") << "could not remove '" << tmp_dir << "': " << e.what();
      }
    }
  }
  result = broadcast_int(g, result);
  if (io_error) std::rethrow_exception(io_error);
  if (commit_error) std::rethrow_exception(commit_error);
  TESSERA_CHECK(result != 1, Aborted, "checkpoint '", dir, "' was not saved: rank(s) ",
                join_ranks(failed),
                " failed to write their data files (see their errors); earlier checkpoints are "
                "unchanged");
  TESSERA_CHECK(result != 2, Aborted, "checkpoint '", dir,
                "' was not saved: rank 0 failed to commit it (see its error); earlier "
                "checkpoints are unchanged");
  std::lock_guard<std::mutex> lock(mu);
  stats.total_seconds = total.seconds();
  if (rank == 0) {
    const bool slow = stats.total_seconds >= 1.0;
    if (log::enabled("ckpt", slow ? log::Level::kInfo : log::Level::kDebug)) {
      log::write("ckpt", slow ? log::Level::kInfo : log::Level::kDebug,
                 ::tessera::detail::concat("saved '", dir, "': ", plan->names.size(), " tensors, ",
                                mib(stats.bytes_total), " on ", world, " rank(s); blocked ",
                                stats.blocked_seconds, " s, total ", stats.total_seconds, " s"));
    }
  }
}

SaveHandle::SaveHandle() = default;
SaveHandle::SaveHandle(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
SaveHandle::SaveHandle(SaveHandle&&) noexcept = default;
SaveHandle& SaveHandle::operator=(SaveHandle&& other) noexcept {
  if (this != &other) {
    if (impl_ && impl_->io.valid()) impl_->io.wait();
    impl_ = std::move(other.impl_);
  }
  return *this;
}
SaveHandle::~SaveHandle() {
  if (impl_ && impl_->io.valid()) impl_->io.wait();
}

void SaveHandle::release_tensors() {
  if (impl_) impl_->release_tensors();
}

bool SaveHandle::io_done() const {
  return !impl_ || !impl_->io.valid() ||
         impl_->io.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
}

const std::string& SaveHandle::dir() const {
  static const std::string kNone;  // immutable
  return impl_ ? impl_->dir : kNone;
}

SaveStats SaveHandle::stats() const {
  if (!impl_) return {};
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

void SaveHandle::wait(std::chrono::milliseconds timeout) {
  TESSERA_CHECK(impl_ != nullptr, FailedPrecondition, "SaveHandle::wait on an empty handle");
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.finished) {
      if (s.outcome) std::rethrow_exception(s.outcome);
      return;
    }
  }
  if (timeout.count() > 0 && s.io.wait_for(timeout) != std::future_status::ready) {
    TESSERA_THROW(DeadlineExceeded, "checkpoint '", s.dir, "' (rank ", s.rank,
                  "): I/O not finished after ", timeout.count(), " ms");
  }
  std::exception_ptr outcome;
  try {
    s.io.get();  // with a control group, this also carries the commit's outcome
    if (!s.options.control_group) s.commit(s.group);
  } catch (...) {
    outcome = std::current_exception();
  }
  std::lock_guard<std::mutex> lock(s.mu);
  s.finished = true;
  s.outcome = outcome;
  if (outcome) std::rethrow_exception(outcome);
}

// ---------------------------------------------------------------------------
// Checkpointer: save

Checkpointer::Checkpointer() : impl_(std::make_unique<Impl>()) {}
Checkpointer::~Checkpointer() = default;

SaveHandle Checkpointer::save_async(const std::string& dir, const State& state,
                                    const std::shared_ptr<dist::ProcessGroup>& group,
                                    const SaveOptions& options) {
  return start_save(dir, state, group, options, /*direct=*/false);
}

SaveHandle Checkpointer::start_save(const std::string& dir_in, const State& state,
                                    const std::shared_ptr<dist::ProcessGroup>& group,
                                    const SaveOptions& options, bool direct) {
  Stopwatch blocked;
  auto s = std::make_shared<SaveHandle::Impl>();
  s->dir = strip_slash(dir_in);
  s->rank = rank_of(group);
  s->world = size_of(group);
  s->group = group;
  s->options = options;
  s->storage = options.storage ? options.storage : Storage::local();
  s->file = rank_file_name(s->rank);
  TESSERA_CHECK(!s->dir.empty(), InvalidArgument, "checkpoint save: empty directory name");
  TESSERA_CHECK(options.checksum_block > 0 && options.checksum_block % 8 == 0, InvalidArgument,
                "checkpoint save: checksum_block must be a positive multiple of 8, got ",
                options.checksum_block);
  if (options.control_group) {
    TESSERA_CHECK(options.control_group->size() == s->world &&
                      options.control_group->rank() == s->rank,
                  InvalidArgument, "checkpoint save: the control group (rank ",
                  options.control_group->rank(), " of ", options.control_group->size(),
                  ") must have the same ranks as the save group (rank ", s->rank, " of ", s->world,
                  ")");
  }

  // Validate locally, then agree: every rank learns whether all are
  // consistent before anything touches the disk.
  uint64_t fp = 0;
  std::exception_ptr local_error;
  try {
    fp = fingerprint_state(state, s->rank, s->world, options.checksum_block);
  } catch (...) {
    local_error = std::current_exception();
  }
  std::random_device rd;
  const uint64_t nonce = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  const bool exists = s->rank == 0 && s->storage->exists(s->dir);
  std::vector<int64_t> all = all_gather_ints(
      group, {local_error ? 0 : 1, static_cast<int64_t>(fp), static_cast<int64_t>(nonce >> 1),
              exists ? 1 : 0});
  if (local_error) std::rethrow_exception(local_error);
  for (int r = 0; r < s->world; ++r) {
    TESSERA_CHECK(all[4 * r] == 1, InvalidArgument, "checkpoint '", s->dir, "': rank ", r,
                  " rejected its state (see its error); nothing was written");
    TESSERA_CHECK(all[4 * r + 1] == all[1], InvalidArgument, "checkpoint '", s->dir, "': rank ",
                  r, "'s state differs from rank 0's (tensor names, dtypes or layouts)");
  }
  TESSERA_CHECK(all[3] == 0 || options.overwrite, FailedPrecondition, "checkpoint '", s->dir,
                "' already exists (set SaveOptions::overwrite to replace it)");
  s->nonce = static_cast<uint64_t>(all[2]);
  std::ostringstream tmp;
  tmp << s->dir << ".tmp-" << std::hex << s->nonce;
  s->tmp_dir = tmp.str();

  auto& cached = impl_->plans[fp];
  if (!cached) cached = build_plan(state, s->world, options.checksum_block);
  s->plan = cached;
  const SavePlan& plan = *s->plan;

  s->step = state.step;
  s->data_position = state.data_position;
  s->user = state.user;
  for (const auto& [name, entry] : state.entries) s->attrs.push_back(entry.attrs);

  // Snapshot: this rank's boxes, then its RNG blob, into one host buffer
  // laid out exactly as the data file. A synchronous save of CPU tensors
  // skips the snapshot (the caller is waiting anyway), and so does a
  // deferred copy: the write tasks read the tensors' memory.
  std::string blob = encode_blob(state.rng);
  s->rng_bytes = blob.size();
  const uint64_t tensor_bytes = plan.file_bytes[s->rank];
  bool any_cuda = false;
  for (const auto& [name, entry] : state.entries) any_cuda |= !entry.local.device().is_cpu();
  std::vector<at::Tensor> flats;
  for (const auto& [name, entry] : state.entries) flats.push_back(entry.local.reshape({-1}));
  direct |= options.defer_copy;
  if (direct && !any_cuda) {
    for (const at::Tensor& flat : flats) direct &= flat.is_contiguous();
  } else {
    direct = false;
  }
  s->from_tensors = direct;
  s->pool = impl_->pool;
  if (direct) {
    for (const auto& pb : plan.boxes) {
      if (pb.writer != s->rank || pb.bytes == 0) continue;
      const at::Tensor& flat = flats[pb.entry];
      const auto* src = static_cast<const uint8_t*>(flat.data_ptr());
      s->segments.push_back(
          {pb.byte_offset, pb.bytes,
           src + pb.writer_local_offset * static_cast<int64_t>(flat.element_size())});
    }
    s->sources = std::move(flats);
    s->rng_blob = std::move(blob);
    s->segments.push_back({tensor_bytes, s->rng_bytes,
                           reinterpret_cast<const uint8_t*>(s->rng_blob.data())});
  } else {
    s->staging = impl_->pool->acquire(tensor_bytes + blob.size(), any_cuda && cuda_available());
    uint8_t* base = s->staging.get();
    s->segments.push_back({0, tensor_bytes + blob.size(), base});
    translate_errors("checkpoint '" + s->dir + "': copying tensors to host", [&] {
      at::NoGradGuard no_grad;
      for (const auto& pb : plan.boxes) {
        if (pb.writer != s->rank) continue;
        at::Tensor& flat = flats[pb.entry];
        if (flat.device().is_cpu() && flat.is_contiguous()) {
          const auto* src = static_cast<const uint8_t*>(flat.data_ptr());
          stream_copy(base + pb.byte_offset,
                      src + pb.writer_local_offset * static_cast<int64_t>(flat.element_size()),
                      pb.bytes);
        } else {
          at::Tensor dst = at::from_blob(base + pb.byte_offset, {pb.box.numel()},
                                         at::TensorOptions().dtype(flat.scalar_type()));
          dst.copy_(flat.narrow(0, pb.writer_local_offset, pb.box.numel()));
        }
      }
    });
    std::memcpy(base + tensor_bytes, blob.data(), blob.size());
  }
  s->plan_chunks();
  s->phase(SavePhase::kStaged);
  {
    std::lock_guard<std::mutex> lock(s->mu);
    s->stats.blocked_seconds = blocked.seconds();
    if (s->staging) s->stats.bytes_copied = tensor_bytes + s->rng_bytes;
    for (uint64_t b : plan.file_bytes) s->stats.bytes_total += b;
  }
  auto control = options.control_group;
  // The task holds the save by plain pointer: a shared_ptr would form a
  // cycle with `io` (the future's shared state owns the task) and leak the
  // save. Its owners (SaveHandle) wait for `io` before letting it go.
  SaveHandle::Impl* save = s.get();
  s->io = impl_->coordinator
              .submit([save, control] {
                save->write_phase();
                if (control) save->commit(control);
              })
              .share();
  return SaveHandle(s);
}

void Checkpointer::save(const std::string& dir, const State& state,
                        const std::shared_ptr<dist::ProcessGroup>& group,
                        const SaveOptions& options) {
  start_save(dir, state, group, options, /*direct=*/true).wait();
}

// ---------------------------------------------------------------------------
// Checkpointer: load

namespace {

std::vector<int64_t> strides_of(const std::vector<int64_t>& length) {
  std::vector<int64_t> s(length.size(), 1);
  for (int d = static_cast<int>(length.size()) - 2; d >= 0; --d) s[d] = s[d + 1] * length[d + 1];
  return s;
}

// Row-major element index within `box` of global index `idx`.
int64_t linear_in(const Box& box, const std::vector<int64_t>& strides,
                  const std::vector<int64_t>& idx) {
  int64_t e = 0;
  for (size_t d = 0; d < idx.size(); ++d) e += (idx[d] - box.offset[d]) * strides[d];
  return e;
}

// [first, last) elements of `region` in `box`'s row-major order (a span that
// may include elements outside the region).
std::pair<int64_t, int64_t> span_in(const Box& box, const Box& region) {
  auto st = strides_of(box.length);
  std::vector<int64_t> hi(region.offset.size());
  for (size_t d = 0; d < hi.size(); ++d) hi[d] = region.offset[d] + region.length[d] - 1;
  return {linear_in(box, st, region.offset), linear_in(box, st, hi) + 1};
}

// Copies `region` (global coordinates) from a row-major `src_box` whose
// element `src_origin` sits at src[0], into a row-major `dst_box` whose
// element 0 sits at dst[dst_origin]. Elements of `es` bytes.
void copy_region(const uint8_t* src, const Box& src_box, int64_t src_origin, uint8_t* dst,
                 const Box& dst_box, int64_t dst_origin, const Box& region, int64_t es) {
  const int nd = static_cast<int>(region.offset.size());
  if (nd == 0) {
    std::memcpy(dst + dst_origin * es, src - src_origin * es, es);
    return;
  }
  auto ss = strides_of(src_box.length);
  auto ds = strides_of(dst_box.length);
  // The innermost run contiguous in both boxes.
  int j = nd - 1;
  int64_t run = region.length[nd - 1];
  while (j > 0 && region.length[j] == src_box.length[j] && region.length[j] == dst_box.length[j]) {
    --j;
    run *= region.length[j];
  }
  std::vector<int64_t> idx = region.offset;
  while (true) {
    int64_t se = linear_in(src_box, ss, idx) - src_origin;
    int64_t de = linear_in(dst_box, ds, idx) + dst_origin;
    std::memcpy(dst + de * es, src + se * es, run * es);
    int d = j - 1;
    for (; d >= 0; --d) {
      if (++idx[d] < region.offset[d] + region.length[d]) break;
      idx[d] = region.offset[d];
    }
    if (d < 0) break;
  }
}

// Cuts `region` so that each piece's span in `box` is at most `max_bytes`.
void split_region(const Box& box, const Box& region, int64_t es, uint64_t max_bytes,
                  std::vector<Box>& out) {
  auto [first, last] = span_in(box, region);
  const int nd = static_cast<int>(region.offset.size());
  if (static_cast<uint64_t>((last - first) * es) <= max_bytes || nd == 0) {
    out.push_back(region);
    return;
  }
  int d = 0;
  while (d < nd && region.length[d] == 1) ++d;
  if (d == nd) {
    out.push_back(region);
    return;
  }
  const int64_t stride = strides_of(box.length)[d] * es;
  const int64_t per = std::max<int64_t>(1, static_cast<int64_t>(max_bytes) / std::max<int64_t>(stride, 1));
  for (int64_t i = 0; i < region.length[d]; i += per) {
    Box piece = region;
    piece.offset[d] += i;
    piece.length[d] = std::min(per, region.length[d] - i);
    if (piece.length[d] == region.length[d]) {
      out.push_back(piece);  // cannot cut this dimension finer
    } else {
      split_region(box, piece, es, max_bytes, out);
    }
  }
}

// Reads file bytes [begin, end) into `slot` (aligned, with room for the
// range rounded out to the file's direct-I/O alignment on both sides) and
// returns where `begin` landed. The aligned part inside the file goes as one
// direct read; what lies in the file's last partial unit goes through the
// page cache. `read(from, n, out)` reads n bytes at file offset
// base + from.
template <typename Read>
const uint8_t* read_aligned(const ReadableFile& file, uint64_t base, uint64_t begin,
                                 uint64_t end, uint8_t* slot, Read&& read) {
  const uint64_t align = file.direct_alignment();
  const uint64_t a = begin / align * align;
  const uint64_t whole_end = std::min(round_up(end, align), file.size() / align * align);
  uint64_t done = a;
  if (whole_end > a) {
    read(a - base, whole_end - a, slot);
    done = whole_end;
  }
  const uint64_t from = std::max(done, begin);
  if (end > from) read(from - base, end - from, slot + (from - a));
  return slot + (begin - a);
}

struct ReadTask {
  const ReadableFile* file;
  const std::string* tensor;
  const SavedBox* saved;
  Box region;      // global coordinates
  Box chunk;       // destination chunk's box
  int64_t chunk_origin;  // element offset of the chunk in the local flat tensor
  uint8_t* dest;   // local flat tensor's bytes
  int64_t es;
  // Other ranks load the same elements (a replicated layout): read through
  // the page cache, which serves the copies, not with direct I/O, which
  // would read them from the disk once per rank.
  bool shared;
};

}  // namespace

LoadResult Checkpointer::load(const std::string& dir_in, State& state,
                              const std::shared_ptr<dist::ProcessGroup>& group,
                              const LoadOptions& options) {
  Stopwatch watch;
  const std::string dir = strip_slash(dir_in);
  const int rank = rank_of(group), world = size_of(group);
  auto storage = options.storage ? options.storage : Storage::local();
  LoadResult result;
  std::exception_ptr error;
  try {
    Metadata meta = read_metadata(dir, storage);
    const uint64_t block = meta.checksum_block;
    std::map<std::string, std::unique_ptr<ReadableFile>> files;
    std::map<std::string, std::string> first_user;  // file -> a tensor that needs it
    auto file_for = [&](const std::string& name, const std::string& tensor) -> ReadableFile* {
      auto& f = files[name];
      if (!f) {
        try {
          f = storage->open(dir + "/" + name);
        } catch (const NotFound&) {
          TESSERA_THROW(DataLoss, "checkpoint '", dir, "': data file '", name,
                        "' is missing (needed for tensor '", tensor, "' on rank ", rank, ")");
        }
      }
      return f.get();
    };
    std::vector<ReadTask> tasks;
    // Destination tensors that need a copy back (not CPU, not contiguous, or
    // another dtype than saved): (entry tensor, staging tensor).
    std::vector<std::pair<at::Tensor*, at::Tensor>> copy_back;
    uint64_t total_bytes = 0;
    for (auto& [name, entry] : state.entries) {
      const dist::Layout& layout = entry.layout;
      TESSERA_CHECK(entry.local.defined(), InvalidArgument, "checkpoint load: tensor '", name,
                    "' on rank ", rank, " is undefined");
      TESSERA_CHECK(layout.world_size() == world, InvalidArgument, "checkpoint load: tensor '",
                    name, "' has a layout over ", layout.world_size(),
                    " ranks but the group has ", world);
      TESSERA_CHECK(entry.local.numel() == layout.local_numel(rank), InvalidArgument,
                    "checkpoint load: tensor '", name, "' on rank ", rank, " has ",
                    entry.local.numel(), " elements but its layout gives this rank ",
                    layout.local_numel(rank));
      auto it = meta.tensors.find(name);
      if (it == meta.tensors.end()) {
        TESSERA_CHECK(options.allow_missing, NotFound, "checkpoint '", dir, "' has no tensor '",
                      name, "'");
        result.missing.push_back(name);
        continue;
      }
      const TensorMeta& tm = it->second;
      TESSERA_CHECK(tm.shape == layout.global_shape(), InvalidArgument, "checkpoint '", dir,
                    "': tensor '", name, "' was saved with shape ", shape_string(tm.shape),
                    " but is loaded with shape ", shape_string(layout.global_shape()));
      const at::ScalarType saved_dtype = parse_dtype(tm.dtype);
      const int64_t es = static_cast<int64_t>(dtype_size(saved_dtype));
      at::Tensor dest = entry.local;
      if (!(dest.device().is_cpu() && dest.is_contiguous() && dest.scalar_type() == saved_dtype)) {
        dest = at::empty({entry.local.numel()}, at::TensorOptions().dtype(saved_dtype));
        copy_back.emplace_back(&entry.local, dest);
      }
      auto* dest_bytes = static_cast<uint8_t*>(dest.data_ptr());
      int64_t held = 0;
      for (int r = 0; r < world; ++r) held += layout.local_numel(r);
      const bool shared = held > layout.global_numel();
      for (const auto& chunk : layout.chunks(rank)) {
        int64_t covered = 0;
        for (const auto& sb : tm.boxes) {
          Box inter = dist::intersect(chunk.box, sb.box);
          if (inter.numel() == 0) continue;
          covered += inter.numel();
          TESSERA_CHECK(sb.byte_length == static_cast<uint64_t>(sb.box.numel() * es) &&
                            sb.crc32c.size() == static_cast<size_t>(blocks_of(sb.byte_length, block)),
                        DataLoss, "checkpoint '", dir, "': metadata of tensor '", name, "' box ",
                        sb.box.to_string(), " is inconsistent (byte length or checksum count)");
          ReadableFile* f = file_for(sb.file, name);
          std::vector<Box> pieces;
          split_region(sb.box, inter, es, options.max_read_bytes, pieces);
          for (auto& p : pieces) {
            auto [a, b] = span_in(sb.box, p);
            total_bytes += static_cast<uint64_t>((b - a) * es);
            tasks.push_back({f, &it->first, &sb, std::move(p), chunk.box, chunk.local_offset,
                             dest_bytes, es, shared});
          }
        }
        TESSERA_CHECK(covered == chunk.box.numel(), DataLoss, "checkpoint '", dir, "': tensor '",
                      name, "': the saved boxes cover ", covered, " of the ", chunk.box.numel(),
                      " elements of ", chunk.box.to_string(), " that rank ", rank, " needs");
      }
    }

    Progress progress("loading " + dir, total_bytes);
    std::atomic<uint64_t> bytes_read{0};
    // Reads straight into a destination go through per-thread bounce slots
    // with direct I/O when the files allow it (see read_aligned).
    const size_t threads = std::max<size_t>(1, options.io_threads);
    const uint64_t piece_bytes = std::max(block, (kLoadPieceBytes + block - 1) / block * block);
    const uint64_t slot_bytes = round_up(piece_bytes, kDirectAlign) + 2 * kDirectAlign;
    bool direct_files = false;
    for (const ReadTask& t : tasks) direct_files |= !t.shared && t.file->direct_alignment() > 0;
    BounceSlots bounce = direct_files ? BounceSlots(threads, slot_bytes) : BounceSlots();
    {
      ThreadPool pool(threads);
      std::vector<std::future<void>> done;
      done.reserve(tasks.size());
      for (const ReadTask& t : tasks) {
        done.push_back(pool.submit([&, t] {
          const SavedBox& sb = *t.saved;
          auto [first, last] = span_in(sb.box, t.region);
          // Round out to whole checksum blocks so every byte used is verified.
          const uint64_t lo = static_cast<uint64_t>(first * t.es) / block * block;
          const uint64_t hi = std::min(sb.byte_length,
                                       (static_cast<uint64_t>(last * t.es) + block - 1) / block * block);
          // When the block-rounded span is exactly the region and the region
          // is one contiguous run of the destination chunk too (same layout,
          // whole rows), read straight into the destination: no staging
          // buffer, no second copy. Otherwise read into a buffer and scatter.
          uint8_t* direct = nullptr;
          if (lo == static_cast<uint64_t>(first * t.es) && hi == static_cast<uint64_t>(last * t.es) &&
              last - first == t.region.numel()) {
            auto [dfirst, dlast] = span_in(t.chunk, t.region);
            if (dlast - dfirst == t.region.numel()) direct = t.dest + (t.chunk_origin + dfirst) * t.es;
          }
          auto read = [&](uint64_t from, uint64_t n, uint8_t* out) {
            try {
              t.file->read_at(sb.byte_offset + from, n, out);
            } catch (const DataLoss& e) {
              TESSERA_THROW(DataLoss, e.message(), " (tensor '", *t.tensor, "', box ",
                            sb.box.to_string(), ")");
            }
          };
          auto verify = [&](uint64_t from, uint64_t to, const uint8_t* bytes) {
            if (!options.verify_checksums) return;
            for (uint64_t off = from; off < to; off += block) {
              const uint64_t n = std::min(block, sb.byte_length - off);
              const uint32_t got = crc32c(bytes + (off - from), n);
              const uint32_t want = sb.crc32c[off / block];
              TESSERA_CHECK(got == want, DataLoss, "checkpoint '", dir, "': checksum mismatch in '",
                            sb.file, "' at bytes [", sb.byte_offset + off, ", ",
                            sb.byte_offset + off + n, ") of tensor '", *t.tensor, "' box ",
                            sb.box.to_string(), ": stored crc32c ", want, ", computed ", got,
                            "; the file is corrupt");
            }
          };
          if (direct && !t.shared && !bounce.empty()) {
            // Through this thread's bounce slot with direct I/O, a few
            // checksum blocks at a time, then into the destination.
            BounceSlots::Slot slot = bounce.take();
            for (uint64_t p = lo; p < hi; p += piece_bytes) {
              const uint64_t q = std::min(hi, p + piece_bytes);
              const uint8_t* got = read_aligned(*t.file, sb.byte_offset, sb.byte_offset + p,
                                                sb.byte_offset + q, slot.data(), read);
              verify(p, q, got);
              std::memcpy(direct + (p - lo), got, q - p);
            }
            bytes_read += hi - lo;
            progress.add(hi - lo);
            return;
          }
          std::unique_ptr<uint8_t[]> owned;
          if (!direct) owned = std::make_unique<uint8_t[]>(hi - lo);
          uint8_t* buf_ptr = direct ? direct : owned.get();
          read(lo, hi - lo, buf_ptr);
          verify(lo, hi, buf_ptr);
          if (!direct) {
            copy_region(buf_ptr, sb.box, static_cast<int64_t>(lo) / t.es, t.dest, t.chunk,
                        t.chunk_origin, t.region, t.es);
          }
          bytes_read += hi - lo;
          progress.add(hi - lo);
        }));
      }
      wait_all(done);
    }
    translate_errors("checkpoint '" + dir + "': copying loaded tensors into place", [&] {
      at::NoGradGuard no_grad;
      for (auto& [local, staged] : copy_back) local->copy_(staged.view(local->sizes()));
    });

    // Non-tensor state.
    state.step = meta.step;
    state.data_position = meta.data_position;
    state.user = meta.user;
    if (meta.world_size == world && rank < static_cast<int>(meta.rank_state.size())) {
      const RankBlob& rb = meta.rank_state[rank];
      std::string blob(rb.byte_length, '\0');
      file_for(rb.file, "<rng state>")->read_at(rb.byte_offset, rb.byte_length, blob.data());
      TESSERA_CHECK(crc32c(blob.data(), blob.size()) == rb.crc32c, DataLoss, "checkpoint '", dir,
                    "': checksum mismatch in the RNG state of rank ", rank, " in '", rb.file, "'");
      state.rng = decode_blob(blob, dir + "/" + rb.file);
      result.rng_restored = true;
      bytes_read += rb.byte_length;
    }
    result.bytes_read = bytes_read.load();
  } catch (...) {
    error = std::current_exception();
  }
  // All-or-nothing: every rank learns whether every other rank succeeded.
  std::vector<int64_t> oks = all_gather_ints(group, {error ? 0 : 1});
  if (error) std::rethrow_exception(error);
  std::vector<int> failed;
  for (int r = 0; r < world; ++r) {
    if (oks[r] != 1) failed.push_back(r);
  }
  TESSERA_CHECK(failed.empty(), Aborted, "loading checkpoint '", dir, "' failed on rank(s) ",
                join_ranks(failed), " (see their errors)");
  result.seconds = watch.seconds();
  if (rank == 0) {
    const bool slow = result.seconds >= 1.0;
    if (log::enabled("ckpt", slow ? log::Level::kInfo : log::Level::kDebug)) {
      log::write("ckpt", slow ? log::Level::kInfo : log::Level::kDebug,
                 ::tessera::detail::concat("loaded '", dir, "': ", state.entries.size(), " tensors, ",
                                mib(result.bytes_read), " read by rank 0 in ", result.seconds,
                                " s"));
    }
  }
  return result;
}

void save(const std::string& dir, const State& state,
          const std::shared_ptr<dist::ProcessGroup>& group, const SaveOptions& options) {
  Checkpointer().save(dir, state, group, options);
}

LoadResult load(const std::string& dir, State& state,
                const std::shared_ptr<dist::ProcessGroup>& group, const LoadOptions& options) {
  return Checkpointer().load(dir, state, group, options);
}

// ---------------------------------------------------------------------------
// Roots, retention, verification

std::string step_dir(const std::string& root, int64_t step) {
  std::ostringstream out;
  out << strip_slash(root) << "/step_" << std::setw(9) << std::setfill('0') << step;
  return out.str();
}

std::vector<std::string> list_checkpoints(const std::string& root_in,
                                          const std::shared_ptr<Storage>& storage) {
  auto st = storage ? storage : Storage::local();
  const std::string root = strip_slash(root_in);
  if (!st->is_dir(root)) return {};
  std::vector<std::pair<int64_t, std::string>> found;
  for (const auto& name : st->list(root)) {
    if (name.rfind("step_", 0) != 0 || name.size() == 5) continue;
    if (!std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      continue;  // "step_100.tmp-..." and "step_100.old-..." are not checkpoints
    }
    const std::string path = root + "/" + name;
    if (!st->exists(path + "/" + kMetadataFile)) continue;
    found.emplace_back(std::stoll(name.substr(5)), path);
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::optional<std::string> latest(const std::string& root,
                                  const std::shared_ptr<Storage>& storage) {
  auto all = list_checkpoints(root, storage);
  if (all.empty()) return std::nullopt;
  return all.back();
}

void apply_retention(const std::string& root, int keep_last,
                     const std::shared_ptr<Storage>& storage) {
  TESSERA_CHECK(keep_last >= 1, InvalidArgument, "checkpoint retention in '", root,
                "': keep_last must be at least 1, got ", keep_last);
  auto st = storage ? storage : Storage::local();
  auto all = list_checkpoints(root, st);
  if (static_cast<int>(all.size()) <= keep_last) return;
  for (size_t i = 0; i + keep_last < all.size(); ++i) {
    // Metadata first: from then on the directory is no checkpoint at all.
    st->remove_file(all[i] + "/" + kMetadataFile);
    st->sync_dir(all[i]);
    st->remove_all(all[i]);
    TESSERA_LOG(Info, "ckpt") << "removed old checkpoint '" << all[i] << "' (keep_last "
                              << keep_last << ")";
  }
}

VerifyReport verify(const std::string& dir_in, const std::shared_ptr<Storage>& storage,
                    size_t io_threads) {
  auto st = storage ? storage : Storage::local();
  const std::string dir = strip_slash(dir_in);
  Metadata meta = read_metadata(dir, st);
  VerifyReport report;
  std::mutex mu;  // guards report
  auto problem = [&](std::string text) {
    std::lock_guard<std::mutex> lock(mu);
    report.errors.push_back(std::move(text));
  };
  std::map<std::string, std::unique_ptr<ReadableFile>> files;
  for (const auto& f : meta.files) {
    try {
      auto file = st->open(dir + "/" + f.name);
      if (file->size() != f.bytes) {
        problem(::tessera::detail::concat("'", f.name, "' has ", file->size(), " bytes; the metadata says ",
                               f.bytes, (file->size() < f.bytes ? " (truncated)" : "")));
      }
      files[f.name] = std::move(file);
      ++report.files;
    } catch (const std::exception& e) {
      problem(::tessera::detail::concat("data file '", f.name, "' cannot be opened: ", e.what()));
    }
  }
  const uint64_t block = meta.checksum_block;
  ThreadPool pool(std::max<size_t>(1, io_threads));
  std::vector<std::future<void>> done;
  for (const auto& [name, tm] : meta.tensors) {
    for (const auto& sb : tm.boxes) {
      ++report.boxes;
      auto it = files.find(sb.file);
      if (it == files.end()) {
        problem(::tessera::detail::concat("tensor '", name, "' box ", sb.box.to_string(), ": data file '",
                               sb.file, "' is missing"));
        continue;
      }
      const ReadableFile* file = it->second.get();
      done.push_back(pool.submit([&, file, name = name, sbp = &sb] {
        const SavedBox& b = *sbp;
        if (b.crc32c.size() != static_cast<size_t>(blocks_of(b.byte_length, block))) {
          problem(::tessera::detail::concat("tensor '", name, "' box ", b.box.to_string(),
                                 ": wrong number of checksums in the metadata"));
          return;
        }
        const uint64_t step = std::max<uint64_t>(block, (uint64_t{32} << 20) / block * block);
        auto buf = std::make_unique<uint8_t[]>(std::min(step, std::max<uint64_t>(b.byte_length, 1)));
        for (uint64_t off = 0; off < b.byte_length; off += step) {
          const uint64_t n = std::min(step, b.byte_length - off);
          try {
            file->read_at(b.byte_offset + off, n, buf.get());
          } catch (const std::exception& e) {
            problem(::tessera::detail::concat("tensor '", name, "' box ", b.box.to_string(), ": ", e.what()));
            return;
          }
          for (uint64_t k = 0; k < n; k += block) {
            const uint64_t len = std::min(block, n - k);
            const uint32_t got = crc32c(buf.get() + k, len);
            const uint32_t want = b.crc32c[(off + k) / block];
            if (got != want) {
              problem(::tessera::detail::concat("checksum mismatch in '", b.file, "' at bytes [",
                                     b.byte_offset + off + k, ", ", b.byte_offset + off + k + len,
                                     ") of tensor '", name, "' box ", b.box.to_string()));
            }
          }
          std::lock_guard<std::mutex> lock(mu);
          report.bytes += n;
        }
      }));
    }
  }
  for (size_t r = 0; r < meta.rank_state.size(); ++r) {
    const RankBlob& rb = meta.rank_state[r];
    auto it = files.find(rb.file);
    if (it == files.end()) continue;  // reported above
    try {
      std::string blob(rb.byte_length, '\0');
      it->second->read_at(rb.byte_offset, rb.byte_length, blob.data());
      if (crc32c(blob.data(), blob.size()) != rb.crc32c) {
        problem(::tessera::detail::concat("checksum mismatch in the RNG state of rank ", r, " in '", rb.file,
                               "'"));
      }
    } catch (const std::exception& e) {
      problem(::tessera::detail::concat("RNG state of rank ", r, ": ", e.what()));
    }
  }
  for (auto& f : done) f.get();
  std::sort(report.errors.begin(), report.errors.end());
  return report;
}

}  // namespace tessera::ckpt
