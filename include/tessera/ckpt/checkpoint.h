// tessera/ckpt/checkpoint.h — sharded checkpoints that load into any layout
// (ByteCheckpoint, NSDI 2025).
//
// A checkpoint is a directory: one data file per saving rank, written in
// parallel with large sequential writes, and one metadata file
// (metadata.json, written last by rank 0) that maps every tensor to its
// saved boxes, each box to (file, byte offset, byte length, CRC-32C per
// block). Loading intersects the boxes each rank now needs (its chunks in
// the new layout, any world size) with the saved boxes and reads only those
// byte ranges (rounded out to checksum blocks), so a ZeRO flat shard saved at
// world 4 loads into a tensor-parallel shard at world 2 without a full tensor
// on any rank. The format is in docs/ckpt.md.
//
//   using namespace tessera;
//   ckpt::State state;
//   state.add("w", local_w, dist::Layout::sharded({4096, 1024}, mesh, {Shard(0)}));
//   state.step = 100;
//   ckpt::save(ckpt::step_dir("/ckpt", 100), state, world);   // collective
//   ...
//   ckpt::State want;                                        // any layout, any world size
//   want.add("w", at::empty(...), other_layout);
//   ckpt::load(*ckpt::latest("/ckpt"), want, world);          // collective
//
// Asynchronous save: save_async() returns once this rank's tensors are copied
// into host staging buffers (reused across saves); I/O threads write, checksum
// and fsync the data file. With SaveOptions::defer_copy it returns at once
// and the copy waits for SaveHandle::release_tensors(), which copies only
// what the I/O threads have not written yet. The commit — every rank reports success, rank 0
// writes metadata.json and renames the directory into place — is collective,
// and runs where the caller says (SaveOptions::control_group):
//   * no control group (default): in SaveHandle::wait(), on the caller's
//     thread, over the group given to save_async. Every rank must call
//     wait() on its handles in the same order; it costs one all_gather and
//     one broadcast once the files are written.
//   * a dedicated control group (created by the caller for checkpointing
//     only, e.g. world->new_subgroup(all ranks, "ckpt")): the commit runs on
//     the I/O thread over that group, so the training loop never blocks on
//     it; wait() only reports the outcome.
//
// Crash safety: files go to "<dir>.tmp-<nonce>"; the directory appears under
// its name only by an atomic rename after every rank fsynced its file and
// rank 0 fsynced the metadata. A crash at any point leaves earlier
// checkpoints intact and the new one invisible (latest() never returns it).
//
// Thread safety: a Checkpointer may be used by one thread at a time (its I/O
// threads are internal); the free functions are thread-compatible.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/ckpt/storage.h"
#include "tessera/dist/layout.h"
#include "tessera/dist/process_group.h"

namespace tessera::ckpt {

inline constexpr int kFormatVersion = 1;
inline constexpr const char* kMetadataFile = "metadata.json";

// One tensor of a State: this rank's local tensor and the global layout
// (every rank's chunks) it belongs to.
struct Entry {
  // This rank's part: layout.local_numel(rank) elements, stored as
  // layout.chunks(rank) say (row-major within each chunk, at local_offset).
  // Any shape with that many elements; CPU or CUDA; any dtype safetensors
  // supports. Must be defined even when the rank holds nothing (an empty
  // tensor of the right dtype), so every rank agrees on the dtype.
  at::Tensor local;
  dist::Layout layout;
  // Free-form attributes saved in the metadata (e.g. how a model parameter
  // is split, so tools can rebuild layouts for other parallel degrees).
  std::map<std::string, std::string> attrs;
};

// What a checkpoint holds. On save every rank passes the same entry names,
// dtypes and layouts (checked: a mismatch is InvalidArgument naming the
// rank); on load, the entries to fill, each in its own layout for the
// loading world.
struct State {
  std::map<std::string, Entry> entries;  // sorted by name: the save order
  // Training position. Saved from rank 0; restored on every rank.
  int64_t step = 0;
  // Samples (or tokens) consumed from the data stream, over all data-parallel
  // ranks: independent of the world size, so it survives resharding.
  int64_t data_position = 0;
  // This rank's random generator states, opaque bytes by name (e.g.
  // at::Generator::get_state() bytes). Saved per rank; restored only when
  // the loading world has the saving world's size (LoadResult says).
  std::map<std::string, std::string> rng;
  // User key-values, saved from rank 0 (e.g. the model config).
  std::map<std::string, std::string> user;

