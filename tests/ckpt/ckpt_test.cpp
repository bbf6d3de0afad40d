// Checkpoint save/load in one process: the format, resharding between
// layouts and world sizes (ranks as threads over an in-memory store), fault
// handling and retention. tests/ckpt/ckpt_launch_test.cpp runs the same
// logic with real processes.
#include "tessera/ckpt/checkpoint.h"
#include "tessera/ckpt_nn/model_state.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "../../src/ckpt/crc32c.h"
#include "tessera/core/error.h"
#include "tessera/dist/redistribute.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/nn/train.h"

namespace fs = std::filesystem;

namespace tessera::ckpt {
namespace {

using dist::Layout;
using dist::MeshShape;
using dist::Placement;

class CkptTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(::testing::TempDir()) /
            ("tessera_ckpt_" + std::to_string(getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  // Every committed checkpoint a test wrote verifies (all checksums and
  // sizes) and its metadata survives a JSON round trip, as `tessera-ckpt
  // verify` and `inspect --json` need (the tool itself runs in
  // ckpt_launch_test).
  void TearDown() override {
    for (const auto& entry : fs::recursive_directory_iterator(root_)) {
      if (entry.path().filename() != kMetadataFile) continue;
      const std::string dir = entry.path().parent_path().string();
      VerifyReport report = verify(dir);
      EXPECT_TRUE(report.ok()) << dir << ": " << (report.ok() ? "" : report.errors[0]);
      Metadata m = read_metadata(dir);
      EXPECT_EQ(Metadata::parse(m.to_json(), dir).to_json(), m.to_json()) << dir;
    }
    fs::remove_all(root_);
  }
  std::string path(const std::string& name) const { return (root_ / name).string(); }
  fs::path root_;
};

// Runs fn(group) on `world` threads, each a rank of one in-process group.
void run_ranks(int world, const std::function<void(std::shared_ptr<dist::ProcessGroup>)>& fn) {
  dist::ProcessGroupOptions opts;
  opts.timeout = std::chrono::seconds(30);
  dist::run_thread_ranks(world, fn, opts);
}

at::Tensor full_tensor(int seed, std::vector<int64_t> shape, at::ScalarType dtype = at::kFloat) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen).to(dtype);
}

// The tensors of the test state: global values and how each is laid out.
struct Spec {
  std::string name;
  at::Tensor full;
};

std::vector<Spec> specs() {
  return {{"a.weight", full_tensor(1, {10, 6})},
          {"b.weight", full_tensor(2, {7, 5}, at::kBFloat16)},
          {"c.bias", full_tensor(3, {9})},
          {"d.count", at::arange(12, at::kLong).view({3, 4})}};
}

// A tp x dp world: rows/cols sharded over tp, replicated over dp, or ZeRO
// flat over dp of each tp shard (the optimizer-state layout).
Layout layout_for(const Spec& s, int tp, int dp, bool flat) {
  MeshShape mesh{{dp, tp}, {"dp", "tp"}};
  auto shape = s.full.sizes().vec();
  Placement split =
      shape.size() == 2 && s.name[0] == 'b' ? Placement::Shard(1) : Placement::Shard(0);
  std::vector<Placement> pl{Placement::Replicate(), split};
  return flat ? Layout::sharded_flat(shape, mesh, pl, "dp") : Layout::sharded(shape, mesh, pl);
}

State make_state(int rank, int tp, int dp, bool flat, bool fill) {
  State st;
  for (const auto& s : specs()) {
    Layout l = layout_for(s, tp, dp, flat);
    at::Tensor local = fill ? dist::extract_local(l, rank, s.full)
                            : at::full(l.local_shape(rank), 99, s.full.scalar_type());
    st.add(s.name, local, l, {{"kind", "test"}});
  }
  return st;
}

void expect_state_equals_reference(const State& st, int rank) {
  for (const auto& s : specs()) {
    const Entry& e = st.entries.at(s.name);
    at::Tensor want = dist::extract_local(e.layout, rank, s.full);
    EXPECT_TRUE(at::equal(e.local.reshape({-1}), want.reshape({-1})))
        << s.name << " on rank " << rank;
  }
}

TEST(Crc32c, KnownVectors) {
  const char* digits = "123456789";
  EXPECT_EQ(detail::crc32c(digits, 9), 0xE3069283u);
  EXPECT_EQ(detail::crc32c("", 0), 0u);
  // Incremental equals one-shot.
  std::string text(1000, 'x');
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<char>(i * 7);
  uint32_t part = detail::crc32c(text.data(), 333);
  EXPECT_EQ(detail::crc32c(text.data() + 333, text.size() - 333, part),
            detail::crc32c(text.data(), text.size()));
}

TEST_F(CkptTest, SingleRankRoundTripOfEveryKindOfState) {
  State st;
  at::Tensor w = full_tensor(5, {4, 3});
  at::Tensor h = full_tensor(6, {5}, at::kHalf);
  at::Tensor scalar = at::full({}, 42, at::kLong);
  at::Tensor empty = at::empty({0, 3});
  st.add_replicated("w", w, 1);
  st.add_replicated("h", h, 1);
  st.add_replicated("scalar", scalar, 1);
  st.add_replicated("empty", empty, 1);
  st.add_replicated("strided", w.t(), 1);  // non-contiguous source
  st.step = 1234;
  st.data_position = 98765;
  st.rng = {{"cpu", std::string("\x01\x00\x02", 3)}, {"cuda", "zz"}};
  st.user = {{"run", "abc"}};
  const std::string dir = step_dir(path("root"), 1234);
  save(dir, st, nullptr);

  State got;
  got.add_replicated("w", at::zeros({4, 3}), 1);
  got.add_replicated("h", at::zeros({5}, at::kHalf), 1);
  got.add_replicated("scalar", at::zeros({}, at::kLong), 1);
  got.add_replicated("empty", at::zeros({0, 3}), 1);
  got.add_replicated("strided", at::zeros({4, 3}).t(), 1);  // non-contiguous destination
  LoadResult r = load(dir, got, nullptr);
  EXPECT_TRUE(at::equal(got.entries.at("w").local, w));
  EXPECT_TRUE(at::equal(got.entries.at("h").local, h));
  EXPECT_EQ(got.entries.at("scalar").local.item<int64_t>(), 42);
  EXPECT_TRUE(at::equal(got.entries.at("strided").local, w.t()));
  EXPECT_EQ(got.step, 1234);
  EXPECT_EQ(got.data_position, 98765);
  EXPECT_EQ(got.rng, st.rng);
  EXPECT_TRUE(r.rng_restored);
  EXPECT_EQ(got.user.at("run"), "abc");
  EXPECT_EQ(latest(path("root")).value(), dir);

  Metadata m = read_metadata(dir);
  EXPECT_EQ(m.format_version, 1);
  EXPECT_EQ(m.tensors.at("h").dtype, "float16");
  EXPECT_TRUE(verify(dir).ok());
}

TEST_F(CkptTest, LoadConvertsDtypeAndReportsMissingTensors) {
  State st;
  at::Tensor w = full_tensor(7, {6, 2});
  st.add_replicated("w", w, 1);
  save(path("c"), st, nullptr);
  State got;
  got.add_replicated("w", at::zeros({6, 2}, at::kDouble), 1);
  got.add_replicated("not_there", at::zeros({1}), 1);
  try {
    load(path("c"), got, nullptr);
    FAIL() << "no throw";
  } catch (const NotFound& e) {
    EXPECT_NE(e.message().find("'not_there'"), std::string::npos) << e.message();
  }
  LoadOptions opts;
  opts.allow_missing = true;
  LoadResult r = load(path("c"), got, nullptr, opts);
  EXPECT_EQ(r.missing, std::vector<std::string>{"not_there"});
  EXPECT_TRUE(at::equal(got.entries.at("w").local, w.to(at::kDouble)));
  // Shape mismatch names the tensor.
  State bad;
  bad.add_replicated("w", at::zeros({3, 4}), 1);
  EXPECT_THROW(load(path("c"), bad, nullptr), InvalidArgument);
}

// Save at world 4 (tp2 x dp2), regular and ZeRO flat; load at 1, 2 (as tp1 x
// dp2 flat and as tp2 regular) and 3 ranks: bit-identical to the reference.
TEST_F(CkptTest, ReshardsBetweenWorldSizesAndLayouts) {
  for (bool flat_save : {false, true}) {
    SCOPED_TRACE(flat_save ? "saved flat" : "saved regular");
    const std::string dir = path(flat_save ? "flat" : "regular");
    run_ranks(4, [&](std::shared_ptr<dist::ProcessGroup> g) {
      State st = make_state(g->rank(), 2, 2, flat_save, true);
      st.step = 7;
      SaveOptions opts;
      opts.io_threads = 2;
      opts.checksum_block = 64;  // many blocks even for tiny tensors
      save(dir, st, g, opts);
    });
    struct Target {
      int tp, dp;
      bool flat;
    };
    for (Target t : {Target{1, 1, false}, Target{1, 2, true}, Target{2, 1, false},
                     Target{1, 3, true}, Target{3, 1, false}, Target{2, 2, true}}) {
      SCOPED_TRACE("tp" + std::to_string(t.tp) + " dp" + std::to_string(t.dp) +
                   (t.flat ? " flat" : ""));
      run_ranks(t.tp * t.dp, [&](std::shared_ptr<dist::ProcessGroup> g) {
        int rank = g ? g->rank() : 0;
        State st = make_state(rank, t.tp, t.dp, t.flat, false);
        LoadOptions opts;
        opts.io_threads = 3;
        opts.max_read_bytes = 48;  // force split reads
        LoadResult r = load(dir, st, g, opts);
        EXPECT_EQ(st.step, 7);
        EXPECT_EQ(r.rng_restored, t.tp * t.dp == 4);
        expect_state_equals_reference(st, rank);
      });
    }
  }
}

TEST_F(CkptTest, ReplicatedBoxesAreWrittenOnceAndSpreadOverRanks) {
  const std::string dir = path("rep");
  run_ranks(4, [&](std::shared_ptr<dist::ProcessGroup> g) {
    State st;
    // Eight equal tensors replicated on all four ranks: two per rank.
    for (int i = 0; i < 8; ++i) {
      st.add_replicated("t" + std::to_string(i), full_tensor(i, {16, 16}), 4);
    }
    save(dir, st, g);
  });
  Metadata m = read_metadata(dir);
  std::map<std::string, uint64_t> per_file;
  for (const auto& [name, t] : m.tensors) {
    ASSERT_EQ(t.boxes.size(), 1u) << name;
    EXPECT_EQ(t.boxes[0].ranks, (std::vector<int>{0, 1, 2, 3}));
    per_file[t.boxes[0].file] += t.boxes[0].byte_length;
  }
  ASSERT_EQ(per_file.size(), 4u);
  for (const auto& [file, bytes] : per_file) EXPECT_EQ(bytes, 2u * 16 * 16 * 4) << file;
}

TEST_F(CkptTest, PartialLoadReadsOnlyOverlappingBlocks) {
  State st;
  at::Tensor big = full_tensor(9, {256, 64});  // 64 KiB
  st.add_replicated("big", big, 1);
  SaveOptions so;
  so.checksum_block = 1024;
  save(path("p"), st, nullptr, so);
  // One of 8 row shards: 8 KiB of the 64 KiB.
  run_ranks(8, [&](std::shared_ptr<dist::ProcessGroup> g) {
    State want;
    Layout rows = Layout::sharded({256, 64}, MeshShape{{8}, {"tp"}}, {Placement::Shard(0)});
    want.add("big", at::zeros(rows.local_shape(g->rank())), rows);
    LoadResult r = load(path("p"), want, g);
    EXPECT_EQ(r.bytes_read, 8192u);
    EXPECT_TRUE(at::equal(want.entries.at("big").local, dist::extract_local(rows, g->rank(), big)));
  });
}

TEST_F(CkptTest, InconsistentStatesAcrossRanksAreRejectedBeforeWriting) {
  const std::string dir = path("bad");
  std::atomic<int> rejected{0};
  run_ranks(2, [&](std::shared_ptr<dist::ProcessGroup> g) {
    State st;
    st.add_replicated(g->rank() == 0 ? "x" : "y", at::zeros({2}), 2);
    try {
      save(dir, st, g);
    } catch (const InvalidArgument& e) {
      EXPECT_NE(e.message().find("rank 1"), std::string::npos) << e.message();
      rejected++;
    }
  });
  EXPECT_EQ(rejected.load(), 2);
  EXPECT_FALSE(fs::exists(dir));
}

TEST_F(CkptTest, AsyncSaveSnapshotsAndReusesStaging) {
  Checkpointer ck;
  at::Tensor w = full_tensor(11, {32, 8});
  State st;
  st.add_replicated("w", w, 1);
  std::vector<SaveHandle> handles;
  std::vector<at::Tensor> snapshots;
  for (int step = 0; step < 4; ++step) {
    st.step = step;
    snapshots.push_back(w.clone());
    handles.push_back(ck.save_async(step_dir(path("root"), step), st, nullptr));
    w.add_(1);  // training continues: the save must have its own copy
  }
  for (auto& h : handles) h.wait();
  EXPECT_GE(handles[0].stats().bytes_total, 32u * 8 * 4);
  for (int step = 0; step < 4; ++step) {
    State got;
    got.add_replicated("w", at::zeros({32, 8}), 1);
    load(step_dir(path("root"), step), got, nullptr);
    EXPECT_TRUE(at::equal(got.entries.at("w").local, snapshots[step])) << step;
    EXPECT_EQ(got.step, step);
  }
}

// Local storage whose data-file writes wait at a gate once `free_writes`
// have gone through, so a test can hold a save in the middle of writing.
class GatedStorage : public Storage {
 public:
  explicit GatedStorage(int free_writes) : free_writes_(free_writes) {}
  void open_gate() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  int writes() const { return writes_.load(); }

