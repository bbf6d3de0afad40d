// src/ckpt/save.cpp — the save's first stage, on the caller's thread: the
// State, checking it and agreeing on it across ranks, the save plan (which
// rank writes which box where) and staging (the snapshot into host memory).
// The write phase and the commit then run on the coordinator thread
// (commit.cpp). The format is described in docs/ckpt.md.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <sstream>

#include "checkpoint_internal.h"
#include "host_memory.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/tensor.h"
#include "tessera/core/thread_pool.h"

namespace tessera::ckpt {

using detail::all_gather_ints;
using detail::blocks_of;
using detail::encode_blob;
using detail::PlanBox;
using detail::rank_file_name;
using detail::rank_of;
using detail::SavePlan;
using detail::size_of;
using detail::StagingPool;
using detail::stream_copy;
using detail::strip_slash;
using dist::Box;

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
// Save plan: which rank writes which distinct box where (detail::SavePlan).
// A pure function of the layouts, so every rank computes the same plan
// without talking.

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

// ---------------------------------------------------------------------------
// The steps of Checkpointer::start_save, in order.

// Step 1: the save's state with its arguments checked (directory, checksum
// block, control group); nothing is shared with other ranks yet.
std::shared_ptr<SaveHandle::Impl> new_save(const std::string& dir_in,
                                           const std::shared_ptr<dist::ProcessGroup>& group,
                                           const SaveOptions& options) {
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
    TESSERA_CHECK(
        options.control_group->size() == s->world && options.control_group->rank() == s->rank,
        InvalidArgument, "checkpoint save: the control group (rank ", options.control_group->rank(),
        " of ", options.control_group->size(),
        ") must have the same ranks as the save group (rank ", s->rank, " of ", s->world, ")");
  }
  return s;
}

// Step 2: validate locally, then agree: every rank learns whether all are
// consistent before anything touches the disk. Sets the save's nonce (rank
// 0's) and temporary directory; returns the state's fingerprint, the same
// on every rank (the key of the cached plan).
uint64_t agree_on_state(SaveHandle::Impl& s, const State& state) {
  const SaveOptions& options = s.options;
  uint64_t fp = 0;
  std::exception_ptr local_error;
  try {
    fp = fingerprint_state(state, s.rank, s.world, options.checksum_block);
  } catch (...) {
    local_error = std::current_exception();
  }
  std::random_device rd;
  const uint64_t nonce = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  const bool exists = s.rank == 0 && s.storage->exists(s.dir);
  std::vector<int64_t> all =
      all_gather_ints(s.group, {local_error ? 0 : 1, static_cast<int64_t>(fp),
                                static_cast<int64_t>(nonce >> 1), exists ? 1 : 0});
  if (local_error) std::rethrow_exception(local_error);
  for (int r = 0; r < s.world; ++r) {
    TESSERA_CHECK(all[4 * r] == 1, InvalidArgument, "checkpoint '", s.dir, "': rank ", r,
                  " rejected its state (see its error); nothing was written");
    TESSERA_CHECK(all[4 * r + 1] == all[1], InvalidArgument, "checkpoint '", s.dir, "': rank ", r,
                  "'s state differs from rank 0's (tensor names, dtypes or layouts)");
  }
  TESSERA_CHECK(all[3] == 0 || options.overwrite, FailedPrecondition, "checkpoint '", s.dir,
                "' already exists (set SaveOptions::overwrite to replace it)");
  s.nonce = static_cast<uint64_t>(all[2]);
  std::ostringstream tmp;
  tmp << s.dir << ".tmp-" << std::hex << s.nonce;
  s.tmp_dir = tmp.str();
  return fp;
}

// Step 3: what rank 0 writes into the metadata, copied: the caller may
// change `state` once save_async returns.
void copy_metadata(SaveHandle::Impl& s, const State& state) {
  s.step = state.step;
  s.data_position = state.data_position;
  s.user = state.user;
  for (const auto& [name, entry] : state.entries) s.attrs.push_back(entry.attrs);
}