  // Adds an entry; InvalidArgument naming the tensor for a duplicate name or
  // a local tensor whose size is not layout.local_numel(rank) (checked at
  // save/load, where the rank is known).
  void add(const std::string& name, at::Tensor local, dist::Layout layout,
           std::map<std::string, std::string> attrs = {});
  // A tensor every one of `world_size` ranks holds whole.
  void add_replicated(const std::string& name, at::Tensor tensor, int world_size);
};

// Where save/load are in their work; passed to SaveOptions::on_phase.
enum class SavePhase {
  kStaged,        // tensors copied to host; save_async about to return
  kFileWritten,   // this rank's data file written, not yet fsynced
  kFileSynced,    // ... and fsynced
  kBeforeCommit,  // rank 0: all ranks reported success, metadata not written
  kCommitted,     // rank 0: directory renamed into place
};

struct SaveOptions {
  // Storage to write to; null: Storage::local().
  std::shared_ptr<Storage> storage;
  // Threads writing and checksumming this rank's data file (pwrite of
  // disjoint ranges). More helps on parallel file systems and NVMe.
  size_t io_threads = 4;
  // Bytes per write call and per I/O task. Large: few system calls.
  uint64_t write_bytes = uint64_t{16} << 20;
  // Bytes covered by one CRC-32C. Smaller blocks let a load that needs part
  // of a saved box verify what it reads without reading the whole box;
  // larger ones make the metadata smaller. Must be a positive multiple of 8.
  uint64_t checksum_block = uint64_t{1} << 20;
  // Retention: after committing, keep only the newest `keep_last` complete
  // checkpoints named step_<N> in the parent directory (0: keep all). The
  // one just written is never removed.
  int keep_last = 0;
  // Replace an existing checkpoint at `dir` (otherwise FailedPrecondition).
  // The old directory is moved aside and removed after the new one is in place.
  bool overwrite = false;
  // Defer the snapshot copy (save_async only): write straight from the
  // tensors' memory while the caller keeps computing, and copy to a staging
  // buffer only what is still unwritten when the caller calls
  // SaveHandle::release_tensors() — which it must do before any saved tensor
  // changes. In a training loop: save_async right after optimizer.step(),
  // release_tensors() right before the next one; the forward and backward
  // passes in between overlap the write, and the step waits only for the
  // part the disk has not taken yet (nothing, when the write is done).
  // Ignored (the copy happens in save_async) when a tensor is not a
  // contiguous CPU tensor.
  bool defer_copy = false;
  // A process group used only for checkpoint control; when set, the commit
  // runs on the I/O thread over it (see the file comment). Same ranks, in
  // the same order, as the group passed to save.
  std::shared_ptr<dist::ProcessGroup> control_group;
  // Called on the thread doing the work at each phase (tests inject faults
  // here; monitoring can time phases). May be empty.
  std::function<void(SavePhase)> on_phase;
};

struct SaveStats {
  double blocked_seconds = 0;  // inside save_async (planning, staging) and release_tensors
  double write_seconds = 0;    // writing, checksumming and fsync of this rank's file
  double total_seconds = 0;    // save_async until committed
  uint64_t bytes_written = 0;  // by this rank
  uint64_t bytes_total = 0;    // by all ranks
  uint64_t bytes_copied = 0;   // by this rank into a staging buffer (with
                               // defer_copy: by release_tensors)
};

// The outcome of an asynchronous save. Move-only.
class [[nodiscard]] SaveHandle {
 public:
  SaveHandle();
  ~SaveHandle();  // waits for the I/O to finish (not for a collective commit)
  SaveHandle(SaveHandle&&) noexcept;
  SaveHandle& operator=(SaveHandle&&) noexcept;

