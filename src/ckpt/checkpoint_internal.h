// src/ckpt/checkpoint_internal.h — what the stages of the checkpoint engine
// share: the save plan, the staging buffers, the state of one save
// (SaveHandle::Impl), the RNG blob format and small helpers.
//
// The stages, each in its own file:
//   save.cpp    State; validation and agreement across ranks, the save plan
//               and staging (Checkpointer::save_async, save);
//   commit.cpp  SaveHandle: the write phase (data file and checksums) and
//               the collective commit (metadata, rename, retention);
//   load.cpp    load planning (which saved boxes feed which local chunks)
//               and the parallel, checksummed reads (Checkpointer::load);
//   roots.cpp   step directories, listing and retention;
//   verify.cpp  verify.
// The format is described in docs/ckpt.md.
//
// Usage (inside src/ckpt only):
//   #include "checkpoint_internal.h"
//   std::vector<int64_t> oks = detail::all_gather_ints(group, {ok ? 1 : 0});
//   detail::Progress progress("loading " + dir, total_bytes);
//
// Thread-safety: free functions are thread-safe; Progress and StagingPool
// are thread-safe; SaveHandle::Impl states which mutex guards each field.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "host_memory.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/metrics.h"

namespace tessera::ckpt {
namespace detail {

// Waits for every task (none may outlive the buffers they use), then
// rethrows the first failure.
void wait_all(std::vector<std::future<void>>& tasks);

// Where copies for writing are placed relative to their file offset: the
// largest direct-I/O alignment a Storage reports (4 KiB for local files).
inline constexpr uint64_t kDirectAlign = 4096;

inline uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

inline int64_t blocks_of(uint64_t bytes, uint64_t block) {
  return static_cast<int64_t>((bytes + block - 1) / block);
}

// `bytes` as "12.3 MiB", for logs.
std::string mib(uint64_t bytes);
// "rank_00003.bin": the data file rank 3 writes.
std::string rank_file_name(int rank);
// `d` without trailing slashes ("/" stays "/").
std::string strip_slash(std::string d);
// "0, 2, 3", for messages naming ranks.
std::string join_ranks(const std::vector<int>& ranks);

// A null group is a world of one rank.
int rank_of(const std::shared_ptr<dist::ProcessGroup>& g);
int size_of(const std::shared_ptr<dist::ProcessGroup>& g);

// Every rank's `mine` (same length everywhere), concatenated in rank order.
std::vector<int64_t> all_gather_ints(const std::shared_ptr<dist::ProcessGroup>& g,
                                     const std::vector<int64_t>& mine);

// RNG states: [u32 count] then per entry [u32 name length][name][u64 size][bytes].
std::string encode_blob(const std::map<std::string, std::string>& rng);
// The inverse of encode_blob; DataLoss naming `where` for a truncated blob.
std::map<std::string, std::string> decode_blob(const std::string& blob, const std::string& where);

// Logs progress at most every kProgressSeconds (10 s); thread-safe.
class Progress {
 public:
  Progress(std::string what, uint64_t total) : what_(std::move(what)), total_(total) {}
  void add(uint64_t bytes);
  uint64_t done() const { return done_.load(); }

 private:
  std::string what_;
  uint64_t total_;
  std::atomic<uint64_t> done_{0};
  Stopwatch watch_;
  std::mutex mu_;
  Stopwatch last_;  // guarded by mu_
};

// ---------------------------------------------------------------------------
// Save plan: which rank writes which distinct box where. A pure function of
// the layouts, so every rank computes the same plan without talking.

struct PlanBox {
  int entry = 0;  // index into SavePlan::names
  dist::Box box;
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

// ---------------------------------------------------------------------------
// Staging buffers: at most two (ping-pong), reused across saves.

struct Staging {
  at::Tensor pinned;  // kByte, capacity: page-locked, for device tensors
  HugeBuffer host;    // capacity: huge pages, for host tensors
  bool in_use = false;

  uint64_t capacity(bool want_pinned) const {
    return want_pinned ? static_cast<uint64_t>(pinned.defined() ? pinned.numel() : 0) : host.size();
  }
};

// The pool of staging buffers. Shared by the Checkpointer and its handles
// (a handle may copy into a buffer after the Checkpointer is gone).
struct StagingPool {
  std::mutex mu;
  std::condition_variable freed;
  std::vector<std::unique_ptr<Staging>> staging;  // guarded by mu

  // A buffer of at least `bytes` (page-locked when `pinned`, else huge
  // pages); blocks while two are in use. The buffer returns to the pool when
  // the last copy of the returned pointer is destroyed.
  std::shared_ptr<uint8_t> acquire(uint64_t bytes, bool pinned);
};

}  // namespace detail

// ---------------------------------------------------------------------------
// One save: set up and staged by Checkpointer::start_save (save.cpp), written
// and committed by the coordinator thread (commit.cpp), shared with the
// SaveHandle(s) that wait for it.

struct SaveHandle::Impl {
  std::string dir, tmp_dir, file;
  int rank = 0, world = 1;
  std::shared_ptr<dist::ProcessGroup> group;
  SaveOptions options;
  std::shared_ptr<Storage> storage;
  std::shared_ptr<const detail::SavePlan> plan;
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
    uint64_t begin = 0, end = 0;             // file offsets
    size_t first_block = 0, last_block = 0;  // blocks starting in [begin, end)
  };
  bool from_tensors = false;
  std::shared_ptr<detail::StagingPool> pool;  // where release_tensors() gets a buffer
  // Set in save_async (plan_chunks), read-only afterwards.
  std::vector<std::pair<uint64_t, uint64_t>> blocks;  // (file offset, length) in file order
  std::vector<ChunkRange> chunk_ranges;
  std::mutex chunk_mu;
  std::condition_variable chunk_cv;
  std::vector<Chunk> chunks;                  // guarded by chunk_mu
  std::vector<const uint8_t*> staged_at;      // guarded by chunk_mu
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
  bool finished = false;       // guarded by mu
  std::exception_ptr outcome;  // guarded by mu
  SaveStats stats;             // guarded by mu after save_async returns
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

}  // namespace tessera::ckpt