  std::unique_ptr<WritableFile> create(const std::string& path) override {
    class File : public WritableFile {
     public:
      File(GatedStorage* owner, std::unique_ptr<WritableFile> inner)
          : owner_(owner), inner_(std::move(inner)) {}
      void write_at(uint64_t offset, const void* data, size_t size) override {
        owner_->pass_gate();
        inner_->write_at(offset, data, size);
      }
      void sync() override { inner_->sync(); }
      void close() override { inner_->close(); }
      const std::string& path() const override { return inner_->path(); }

     private:
      GatedStorage* owner_;
      std::unique_ptr<WritableFile> inner_;
    };
    return std::make_unique<File>(this, local_->create(path));
  }
  std::unique_ptr<ReadableFile> open(const std::string& path) override {
    return local_->open(path);
  }
  std::string read_all(const std::string& path) override { return local_->read_all(path); }
  void create_dirs(const std::string& path) override { local_->create_dirs(path); }
  void rename(const std::string& from, const std::string& to) override { local_->rename(from, to); }
  void sync_dir(const std::string& path) override { local_->sync_dir(path); }
  std::vector<std::string> list(const std::string& dir) override { return local_->list(dir); }
  bool exists(const std::string& path) override { return local_->exists(path); }
  bool is_dir(const std::string& path) override { return local_->is_dir(path); }
  void remove_all(const std::string& path) override { local_->remove_all(path); }
  void remove_file(const std::string& path) override { local_->remove_file(path); }