  // Blocks until the checkpoint is committed (or failed) and rethrows a
  // failure: the error of this rank, or Aborted naming the ranks that
  // failed. Without a control group this runs the commit and is collective
  // over the save's group. Calling it again returns the same outcome.
  // DeadlineExceeded if `timeout` (0: none) passes first while waiting for
  // this rank's I/O; the handle stays valid.
  void wait(std::chrono::milliseconds timeout = std::chrono::milliseconds(0));
  // With SaveOptions::defer_copy: returns once the save no longer reads the
  // saved tensors, copying the chunks no write has started to a staging
  // buffer (and waiting for writes reading the tensors right now). Call it
  // before the tensors next change. Otherwise, or when called again: no-op.
  // On failure (no memory for the buffer) the save fails too; wait()
  // reports it.
  void release_tensors();
  // False for a default-constructed (or moved-from) handle.
  bool valid() const { return impl_ != nullptr; }
  // True when wait() would not block on I/O.
  bool io_done() const;
  const std::string& dir() const;
  SaveStats stats() const;

  struct Impl;
  explicit SaveHandle(std::shared_ptr<Impl> impl);

 private:
  std::shared_ptr<Impl> impl_;
};

struct LoadOptions {
  // Storage to read from; null: Storage::local().
  std::shared_ptr<Storage> storage;
  // Reads in flight at once (pread from a thread pool).
  size_t io_threads = 8;
  // Largest single read; bounds memory to about io_threads * max_read_bytes.
  uint64_t max_read_bytes = uint64_t{32} << 20;
  // Check the CRC-32C of every block read (DataLoss on a mismatch).
  bool verify_checksums = true;
  // Entries the checkpoint lacks are left untouched and listed in
  // LoadResult::missing instead of failing with NotFound.
  bool allow_missing = false;
};

struct LoadResult {
  std::vector<std::string> missing;  // with allow_missing
  bool rng_restored = false;         // same world size as the save
  uint64_t bytes_read = 0;           // by this rank
  double seconds = 0;
};

// ---------------------------------------------------------------------------
// Metadata (metadata.json), as parsed. Tools use it; save/load produce and
// consume it.

struct SavedBox {
  dist::Box box;           // global coordinates
  std::vector<int> ranks;  // ranks that held this box when saving (replicas)
  std::string file;        // relative to the checkpoint directory
  uint64_t byte_offset = 0;
  uint64_t byte_length = 0;  // box.numel() * element size
  // CRC-32C of each checksum_block-sized block of the box's bytes (the last
  // block may be shorter).
  std::vector<uint32_t> crc32c;
};

struct TensorMeta {
  std::string dtype;  // PyTorch name: "float32", "bfloat16", ...
  std::vector<int64_t> shape;
  std::map<std::string, std::string> attrs;
  std::vector<SavedBox> boxes;  // tile the tensor exactly
};

// A rank's non-tensor blob (RNG states) inside its data file.
struct RankBlob {
  std::string file;
  uint64_t byte_offset = 0;
  uint64_t byte_length = 0;
  uint32_t crc32c = 0;
};

struct DataFile {
  std::string name;
  uint64_t bytes = 0;
};

struct Metadata {
  int format_version = kFormatVersion;
  int world_size = 1;
  int64_t step = 0;
  int64_t data_position = 0;
  uint64_t checksum_block = 0;
  std::map<std::string, std::string> user;
  std::vector<DataFile> files;
  std::map<std::string, TensorMeta> tensors;
  std::vector<RankBlob> rank_state;  // one per saving rank

