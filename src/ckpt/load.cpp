// src/ckpt/load.cpp — loading: planning (which saved boxes feed which of
// this rank's chunks, cut into reads of bounded size), the parallel reads
// (checksummed, with direct I/O where the files allow it), the copy into
// place, the non-tensor state, and the agreement that makes a load succeed
// on every rank or on none. The format is described in docs/ckpt.md.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <atomic>
#include <cstring>

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
using detail::blocks_of;
using detail::BounceSlots;
using detail::crc32c;
using detail::decode_blob;
using detail::join_ranks;
using detail::kDirectAlign;
using detail::mib;
using detail::Progress;
using detail::rank_of;
using detail::round_up;
using detail::size_of;
using detail::strip_slash;
using detail::wait_all;
using dist::Box;

namespace {

// A load's direct reads: a few checksum blocks per read.
constexpr uint64_t kLoadPieceBytes = uint64_t{4} << 20;

// ---------------------------------------------------------------------------
// Regions: copying and cutting boxes, reading aligned ranges.

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
  const int64_t per =
      std::max<int64_t>(1, static_cast<int64_t>(max_bytes) / std::max<int64_t>(stride, 1));
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
const uint8_t* read_aligned(const ReadableFile& file, uint64_t base, uint64_t begin, uint64_t end,
                            uint8_t* slot, Read&& read) {
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
  Box region;            // global coordinates
  Box chunk;             // destination chunk's box
  int64_t chunk_origin;  // element offset of the chunk in the local flat tensor
  uint8_t* dest;         // local flat tensor's bytes
  int64_t es;
  // Other ranks load the same elements (a replicated layout): read through
  // the page cache, which serves the copies, not with direct I/O, which
  // would read them from the disk once per rank.
  bool shared;
};

// ---------------------------------------------------------------------------
// One rank's part of a load, in the order Checkpointer::load runs it: plan()
// the reads, read_all(), copy_back(), restore_rank_state(). Used by the
// caller's thread; read_all() runs read_task() on a pool of I/O threads,
// which share only the opened files (read-only by then), the bounce slots
// and the atomic byte count.
class RankLoad {
 public:
  // Reads the checkpoint's metadata: NotFound naming `dir` when it has none.
  RankLoad(std::string dir, int rank, int world, const LoadOptions& options,
           std::shared_ptr<Storage> storage)
      : dir_(std::move(dir)),
        rank_(rank),
        world_(world),
        options_(options),
        storage_(std::move(storage)),
        meta_(read_metadata(dir_, storage_)),
        block_(meta_.checksum_block),
        piece_bytes_(std::max(block_, (kLoadPieceBytes + block_ - 1) / block_ * block_)) {}

  // Checks every entry of `state` against the group and the metadata and
  // lists the reads that fill it; entries the checkpoint lacks go to
  // result.missing (with allow_missing; otherwise NotFound).
  void plan(State& state, LoadResult& result);
  // Runs every read on options.io_threads threads; the first failure is
  // rethrown once all have finished.
  void read_all();
  // Copies what was read into a staging tensor into its entry.
  void copy_back();
  // Step, data position, user values and (same world size only) this
  // rank's RNG states.
  void restore_rank_state(State& state, LoadResult& result);
  uint64_t bytes_read() const { return bytes_read_.load(); }

 private:
  // InvalidArgument naming the tensor and rank when `entry` does not fit
  // the group.
  void check_entry(const std::string& name, const Entry& entry) const;
  // The reads of one tensor; `name` is the key in meta_.tensors (tasks
  // point at it).
  void plan_entry(const std::string& name, const TensorMeta& tm, Entry& entry);
  // The reads filling one of this rank's chunks of tensor `name`.
  void plan_chunk(const std::string& name, const TensorMeta& tm, const dist::Chunk& chunk,
                  uint8_t* dest_bytes, int64_t es, bool shared);
  // The data file `file`, opened on first use. DataLoss naming the file,
  // `tensor` and the rank when it is missing.
  ReadableFile* file_for(const std::string& file, const std::string& tensor);
  // One read task: reads, verifies and places its region.
  void read_task(const ReadTask& t, BounceSlots& bounce, Progress& progress);
  // Reads `n` bytes at `from` within the task's saved box into `out`; a
  // DataLoss names the tensor and box too.
  void read_bytes(const ReadTask& t, uint64_t from, uint64_t n, uint8_t* out) const;
  // Checks the CRC-32C of the saved box's blocks in [from, to) (box byte
  // offsets, block-aligned), whose bytes are at `bytes`; DataLoss naming
  // the file, byte range, tensor and box on a mismatch.
  void verify_blocks(const ReadTask& t, uint64_t from, uint64_t to, const uint8_t* bytes) const;