 private:
  void pass_gate() {
    std::unique_lock<std::mutex> lock(mu_);
    if (writes_.fetch_add(1) >= free_writes_) cv_.wait(lock, [&] { return open_; });
  }
  std::shared_ptr<Storage> local_ = Storage::local();
  const int free_writes_;
  std::atomic<int> writes_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;  // guarded by mu_
};

TEST_F(CkptTest, DeferredCopyWritesFromTheTensorsAndCopiesOnlyTheRestOnRelease) {
  Checkpointer ck;
  at::Tensor w = full_tensor(12, {64, 256});  // 64 KiB: 16 chunks of 4 KiB
  const at::Tensor saved = w.clone();
  State st;
  st.add_replicated("w", w, 1);
  auto gated = std::make_shared<GatedStorage>(/*free_writes=*/3);
  SaveOptions opts;
  opts.storage = gated;
  opts.defer_copy = true;
  opts.io_threads = 2;
  opts.write_bytes = 4096;
  opts.checksum_block = 1024;
  SaveHandle h = ck.save_async(path("deferred"), st, nullptr, opts);
  EXPECT_EQ(h.stats().bytes_copied, 0u);  // nothing copied yet
  // Writes 4 and 5 now wait at the gate (their tasks copied their chunks
  // out of the tensor first); the other chunks were not started.
  while (gated->writes() < 5) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  h.release_tensors();  // copies those, without waiting for the disk
  w.fill_(-1);          // the next optimizer step: the save must not see this
  gated->open_gate();
  h.wait();
  const uint64_t tensor_bytes = 64 * 256 * 4;
  // Chunks 0-4 were written from the tensor; the rest (at least 10 chunks
  // of 4 KiB and the RNG blob) went through staging.
  EXPECT_GE(h.stats().bytes_copied, 10u * 4096);
  EXPECT_LT(h.stats().bytes_copied, tensor_bytes);
  h.release_tensors();  // again: no-op
  EXPECT_TRUE(h.valid());
  EXPECT_FALSE(SaveHandle().valid());

  State got;
  got.add_replicated("w", at::zeros({64, 256}), 1);
  load(path("deferred"), got, nullptr);
  EXPECT_TRUE(at::equal(got.entries.at("w").local, saved));
  EXPECT_TRUE(verify(path("deferred")).ok());
}

TEST_F(CkptTest, DeferredCopyNeedsNoReleaseWhenTheTensorsDoNotChange) {
  Checkpointer ck;
  at::Tensor w = full_tensor(13, {32, 32});
  State st;
  st.add_replicated("w", w, 1);
  SaveOptions opts;
  opts.defer_copy = true;
  SaveHandle h = ck.save_async(path("plain"), st, nullptr, opts);
  h.wait();
  h.release_tensors();  // after the writes: nothing left to copy
  EXPECT_EQ(h.stats().bytes_copied, 0u);
  State got;
  got.add_replicated("w", at::zeros({32, 32}), 1);
  load(path("plain"), got, nullptr);
  EXPECT_TRUE(at::equal(got.entries.at("w").local, w));
}

// Local files that never report direct I/O (as on a file system refusing
// O_DIRECT): every write and read goes through the page cache.
class BufferedStorage : public GatedStorage {
 public:
  BufferedStorage() : GatedStorage(std::numeric_limits<int>::max()) {}
  std::unique_ptr<ReadableFile> open(const std::string& path) override {
    class File : public ReadableFile {
     public:
      explicit File(std::unique_ptr<ReadableFile> inner) : inner_(std::move(inner)) {}
      void read_at(uint64_t offset, size_t size, void* out) const override {
        inner_->read_at(offset, size, out);
      }
      uint64_t size() const override { return inner_->size(); }
      const std::string& path() const override { return inner_->path(); }

     private:
      std::unique_ptr<ReadableFile> inner_;
    };
    return std::make_unique<File>(GatedStorage::open(path));
  }
};

TEST_F(CkptTest, StorageWithoutDirectIoSavesAndLoads) {
  auto storage = std::make_shared<BufferedStorage>();
  Checkpointer ck;
  at::Tensor w = full_tensor(14, {96, 300});  // ends off any 4 KiB boundary
  const at::Tensor saved = w.clone();
  State st;
  st.add_replicated("w", w, 1);
  SaveOptions opts;
  opts.storage = storage;
  ck.save(path("sync"), st, nullptr, opts);
  opts.defer_copy = true;
  SaveHandle h = ck.save_async(path("deferred"), st, nullptr, opts);
  h.release_tensors();
  w.fill_(3);
  h.wait();
  opts.defer_copy = false;
  ck.save_async(path("copied"), st, nullptr, opts).wait();
  LoadOptions lo;
  lo.storage = storage;
  for (const char* name : {"sync", "deferred"}) {
    State got;
    got.add_replicated("w", at::zeros({96, 300}), 1);
    ck.load(path(name), got, nullptr, lo);
    EXPECT_TRUE(at::equal(got.entries.at("w").local, saved)) << name;
  }
  State got;
  got.add_replicated("w", at::zeros({96, 300}), 1);
  ck.load(path("copied"), got, nullptr, lo);
  EXPECT_TRUE(at::equal(got.entries.at("w").local, at::full({96, 300}, 3.0f)));
}

TEST_F(CkptTest, AsyncSaveWithControlGroupCommitsInBackground) {
  const std::string dir = path("ctl");
  run_ranks(2, [&](std::shared_ptr<dist::ProcessGroup> g) {
    auto control = g->new_subgroup({0, 1}, "ckpt");
    Checkpointer ck;
    State st = make_state(g->rank(), 2, 1, false, true);
    SaveOptions opts;
    opts.control_group = control;
    SaveHandle h = ck.save_async(dir, st, g, opts);
    // The main group stays free for training collectives meanwhile.
    at::Tensor x = at::ones({4});
    g->all_reduce(x).wait();
    EXPECT_EQ(x[0].item<float>(), 2.0f);
    h.wait();
  });
  run_ranks(1, [&](std::shared_ptr<dist::ProcessGroup> g) {
    State st = make_state(0, 1, 1, false, false);
    load(dir, st, g);
    expect_state_equals_reference(st, 0);
  });
}

TEST_F(CkptTest, CrashDuringSaveLeavesPreviousCheckpointAndNothingNew) {
  const std::string root = path("root");
  State st = make_state(0, 1, 1, false, true);
  save(step_dir(root, 100), st, nullptr);
  for (SavePhase fail_at : {SavePhase::kStaged, SavePhase::kFileWritten, SavePhase::kFileSynced,
                            SavePhase::kBeforeCommit}) {
    SaveOptions opts;
    opts.on_phase = [fail_at](SavePhase p) {
      if (p == fail_at) throw Unavailable("injected failure");
    };
    EXPECT_THROW(save(step_dir(root, 200), st, nullptr, opts), Error);
    EXPECT_FALSE(fs::exists(step_dir(root, 200)));
    EXPECT_EQ(latest(root).value(), step_dir(root, 100));
  }
  State got = make_state(0, 1, 1, false, false);
  load(*latest(root), got, nullptr);
  expect_state_equals_reference(got, 0);
}

TEST_F(CkptTest, FailureOnOneRankAbortsTheSaveOnAll) {
  const std::string dir = path("one_fails");
  std::atomic<int> aborted{0}, own{0};
  run_ranks(3, [&](std::shared_ptr<dist::ProcessGroup> g) {
    State st = make_state(g->rank(), 1, 3, true, true);
    SaveOptions opts;
    if (g->rank() == 2) {
      opts.on_phase = [](SavePhase p) {
        if (p == SavePhase::kFileWritten) throw ResourceExhausted("injected: disk full");
      };
    }
    try {
      save(dir, st, g, opts);
    } catch (const Aborted& e) {
      EXPECT_NE(e.message().find("rank(s) 2"), std::string::npos) << e.message();
      aborted++;
    } catch (const ResourceExhausted&) {
      own++;
    }
  });
  EXPECT_EQ(aborted.load(), 2);
  EXPECT_EQ(own.load(), 1);
  EXPECT_FALSE(fs::exists(dir));
  for (const auto& e : fs::directory_iterator(root_)) ADD_FAILURE() << "left behind: " << e.path();
}

TEST_F(CkptTest, ExistingCheckpointIsNotOverwrittenUnlessAsked) {
  State st;
  st.add_replicated("w", at::ones({3}), 1);
  save(path("x"), st, nullptr);
  EXPECT_THROW(save(path("x"), st, nullptr), FailedPrecondition);
  st.entries.at("w").local.fill_(5);
  SaveOptions opts;
  opts.overwrite = true;
  save(path("x"), st, nullptr, opts);
  State got;
  got.add_replicated("w", at::zeros({3}), 1);
  load(path("x"), got, nullptr);
  EXPECT_EQ(got.entries.at("w").local[0].item<float>(), 5.0f);
}

TEST_F(CkptTest, RetentionKeepsTheNewestCompleteCheckpoints) {
  const std::string root = path("root");
  State st;
  st.add_replicated("w", at::ones({3}), 1);
  SaveOptions opts;
  opts.keep_last = 2;
  for (int64_t s : {10, 20, 30, 40}) save(step_dir(root, s), st, nullptr, opts);
  fs::create_directories(root + "/step_000000050.tmp-abc");  // an interrupted save
  fs::create_directories(root + "/step_000000060");          // no metadata: incomplete
  auto all = list_checkpoints(root);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0], step_dir(root, 30));
  EXPECT_EQ(latest(root).value(), step_dir(root, 40));
  EXPECT_FALSE(latest(path("nothing_here")).has_value());
  EXPECT_THROW(apply_retention(root, 0), InvalidArgument);
}

