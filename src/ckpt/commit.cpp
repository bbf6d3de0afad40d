// src/ckpt/commit.cpp — the save's second stage, on the coordinator
// thread: the write phase (this rank's data file, written and checksummed by
// a pool of I/O tasks from the staging buffer or straight from the tensors)
// and the collective commit (rank 0 writes the metadata and renames the
// directory into place once every rank reports success). Also SaveHandle,
// which waits for both. The format is described in docs/ckpt.md.
#include <algorithm>
#include <iterator>
#include <sstream>

#include "checkpoint_internal.h"
#include "crc32c.h"
#include "host_memory.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/core/tensor.h"
#include "tessera/core/thread_pool.h"

namespace tessera::ckpt {

using detail::all_gather_ints;
using detail::BounceSlots;
using detail::crc32c;
using detail::join_ranks;
using detail::kDirectAlign;
using detail::mib;
using detail::Progress;
using detail::rank_file_name;
using detail::round_up;
using detail::stream_copy;
using detail::wait_all;

namespace {

// The largest chunk a write task copies out of the tensors (see plan_chunks).
constexpr uint64_t kBounceChunkBytes = uint64_t{1} << 20;

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

std::string parent_of(const std::string& dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  auto slash = d.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : d.substr(0, slash);
}

int64_t broadcast_int(const std::shared_ptr<dist::ProcessGroup>& g, int64_t value) {
  if (!g || g->size() == 1) return value;
  at::Tensor t = at::full({1}, value, at::kLong);
  g->broadcast(t, 0).wait();
  return t.item<int64_t>();
}

}  // namespace

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
    m.rank_state.push_back(
        {rank_file_name(r), plan->file_bytes[r], rng_len, static_cast<uint32_t>(row[2])});
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
                                           mib(stats.bytes_total), " on ", world,
                                           " rank(s); blocked ", stats.blocked_seconds,
                                           " s, total ", stats.total_seconds, " s"));
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

}  // namespace tessera::ckpt