  const std::string dir_;
  const int rank_, world_;
  const LoadOptions& options_;
  const std::shared_ptr<Storage> storage_;
  const Metadata meta_;
  const uint64_t block_;        // checksum block of the checkpoint
  const uint64_t piece_bytes_;  // a direct read: whole checksum blocks
  std::map<std::string, std::unique_ptr<ReadableFile>> files_;
  std::vector<ReadTask> tasks_;
  // Destination tensors that need a copy back (not CPU, not contiguous, or
  // another dtype than saved): (entry tensor, staging tensor).
  std::vector<std::pair<at::Tensor*, at::Tensor>> copy_back_;
  uint64_t total_bytes_ = 0;  // the tasks' spans, for progress
  std::atomic<uint64_t> bytes_read_{0};
};

ReadableFile* RankLoad::file_for(const std::string& file, const std::string& tensor) {
  auto& f = files_[file];
  if (!f) {
    try {
      f = storage_->open(dir_ + "/" + file);
    } catch (const NotFound&) {
      TESSERA_THROW(DataLoss, "checkpoint '", dir_, "': data file '", file,
                    "' is missing (needed for tensor '", tensor, "' on rank ", rank_, ")");
    }
  }
  return f.get();
}

void RankLoad::check_entry(const std::string& name, const Entry& entry) const {
  const dist::Layout& layout = entry.layout;
  TESSERA_CHECK(entry.local.defined(), InvalidArgument, "checkpoint load: tensor '", name,
                "' on rank ", rank_, " is undefined");
  TESSERA_CHECK(layout.world_size() == world_, InvalidArgument, "checkpoint load: tensor '", name,
                "' has a layout over ", layout.world_size(), " ranks but the group has ", world_);
  TESSERA_CHECK(entry.local.numel() == layout.local_numel(rank_), InvalidArgument,
                "checkpoint load: tensor '", name, "' on rank ", rank_, " has ",
                entry.local.numel(), " elements but its layout gives this rank ",
                layout.local_numel(rank_));
}

void RankLoad::plan(State& state, LoadResult& result) {
  for (auto& [name, entry] : state.entries) {
    check_entry(name, entry);
    auto it = meta_.tensors.find(name);
    if (it == meta_.tensors.end()) {
      TESSERA_CHECK(options_.allow_missing, NotFound, "checkpoint '", dir_, "' has no tensor '",
                    name, "'");
      result.missing.push_back(name);
      continue;
    }
    plan_entry(it->first, it->second, entry);
  }
}

void RankLoad::plan_entry(const std::string& name, const TensorMeta& tm, Entry& entry) {
  const dist::Layout& layout = entry.layout;
  TESSERA_CHECK(tm.shape == layout.global_shape(), InvalidArgument, "checkpoint '", dir_,
                "': tensor '", name, "' was saved with shape ", shape_string(tm.shape),
                " but is loaded with shape ", shape_string(layout.global_shape()));
  const at::ScalarType saved_dtype = parse_dtype(tm.dtype);
  const int64_t es = static_cast<int64_t>(dtype_size(saved_dtype));
  at::Tensor dest = entry.local;
  if (!(dest.device().is_cpu() && dest.is_contiguous() && dest.scalar_type() == saved_dtype)) {
    dest = at::empty({entry.local.numel()}, at::TensorOptions().dtype(saved_dtype));
    copy_back_.emplace_back(&entry.local, dest);
  }
  auto* dest_bytes = static_cast<uint8_t*>(dest.data_ptr());
  int64_t held = 0;
  for (int r = 0; r < world_; ++r) held += layout.local_numel(r);
  const bool shared = held > layout.global_numel();
  for (const auto& chunk : layout.chunks(rank_)) {
    plan_chunk(name, tm, chunk, dest_bytes, es, shared);
  }
}

void RankLoad::plan_chunk(const std::string& name, const TensorMeta& tm, const dist::Chunk& chunk,
                          uint8_t* dest_bytes, int64_t es, bool shared) {
  int64_t covered = 0;
  for (const auto& sb : tm.boxes) {
    Box inter = dist::intersect(chunk.box, sb.box);
    if (inter.numel() == 0) continue;
    covered += inter.numel();
    TESSERA_CHECK(sb.byte_length == static_cast<uint64_t>(sb.box.numel() * es) &&
                      sb.crc32c.size() == static_cast<size_t>(blocks_of(sb.byte_length, block_)),
                  DataLoss, "checkpoint '", dir_, "': metadata of tensor '", name, "' box ",
                  sb.box.to_string(), " is inconsistent (byte length or checksum count)");
    ReadableFile* f = file_for(sb.file, name);
    std::vector<Box> pieces;
    split_region(sb.box, inter, es, options_.max_read_bytes, pieces);
    for (auto& p : pieces) {
      auto [a, b] = span_in(sb.box, p);
      total_bytes_ += static_cast<uint64_t>((b - a) * es);
      tasks_.push_back(
          {f, &name, &sb, std::move(p), chunk.box, chunk.local_offset, dest_bytes, es, shared});
    }
  }
  TESSERA_CHECK(covered == chunk.box.numel(), DataLoss, "checkpoint '", dir_, "': tensor '", name,
                "': the saved boxes cover ", covered, " of the ", chunk.box.numel(),
                " elements of ", chunk.box.to_string(), " that rank ", rank_, " needs");
}

void RankLoad::read_all() {
  Progress progress("loading " + dir_, total_bytes_);
  // Reads straight into a destination go through per-thread bounce slots
  // with direct I/O when the files allow it (see read_aligned).
  const size_t threads = std::max<size_t>(1, options_.io_threads);
  const uint64_t slot_bytes = round_up(piece_bytes_, kDirectAlign) + 2 * kDirectAlign;
  bool direct_files = false;
  for (const ReadTask& t : tasks_) direct_files |= !t.shared && t.file->direct_alignment() > 0;
  BounceSlots bounce = direct_files ? BounceSlots(threads, slot_bytes) : BounceSlots();
  ThreadPool pool(threads);
  std::vector<std::future<void>> done;
  done.reserve(tasks_.size());
  for (const ReadTask& t : tasks_) {
    done.push_back(pool.submit([&, t] { read_task(t, bounce, progress); }));
  }
  wait_all(done);
}

void RankLoad::read_bytes(const ReadTask& t, uint64_t from, uint64_t n, uint8_t* out) const {
  const SavedBox& sb = *t.saved;
  try {
    t.file->read_at(sb.byte_offset + from, n, out);
  } catch (const DataLoss& e) {
    TESSERA_THROW(DataLoss, e.message(), " (tensor '", *t.tensor, "', box ", sb.box.to_string(),
                  ")");
  }
}

void RankLoad::verify_blocks(const ReadTask& t, uint64_t from, uint64_t to,
                             const uint8_t* bytes) const {
  if (!options_.verify_checksums) return;
  const SavedBox& sb = *t.saved;
  for (uint64_t off = from; off < to; off += block_) {
    const uint64_t n = std::min(block_, sb.byte_length - off);
    const uint32_t got = crc32c(bytes + (off - from), n);
    const uint32_t want = sb.crc32c[off / block_];
    TESSERA_CHECK(got == want, DataLoss, "checkpoint '", dir_, "': checksum mismatch in '", sb.file,
                  "' at bytes [", sb.byte_offset + off, ", ", sb.byte_offset + off + n,
                  ") of tensor '", *t.tensor, "' box ", sb.box.to_string(), ": stored crc32c ",
                  want, ", computed ", got, "; the file is corrupt");
  }
}

void RankLoad::read_task(const ReadTask& t, BounceSlots& bounce, Progress& progress) {
  const SavedBox& sb = *t.saved;
  const uint64_t block = block_;
  auto [first, last] = span_in(sb.box, t.region);
  // Round out to whole checksum blocks so every byte used is verified.
  const uint64_t lo = static_cast<uint64_t>(first * t.es) / block * block;
  const uint64_t hi =
      std::min(sb.byte_length, (static_cast<uint64_t>(last * t.es) + block - 1) / block * block);
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
  auto read = [&](uint64_t from, uint64_t n, uint8_t* out) { read_bytes(t, from, n, out); };
  if (direct && !t.shared && !bounce.empty()) {
    // Through this thread's bounce slot with direct I/O, a few
    // checksum blocks at a time, then into the destination.
    BounceSlots::Slot slot = bounce.take();
    for (uint64_t p = lo; p < hi; p += piece_bytes_) {
      const uint64_t q = std::min(hi, p + piece_bytes_);
      const uint8_t* got = read_aligned(*t.file, sb.byte_offset, sb.byte_offset + p,
                                        sb.byte_offset + q, slot.data(), read);
      verify_blocks(t, p, q, got);
      std::memcpy(direct + (p - lo), got, q - p);
    }
    bytes_read_ += hi - lo;
    progress.add(hi - lo);
    return;
  }
  std::unique_ptr<uint8_t[]> owned;
  if (!direct) owned = std::make_unique<uint8_t[]>(hi - lo);
  uint8_t* buf_ptr = direct ? direct : owned.get();
  read(lo, hi - lo, buf_ptr);
  verify_blocks(t, lo, hi, buf_ptr);
  if (!direct) {
    copy_region(buf_ptr, sb.box, static_cast<int64_t>(lo) / t.es, t.dest, t.chunk, t.chunk_origin,
                t.region, t.es);
  }
  bytes_read_ += hi - lo;
  progress.add(hi - lo);
}

void RankLoad::copy_back() {
  translate_errors("checkpoint '" + dir_ + "': copying loaded tensors into place", [&] {
    at::NoGradGuard no_grad;
    for (auto& [local, staged] : copy_back_) local->copy_(staged.view(local->sizes()));
  });
}

void RankLoad::restore_rank_state(State& state, LoadResult& result) {
  state.step = meta_.step;
  state.data_position = meta_.data_position;
  state.user = meta_.user;
  if (meta_.world_size == world_ && rank_ < static_cast<int>(meta_.rank_state.size())) {
    const RankBlob& rb = meta_.rank_state[rank_];
    std::string blob(rb.byte_length, '\0');
    file_for(rb.file, "<rng state>")->read_at(rb.byte_offset, rb.byte_length, blob.data());
    TESSERA_CHECK(crc32c(blob.data(), blob.size()) == rb.crc32c, DataLoss, "checkpoint '", dir_,
                  "': checksum mismatch in the RNG state of rank ", rank_, " in '", rb.file, "'");
    state.rng = decode_blob(blob, dir_ + "/" + rb.file);
    result.rng_restored = true;
    bytes_read_ += rb.byte_length;
  }
}

// All-or-nothing: every rank learns whether every other rank succeeded.
// Rethrows this rank's `error`, or throws Aborted naming the ranks that
// failed.
void agree_on_load(const std::shared_ptr<dist::ProcessGroup>& group, std::exception_ptr error,
                   const std::string& dir, int world) {
  std::vector<int64_t> oks = all_gather_ints(group, {error ? 0 : 1});
  if (error) std::rethrow_exception(error);
  std::vector<int> failed;
  for (int r = 0; r < world; ++r) {
    if (oks[r] != 1) failed.push_back(r);
  }
  TESSERA_CHECK(failed.empty(), Aborted, "loading checkpoint '", dir, "' failed on rank(s) ",
                join_ranks(failed), " (see their errors)");
}

}  // namespace

// ---------------------------------------------------------------------------
// Checkpointer: load

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
    RankLoad load(dir, rank, world, options, storage);
    load.plan(state, result);
    load.read_all();
    load.copy_back();
    load.restore_rank_state(state, result);
    result.bytes_read = load.bytes_read();
  } catch (...) {
    error = std::current_exception();
  }
  agree_on_load(group, error, dir, world);
  result.seconds = watch.seconds();
  if (rank == 0) {
    const bool slow = result.seconds >= 1.0;
    if (log::enabled("ckpt", slow ? log::Level::kInfo : log::Level::kDebug)) {
      log::write("ckpt", slow ? log::Level::kInfo : log::Level::kDebug,
                 ::tessera::detail::concat("loaded '", dir, "': ", state.entries.size(),
                                           " tensors, ", mib(result.bytes_read),
                                           " read by rank 0 in ", result.seconds, " s"));
    }
  }
  return result;
}

LoadResult load(const std::string& dir, State& state,
                const std::shared_ptr<dist::ProcessGroup>& group, const LoadOptions& options) {
  return Checkpointer().load(dir, state, group, options);
}

}  // namespace tessera::ckpt