// Step 4a (no snapshot): the data file's segments point into the tensors'
// memory (contiguous CPU tensors), which the save keeps alive, then the RNG
// blob.
void point_at_tensors(SaveHandle::Impl& s, std::vector<at::Tensor> flats, std::string blob) {
  const SavePlan& plan = *s.plan;
  for (const auto& pb : plan.boxes) {
    if (pb.writer != s.rank || pb.bytes == 0) continue;
    const at::Tensor& flat = flats[pb.entry];
    const auto* src = static_cast<const uint8_t*>(flat.data_ptr());
    s.segments.push_back(
        {pb.byte_offset, pb.bytes,
         src + pb.writer_local_offset * static_cast<int64_t>(flat.element_size())});
  }
  s.sources = std::move(flats);
  s.rng_blob = std::move(blob);
  s.segments.push_back(
      {plan.file_bytes[s.rank], s.rng_bytes, reinterpret_cast<const uint8_t*>(s.rng_blob.data())});
}

// Step 4b (snapshot): copies this rank's boxes, then its RNG blob, into a
// staging buffer from `pool` (page-locked when a tensor is on a device)
// laid out exactly as the data file; one segment covers it all.
void copy_to_staging(SaveHandle::Impl& s, StagingPool& pool, std::vector<at::Tensor>& flats,
                     const std::string& blob, bool any_cuda) {
  const SavePlan& plan = *s.plan;
  const uint64_t tensor_bytes = plan.file_bytes[s.rank];
  s.staging = pool.acquire(tensor_bytes + blob.size(), any_cuda && cuda_available());
  uint8_t* base = s.staging.get();
  s.segments.push_back({0, tensor_bytes + blob.size(), base});
  translate_errors("checkpoint '" + s.dir + "': copying tensors to host", [&] {
    at::NoGradGuard no_grad;
    for (const auto& pb : plan.boxes) {
      if (pb.writer != s.rank) continue;
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

// Step 4: snapshot: this rank's boxes, then its RNG blob, into one host
// buffer laid out exactly as the data file. A synchronous save of CPU
// tensors skips the snapshot (the caller is waiting anyway), and so does a
// deferred copy: the write tasks read the tensors' memory.
void stage(SaveHandle::Impl& s, const State& state, StagingPool& pool, bool direct) {
  std::string blob = encode_blob(state.rng);
  s.rng_bytes = blob.size();
  bool any_cuda = false;
  for (const auto& [name, entry] : state.entries) any_cuda |= !entry.local.device().is_cpu();
  std::vector<at::Tensor> flats;
  for (const auto& [name, entry] : state.entries) flats.push_back(entry.local.reshape({-1}));
  direct |= s.options.defer_copy;
  if (direct && !any_cuda) {
    for (const at::Tensor& flat : flats) direct &= flat.is_contiguous();
  } else {
    direct = false;
  }
  s.from_tensors = direct;
  if (direct) {
    point_at_tensors(s, std::move(flats), std::move(blob));
  } else {
    copy_to_staging(s, pool, flats, blob, any_cuda);
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Staging buffers

namespace detail {

std::shared_ptr<uint8_t> StagingPool::acquire(uint64_t bytes, bool pinned) {
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

}  // namespace detail

// ---------------------------------------------------------------------------
// Checkpointer: save

struct Checkpointer::Impl {
  std::shared_ptr<StagingPool> pool = std::make_shared<StagingPool>();
  std::map<uint64_t, std::shared_ptr<const SavePlan>> plans;  // used by the caller's thread only
  // The coordinator runs each save's write phase (and, with a control
  // group, its commit) in submission order. Declared last: destroyed first,
  // finishing queued saves while the members above still exist.
  ThreadPool coordinator{1};
};

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
  std::shared_ptr<SaveHandle::Impl> s = new_save(dir_in, group, options);
  const uint64_t fp = agree_on_state(*s, state);

  auto& cached = impl_->plans[fp];
  if (!cached) cached = build_plan(state, s->world, options.checksum_block);
  s->plan = cached;
  const SavePlan& plan = *s->plan;

  copy_metadata(*s, state);
  s->pool = impl_->pool;
  stage(*s, state, *impl_->pool, direct);
  s->plan_chunks();
  s->phase(SavePhase::kStaged);
  {
    std::lock_guard<std::mutex> lock(s->mu);
    s->stats.blocked_seconds = blocked.seconds();
    if (s->staging) s->stats.bytes_copied = plan.file_bytes[s->rank] + s->rng_bytes;
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

void save(const std::string& dir, const State& state,
          const std::shared_ptr<dist::ProcessGroup>& group, const SaveOptions& options) {
  Checkpointer().save(dir, state, group, options);
}

}  // namespace tessera::ckpt