// nn::Trainer state through add_trainer / restore_trainer: a ZeRO-1 trainer
// at dp2 (ranks as threads) saves after 3 steps; a plain one-rank trainer
// and a fresh dp2 ZeRO-1 trainer (other initial weights) load it. The AdamW
// state and step counts arrive exactly; the ZeRO master slice (not saved for
// fp32 parameters) is rebuilt from the loaded parameters.
TEST_F(CkptTest, TrainerStateMovesBetweenZero1AndPlainAdamW) {
  nn::ModelConfig cfg;
  cfg.vocab_size = 37;
  cfg.hidden_size = 16;
  cfg.intermediate_size = 24;
  cfg.num_hidden_layers = 1;
  cfg.num_attention_heads = 2;
  cfg.num_key_value_heads = 2;
  nn::TrainerOptions opts;
  opts.steps = 3;
  opts.lr = 1e-2;
  opts.warmup = 1;
  const at::Tensor ids = at::arange(0, 4 * 9, at::kLong).remainder(cfg.vocab_size).view({4, 9});
  const std::string dir = path("trainer");
  std::vector<at::Tensor> saved_m(2);  // each rank's exp_avg slice
  std::map<std::string, at::Tensor> saved_params;
  run_ranks(2, [&](std::shared_ptr<dist::ProcessGroup> g) {
    nn::Transformer model(cfg);
    model.init_random(5);
    nn::TrainerOptions o = opts;
    o.zero1 = true;
    nn::Trainer trainer(model, o, g);
    const at::Tensor mine = ids.narrow(0, 2 * g->rank(), 2);
    for (int i = 0; i < 3; ++i) trainer.step(mine.narrow(1, 0, 8), mine.narrow(1, 1, 8));
    ModelState where{g->rank(), 2};
    State st;
    add_trainer(st, trainer, where);
    EXPECT_EQ(st.step, 3);
    int masters = 0, moments = 0;
    for (const auto& [name, e] : st.entries) {
      masters += name.rfind("optim.master/", 0) == 0;
      moments += name.rfind("optim.exp_avg/", 0) == 0;
    }
    EXPECT_EQ(masters, 0);  // fp32 parameters: rebuilt from them, not saved
    EXPECT_EQ(moments, static_cast<int>(model.named_parameters().size()));
    st.data_position = 3 * 4;
    save(dir, st, g);
    for (auto& [key, t] : trainer.optimizer().state_tensors()) {
      if (key == "exp_avg") saved_m[g->rank()] = t.clone();
    }
    if (g->rank() == 0) {
      for (const auto& [name, p] : model.named_parameters())
        saved_params[name] = p.detach().clone();
    }
  });

  // Plain AdamW on one rank: exp_avg.<i> is parameter i's part of the
  // concatenated ZeRO slices.
  {
    nn::Transformer model(cfg);
    model.init_random(6);
    nn::Trainer trainer(model, opts);
    State st;
    add_trainer(st, trainer, {0, 1});
    LoadResult r = load(dir, st, nullptr);
    restore_trainer(st, trainer, {0, 1}, r);
    EXPECT_EQ(trainer.steps(), 3);
    EXPECT_EQ(trainer.optimizer().steps(), 3);
    EXPECT_EQ(st.data_position, 12);
    at::Tensor all_m = at::cat(saved_m);
    int64_t off = 0;
    auto state = trainer.optimizer().state_tensors();
    const auto& params = model.named_parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& [name, p] = params[i];
      EXPECT_TRUE(at::equal(p.detach(), saved_params.at(name))) << name;
      ASSERT_EQ(state[i].first, "exp_avg." + std::to_string(i));
      EXPECT_TRUE(at::equal(state[i].second.reshape({-1}), all_m.narrow(0, off, p.numel())))
          << name;
      off += p.numel();
    }
  }

  // A trainer over adapter parameters is refused, not saved half-right.
  {
    nn::Transformer model(cfg);
    nn::Trainer adapters(model, opts, nullptr, {at::zeros({3})});
    State st;
    EXPECT_THROW(add_trainer(st, adapters, {0, 1}), InvalidArgument);
  }

  // A fresh ZeRO-1 trainer: its master slice follows the loaded parameters.
  run_ranks(2, [&](std::shared_ptr<dist::ProcessGroup> g) {
    nn::Transformer model(cfg);
    model.init_random(7);
    nn::TrainerOptions o = opts;
    o.zero1 = true;
    nn::Trainer trainer(model, o, g);
    ModelState where{g->rank(), 2};
    State st;
    add_trainer(st, trainer, where);
    LoadResult r = load(dir, st, g);
    restore_trainer(st, trainer, where, r);
    EXPECT_EQ(trainer.optimizer().steps(), 3);
    std::vector<at::Tensor> flat;
    for (const auto& [name, p] : model.named_parameters()) flat.push_back(p.detach().reshape({-1}));
    at::Tensor all = at::cat(flat);
    for (auto& [key, t] : trainer.optimizer().state_tensors()) {
      if (key == "exp_avg") {
        EXPECT_TRUE(at::equal(t, saved_m[g->rank()]));
      }
      if (key == "master") {
        const int64_t n = std::min<int64_t>(t.numel(), all.numel() - g->rank() * t.numel());
        EXPECT_TRUE(at::equal(t.narrow(0, 0, n), all.narrow(0, g->rank() * t.numel(), n)));
      }
    }
  });
}