  std::string to_json(int indent = -1) const;
  // DataLoss naming `source` for malformed JSON or fields; FailedPrecondition
  // naming `source` and both versions for a format_version this reader does
  // not know.
  static Metadata parse(const std::string& text, const std::string& source);
};

// Reads `dir`/metadata.json. NotFound naming the directory when it is not a
// complete checkpoint (no metadata: never committed, or not a checkpoint).
Metadata read_metadata(const std::string& dir, const std::shared_ptr<Storage>& storage = nullptr);

// ---------------------------------------------------------------------------
// Saving and loading.

// Owns the I/O threads, the reusable staging buffers and the cached save
// plans. Keep one per training job so that saves reuse them.
class Checkpointer {
 public:
  Checkpointer();
  ~Checkpointer();  // waits for outstanding I/O
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Collective over `group` (null: a world of one rank). Copies this rank's
  // share of `state` to host memory and returns; the tensors may change
  // afterwards. At most two saves are staged at once (ping-pong buffers): a
  // third waits for the oldest one's writes. `dir` must be the same on every
  // rank; its parent is created if missing.
  // InvalidArgument for an inconsistent state (naming tensor and rank);
  // FailedPrecondition when `dir` exists and !options.overwrite.
  SaveHandle save_async(const std::string& dir, const State& state,
                        const std::shared_ptr<dist::ProcessGroup>& group,
                        const SaveOptions& options = {});
  // Synchronous save: returns once committed. CPU tensors are not
  // snapshotted (the caller is waiting anyway): each I/O thread copies
  // about 1 MiB at a time into a small buffer of its own and writes it with
  // direct I/O where the storage allows; other tensors go through a
  // staging buffer.
  void save(const std::string& dir, const State& state,
            const std::shared_ptr<dist::ProcessGroup>& group, const SaveOptions& options = {});

  // Collective over `group` (null: one rank). Fills every entry of `state`
  // (entry.local in place; its layout's world size must be the group's size)
  // from the checkpoint at `dir`, and step, data_position, user and (same
  // world size only) rng. Ends with an agreement step, so either every rank
  // succeeds or every rank throws: this rank's own error, or Aborted naming
  // the ranks that failed.
  // NotFound naming the directory without metadata, or the tensor when the
  // checkpoint lacks it; InvalidArgument for a dtype or shape mismatch;
  // DataLoss naming the file and tensor for a missing, truncated or corrupt
  // data file.
  LoadResult load(const std::string& dir, State& state,
                  const std::shared_ptr<dist::ProcessGroup>& group,
                  const LoadOptions& options = {});

 private:
  SaveHandle start_save(const std::string& dir, const State& state,
                        const std::shared_ptr<dist::ProcessGroup>& group,
                        const SaveOptions& options, bool direct);

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One-shot forms (a temporary Checkpointer: no buffer reuse).
void save(const std::string& dir, const State& state,
          const std::shared_ptr<dist::ProcessGroup>& group, const SaveOptions& options = {});
LoadResult load(const std::string& dir, State& state,
                const std::shared_ptr<dist::ProcessGroup>& group, const LoadOptions& options = {});

// ---------------------------------------------------------------------------
// Checkpoint roots: directories of step_<N> checkpoints.

// root + "/step_" + step, zero-padded to 9 digits ("step_000000100").
std::string step_dir(const std::string& root, int64_t step);

// Complete checkpoints (step_<N> directories with metadata) in `root`,
// oldest first by N; empty when root is missing.
std::vector<std::string> list_checkpoints(const std::string& root,
                                          const std::shared_ptr<Storage>& storage = nullptr);

// The newest complete checkpoint in `root`; nullopt when there is none.
std::optional<std::string> latest(const std::string& root,
                                  const std::shared_ptr<Storage>& storage = nullptr);

// Keeps the newest `keep_last` complete checkpoints of `root` and removes
// the others (metadata first, so a half-removed one is never complete).
// keep_last < 1 is InvalidArgument: the newest is never removed.
void apply_retention(const std::string& root, int keep_last,
                     const std::shared_ptr<Storage>& storage = nullptr);

// ---------------------------------------------------------------------------
// Checking.

struct VerifyReport {
  uint64_t files = 0;
  uint64_t boxes = 0;
  uint64_t bytes = 0;
  // One line per problem, naming file and tensor; empty when all is well.
  std::vector<std::string> errors;
  bool ok() const { return errors.empty(); }
};

// Reads every byte of the checkpoint and checks every checksum and size.
// NotFound when `dir` has no metadata.
VerifyReport verify(const std::string& dir, const std::shared_ptr<Storage>& storage = nullptr,
                    size_t io_threads = 4);

}  // namespace tessera::ckpt