// Corruption is reported by name: flipped byte, truncated file, missing
// data file, missing metadata, unknown format version.
class CorruptionTest : public CkptTest {
 protected:
  void TearDown() override { fs::remove_all(root_); }  // corrupt on purpose
  void SetUp() override {
    CkptTest::SetUp();
    dir_ = path("c");
    State st = make_state(0, 1, 1, false, true);
    SaveOptions opts;
    opts.checksum_block = 64;
    save(dir_, st, nullptr, opts);
    meta_ = read_metadata(dir_);
  }
  // The file and byte offset of tensor a.weight's first box.
  std::pair<std::string, uint64_t> where(const std::string& tensor) {
    const SavedBox& b = meta_.tensors.at(tensor).boxes.at(0);
    return {dir_ + "/" + b.file, b.byte_offset};
  }
  void expect_load_fails_naming(const std::string& needle, const std::string& needle2) {
    State got = make_state(0, 1, 1, false, false);
    try {
      load(dir_, got, nullptr);
      FAIL() << "no throw";
    } catch (const DataLoss& e) {
      EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
      EXPECT_NE(e.message().find(needle2), std::string::npos) << e.message();
    }
  }
  std::string dir_;
  Metadata meta_;
};

TEST_F(CorruptionTest, FlippedByteIsDataLossNamingFileAndTensor) {
  auto [file, offset] = where("c.bias");
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset + 5));
    char c;
    f.get(c);
    f.seekp(static_cast<std::streamoff>(offset + 5));
    f.put(static_cast<char>(c ^ 0x10));
  }
  expect_load_fails_naming("rank_00000.bin", "'c.bias'");
  VerifyReport report = verify(dir_);
  ASSERT_EQ(report.errors.size(), 1u);
  EXPECT_NE(report.errors[0].find("c.bias"), std::string::npos) << report.errors[0];
}

TEST_F(CorruptionTest, TruncatedFileIsDataLossNamingFileAndTensor) {
  auto [file, offset] = where("a.weight");
  (void)offset;
  // a.weight sorts first, so it sits at the start of the file; cut into the
  // last tensor instead.
  fs::resize_file(file, fs::file_size(file) - 100);
  State got = make_state(0, 1, 1, false, false);
  try {
    load(dir_, got, nullptr);
    FAIL() << "no throw";
  } catch (const DataLoss& e) {
    EXPECT_NE(e.message().find("rank_00000.bin"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("truncated"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("tensor '"), std::string::npos) << e.message();
  }
  EXPECT_FALSE(verify(dir_).ok());
}

TEST_F(CorruptionTest, MissingDataFileIsDataLoss) {
  fs::remove(where("a.weight").first);
  expect_load_fails_naming("rank_00000.bin", "tensor '");
}

TEST_F(CorruptionTest, MissingMetadataIsNotFoundNamingTheDirectory) {
  fs::remove(dir_ + "/metadata.json");
  State got = make_state(0, 1, 1, false, false);
  try {
    load(dir_, got, nullptr);
    FAIL() << "no throw";
  } catch (const NotFound& e) {
    EXPECT_NE(e.message().find(dir_), std::string::npos) << e.message();
  }
  EXPECT_FALSE(latest(path("")).has_value());
}

TEST_F(CorruptionTest, UnknownFormatVersionIsRefused) {
  std::ifstream in(dir_ + "/metadata.json");
  auto j = nlohmann::json::parse(in);
  in.close();
  j["format_version"] = 2;
  std::ofstream(dir_ + "/metadata.json") << j.dump();
  State got = make_state(0, 1, 1, false, false);
  try {
    load(dir_, got, nullptr);
    FAIL() << "no throw";
  } catch (const FailedPrecondition& e) {
    EXPECT_NE(e.message().find("format_version 2"), std::string::npos) << e.message();
  }
}

// Regression (the bug fuzz/sim_cluster_fuzz.cpp found in sim's JSON reader,
// present here too): a number too large for a double escaped
// Metadata::parse as nlohmann's out_of_range.406 instead of DataLoss.
TEST(Metadata, FuzzNumberTooLargeForADoubleIsDataLoss) {
  try {
    Metadata::parse(R"({"format_version": 1, "world_size": 1e999})", "ckpt/metadata.json");
    FAIL() << "no exception";
  } catch (const DataLoss& e) {
    EXPECT_NE(e.message().find("'ckpt/metadata.json' is not valid JSON"), std::string::npos)
        << e.message();
  }
}

// Regression (found by fuzz/ckpt_metadata_fuzz.cpp): an integer field
// holding a float out of range (4.2e34 for step) went through nlohmann's
// static_cast (undefined behaviour, UBSan); other non-integers were
// truncated or wrapped. Each is DataLoss naming the field.
TEST(Metadata, FuzzNonIntegerNumbersAreDataLoss) {
  Metadata m;
  m.world_size = 2;
  m.step = 7;
  m.checksum_block = 1 << 20;
  m.files.push_back({"rank0.bin", 16});
  const nlohmann::json good = nlohmann::json::parse(m.to_json());
  EXPECT_EQ(Metadata::parse(good.dump(), "m.json").step, 7);
  for (const auto& [field, value, needle] :
       std::vector<std::tuple<std::string, nlohmann::json, std::string>>{
           {"step", 4.24444e+34, "step must be an integer"},
           {"world_size", 2.5, "world_size must be an integer"},
           {"world_size", int64_t{1} << 40, "world_size must be an integer in [-2147483648"},
           {"checksum_block", -1, "checksum_block must be an integer in [0"}}) {
    SCOPED_TRACE(field + " = " + value.dump());
    nlohmann::json bad = good;
    bad[field] = value;
    try {
      Metadata::parse(bad.dump(), "m.json");
      FAIL() << "no exception";
    } catch (const DataLoss& e) {
      EXPECT_NE(e.message().find("'m.json': " + needle), std::string::npos) << e.message();
    }
  }
  nlohmann::json bad = good;
  bad["files"][0]["bytes"] = -16;
  EXPECT_THROW(Metadata::parse(bad.dump(), "m.json"), DataLoss);
}

}  // namespace
}  // namespace tessera::ckpt
