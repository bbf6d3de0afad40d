// Checkpoint throughput next to this machine's disk, measured in one run.
// Run under tessera-launch:
//
//   build/release/bin/tessera-launch --nproc 4 -- build/release/bin/ckpt_bench --gib 2
//
// Options:
//   --gib G         total state over all ranks, GiB (default 2)
//   --tensors K     tensors in the state, each [rows, 4096] float32 sharded by
//                   rows over the ranks (default 16)
//   --dir PATH      scratch directory, removed afterwards (default
//                   /tmp/tessera_ckpt_bench); put it on the file system to measure
//   --io-threads T  I/O threads per rank for save and load (default 4)
//   --repeat R      rounds of every measurement; the table shows the median
//                   and the range (default 3)
//   --step-seconds S  the compute phase of the defer_copy measurement
//                   (default 1.0: a 2 GiB state with AdamW moments is a
//                   model of ~170M parameters, whose forward and backward
//                   pass over 256 tokens takes longer than that on 2 cores)
//   --keep          leave the files in --dir
//   -h, --help      print the options and exit
//
// Rows of the printed Markdown table (rank 0; GB = 1e9 bytes):
//   * sequential write / read: rank 0 alone writes one file the size of the
//     whole state with 16 MiB write() calls and fsync, drops it from the
//     page cache (posix_fadvise DONTNEED; residency checked with mincore)
//     and reads it back with 16 MiB reads: the device's single-stream
//     bandwidth.
//   * ckpt::save: synchronous save of the state (every rank writes its own
//     file in parallel, CRC-32C per MiB, fsync, commit).
//   * ckpt::load: load into fresh tensors of the same layout after the
//     checkpoint's files were dropped from the page cache (checksums
//     verified); the loaded values are compared with the saved ones.
//   * save_async blocked: the time save_async() keeps the caller (plan,
//     one all_gather, copy to the reused staging buffer) — what a training
//     step waits for — then the time until that save is committed.
//   * save_async with defer_copy: the caller is blocked in save_async and in
//     release_tensors(), which it calls after a compute phase that stands
//     in for the next step's forward and backward passes (fp32 matmuls on
//     every rank, calibrated in the same run to take --step-seconds when
//     nothing else runs); release_tensors() copies what the writes have not
//     reached yet. Also printed: that share of the bytes, and how much the
//     compute phase slowed while the save was writing (the CPU time the
//     I/O threads take from training on a machine without a GPU).
//   * baseline save: each tensor gathered whole to rank 0 (send/recv), which
//     writes them all into one file with torch::save, then fsync.
//   * baseline load: rank 0 reads that file with torch::load (cold cache)
//     and sends each rank its rows.
// Times are the slowest rank's, between barriers.
#include <ATen/ATen.h>
#include <torch/serialize.h>  // the baseline's torch::save / torch::load
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "command_line.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"

namespace fs = std::filesystem;
namespace td = tessera::dist;
using tessera::Stopwatch;

namespace {

constexpr int64_t kCols = 4096;
constexpr size_t kIoBytes = size_t{16} << 20;

struct Options {
  double gib = 2;
  int tensors = 16;
  std::string dir = "/tmp/tessera_ckpt_bench";
  size_t io_threads = 4;
  int repeat = 3;
  double step_seconds = 1.0;
  bool keep = false;
};

// Reads the command line into `o`; returns main()'s code when it should
// stop (0 after --help, 2 after a bad command line).
std::optional<int> parse(int argc, char** argv, Options* o) {
  CLI::App app{"Checkpoint throughput next to this machine's disk (run under tessera-launch).",
               "ckpt_bench"};
  app.option_defaults()->always_capture_default();
  app.add_option("--gib", o->gib, "total state over all ranks, GiB")
      ->check(tessera::examples::positive());
  app.add_option("--tensors", o->tensors,
                 "tensors in the state, each [rows, 4096] float32 sharded by rows over the ranks")
      ->check(tessera::examples::positive());
  app.add_option("--dir", o->dir, "scratch directory, removed afterwards");
  app.add_option("--io-threads", o->io_threads, "I/O threads per rank for save and load")
      ->check(tessera::examples::positive());
  app.add_option("--repeat", o->repeat, "rounds of every measurement (the table shows the median)")
      ->check(tessera::examples::positive());
  app.add_option("--step-seconds", o->step_seconds,
                 "the compute phase of the defer_copy measurement, seconds")
      ->check(tessera::examples::positive());
  app.add_flag("--keep", o->keep, "leave the files in --dir");
  return tessera::examples::parse_command_line(app, argc, argv);
}

// The slowest rank's value.
double max_over(td::ProcessGroup& world, double v) {
  at::Tensor t = at::full({1}, v, at::kDouble);
  world.all_reduce(t, td::ReduceOp::kMax).wait();
  return t.item<double>();
}

// Seconds of fn() on the slowest rank, started together.
double timed(td::ProcessGroup& world, const std::function<void()>& fn) {
  world.barrier().wait();
  Stopwatch w;
  fn();
  return max_over(world, w.seconds());
}

// The stand-in for a forward and backward pass: `count` fp32 matmuls of
// 384 x 384 (about 0.11 GFLOP each), on this rank's intra-op threads.
double compute_phase(int64_t count) {
  static const at::Tensor a = at::randn({384, 384}), b = at::randn({384, 384});
  Stopwatch w;
  at::Tensor acc = at::zeros({384, 384});
  for (int64_t i = 0; i < count; ++i) acc.add_(at::mm(a, b));
  (void)acc.sum().item<float>();
  return w.seconds();
}

// Fraction of `path`'s pages in the page cache (mincore), or -1 if unknown.
double resident_fraction(const std::string& path) {
  tessera::FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st {};
  if (fd.get() < 0 || ::fstat(fd.get(), &st) != 0 || st.st_size == 0) return -1;
  void* addr = ::mmap(nullptr, st.st_size, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (addr == MAP_FAILED) return -1;
  const long page = ::sysconf(_SC_PAGESIZE);
  const size_t pages = (st.st_size + page - 1) / page;
  std::vector<unsigned char> in(pages);
  double frac = -1;
  if (::mincore(addr, st.st_size, in.data()) == 0) {
    size_t n = 0;
    for (unsigned char c : in) n += c & 1;
    frac = static_cast<double>(n) / pages;
  }
  ::munmap(addr, st.st_size);
  return frac;
}

// Asks the kernel to drop `path` from the page cache (clean pages only: the
// file must have been fsynced). Returns the fraction still resident.
double drop_cache(const std::string& path) {
  tessera::FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) tessera::throw_io_error("opening " + path, errno);
  ::fdatasync(fd.get());
  ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
  return resident_fraction(path);
}

// Drops every file of a directory; returns the largest resident fraction.
double drop_dir(const std::string& dir) {
  double worst = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.is_regular_file()) worst = std::max(worst, drop_cache(e.path().string()));
  }
  return worst;
}

void write_all(int fd, const uint8_t* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, std::min(n, kIoBytes));
    if (w < 0) {
      if (errno == EINTR) continue;
      tessera::throw_io_error("writing " + path, errno);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void read_all(int fd, uint8_t* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t r = ::read(fd, p, std::min(n, kIoBytes));
    if (r < 0) {
      if (errno == EINTR) continue;
      tessera::throw_io_error("reading " + path, errno);
    }
    TESSERA_CHECK(r > 0, DataLoss, path, " ended early");
    p += r;
    n -= static_cast<size_t>(r);
  }
}

struct Disk {
  double write_s = 0, read_s = 0;
  double resident_after_drop = -1;  // fraction; 0: the read was from the device
};

// Rank 0 writes `bytes` to one file (16 MiB writes, fsync), drops it from
// the cache and reads it back.
Disk sequential(const std::string& path, uint64_t bytes) {
  Disk d;
  std::vector<uint8_t> buf(kIoBytes);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>(i * 2654435761u >> 13);
  {
    Stopwatch w;
    tessera::FileDescriptor fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) tessera::throw_io_error("creating " + path, errno);
    for (uint64_t done = 0; done < bytes; done += buf.size()) {
      write_all(fd.get(), buf.data(), std::min<uint64_t>(buf.size(), bytes - done), path);
    }
    if (::fsync(fd.get()) != 0) tessera::throw_io_error("fsync of " + path, errno);
    if (int err = fd.close_checked()) tessera::throw_io_error("closing " + path, err);
    d.write_s = w.seconds();
  }
  d.resident_after_drop = drop_cache(path);
  {
    Stopwatch w;
    tessera::FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) tessera::throw_io_error("opening " + path, errno);
    for (uint64_t done = 0; done < bytes; done += buf.size()) {
      read_all(fd.get(), buf.data(), std::min<uint64_t>(buf.size(), bytes - done), path);
    }
    d.read_s = w.seconds();
  }
  fs::remove(path);
  return d;
}

// The benchmark state: `tensors` tensors [rows, kCols] float32, rows
// sharded evenly over the ranks (each rank's share is one contiguous box).
struct BenchState {
  std::vector<std::string> names;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<td::Layout> layouts;
};

BenchState make_layouts(const Options& o, int world) {
  BenchState b;
  const double total = o.gib * (1 << 30);
  int64_t rows = static_cast<int64_t>(total / (o.tensors * kCols * 4.0));
  rows = std::max<int64_t>(world, rows / world * world);
  td::MeshShape mesh{{world}, {"w"}};
  for (int t = 0; t < o.tensors; ++t) {
    char name[32];
    std::snprintf(name, sizeof(name), "layers.%02d.weight", t);
    b.names.push_back(name);
    b.shapes.push_back({rows, kCols});
    b.layouts.push_back(td::Layout::sharded({rows, kCols}, mesh, {td::Placement::Shard(0)}));
  }
  return b;
}

tessera::ckpt::State make_state(const BenchState& b, int rank, bool fill) {
  tessera::ckpt::State st;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + rank);
  for (size_t t = 0; t < b.names.size(); ++t) {
    at::Tensor local = fill ? at::rand(b.layouts[t].local_shape(rank), gen)
                            : at::zeros(b.layouts[t].local_shape(rank));
    st.add(b.names[t], local, b.layouts[t]);
  }
  return st;
}

// Baseline: what a LibTorch user writes without a checkpoint library: every
// tensor gathered whole to rank 0 (send/recv), which writes them all with
// torch::save into one file and fsyncs it. Returns the file's size.
uint64_t baseline_save(const std::string& path, const BenchState& b,
                       const tessera::ckpt::State& st, td::ProcessGroup& world) {
  const int rank = world.rank(), n = world.size();
  std::vector<at::Tensor> full_tensors;
  for (size_t t = 0; t < b.names.size(); ++t) {
    const at::Tensor& local = st.entries.at(b.names[t]).local;
    if (rank != 0) {
      world.send(local, 0, static_cast<int>(t)).wait();
      continue;
    }
    at::Tensor full = at::empty(b.shapes[t]);
    const int64_t rows = b.shapes[t][0] / n;
    full.narrow(0, 0, rows).copy_(local);
    for (int r = 1; r < n; ++r) {
      at::Tensor part = full.narrow(0, r * rows, rows);
      world.recv(part, r, static_cast<int>(t)).wait();
    }
    full_tensors.push_back(std::move(full));
  }
  if (rank != 0) return 0;
  torch::save(full_tensors, path);
  tessera::FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) tessera::throw_io_error("opening " + path, errno);
  if (::fsync(fd.get()) != 0) tessera::throw_io_error("fsync of " + path, errno);
  struct stat sb {};
  ::fstat(fd.get(), &sb);
  return static_cast<uint64_t>(sb.st_size);
}

// Baseline load: rank 0 reads the file with torch::load and sends each rank
// its rows.
void baseline_load(const std::string& path, const BenchState& b, tessera::ckpt::State& st,
                   td::ProcessGroup& world) {
  const int rank = world.rank(), n = world.size();
  std::vector<at::Tensor> full_tensors;
  if (rank == 0) torch::load(full_tensors, path);
  for (size_t t = 0; t < b.names.size(); ++t) {
    at::Tensor& local = st.entries.at(b.names[t]).local;
    if (rank != 0) {
      world.recv(local, 0, static_cast<int>(t)).wait();
      continue;
    }
    const at::Tensor& full = full_tensors.at(t);
    const int64_t rows = b.shapes[t][0] / n;
    local.copy_(full.narrow(0, 0, rows));
    for (int r = 1; r < n; ++r) {
      world.send(full.narrow(0, r * rows, rows).contiguous(), r, static_cast<int>(t)).wait();
    }
  }
}

bool same_values(const BenchState& b, const tessera::ckpt::State& x, const tessera::ckpt::State& y) {
  for (const auto& name : b.names) {
    if (!at::equal(x.entries.at(name).local, y.entries.at(name).local)) return false;
  }
  return true;
}

std::string fs_type(const std::string& path) {
  struct statfs s {};
  if (::statfs(path.c_str(), &s) != 0) return "?";
  switch (static_cast<unsigned long>(s.f_type)) {
    case 0xEF53: return "ext4";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x6969: return "nfs";
    case 0x794c7630: return "overlayfs";
    default: {
      char hex[32];
      std::snprintf(hex, sizeof(hex), "0x%lx", static_cast<unsigned long>(s.f_type));
      return hex;
    }
  }
}

// Samples of one measurement (seconds), one per round.
struct Samples {
  std::vector<double> v;
  double median() const {
    std::vector<double> s = v;
    std::sort(s.begin(), s.end());
    return s.empty() ? 0 : s[s.size() / 2];
  }
  double min() const { return *std::min_element(v.begin(), v.end()); }
  double max() const { return *std::max_element(v.begin(), v.end()); }
};

int run(const Options& o) {
  auto world_ptr = td::init_process_group();
  td::ProcessGroup& world = *world_ptr;
  const int rank = world.rank(), n = world.size();
  const std::string dir = o.dir;
  if (rank == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  world.barrier().wait();

  BenchState b = make_layouts(o, n);
  tessera::ckpt::State state = make_state(b, rank, true);
  tessera::ckpt::State loaded = make_state(b, rank, false);
  uint64_t total = 0;
  for (size_t t = 0; t < b.names.size(); ++t) total += b.shapes[t][0] * b.shapes[t][1] * 4;
  const double gb = total / 1e9;

  // Reused over rounds, as a training job would: staging buffers and plans.
  tessera::ckpt::Checkpointer ck;
  tessera::ckpt::SaveOptions so;
  so.io_threads = o.io_threads;
  tessera::ckpt::LoadOptions lo;
  lo.io_threads = o.io_threads;

  // Matmuls that take --step-seconds with every rank computing at once.
  world.barrier().wait();
  compute_phase(5);  // warm up
  const double per_mm = max_over(world, compute_phase(40) / 40);
  const int64_t step_mms = std::max<int64_t>(1, static_cast<int64_t>(o.step_seconds / per_mm));

  Samples seq_write, seq_read, save, load, blocked, async_total, base_save, base_load;
  Samples deferred_blocked, deferred_total, deferred_copied, compute_alone, compute_saving;
  double seq_resident = 0, ckpt_resident = 0, one_resident = 0;  // worst over rounds
  bool load_ok = true, base_ok = true;
  uint64_t one_bytes = 0;
  for (int round = 0; round < o.repeat; ++round) {
    // 1. The device: one stream, rank 0 alone, same size as the state.
    if (rank == 0) {
      Disk disk = sequential(dir + "/sequential.bin", total);
      seq_write.v.push_back(disk.write_s);
      seq_read.v.push_back(disk.read_s);
      seq_resident = std::max(seq_resident, disk.resident_after_drop);
    }
    world.barrier().wait();

    // 2. Synchronous save.
    const std::string sync_dir = dir + "/sync";
    save.v.push_back(timed(world, [&] { ck.save(sync_dir, state, world_ptr, so); }));

    // 3. Load, cold cache, into zeroed tensors.
    if (rank == 0) ckpt_resident = std::max(ckpt_resident, drop_dir(sync_dir));
    for (auto& [name, e] : loaded.entries) e.local.zero_();
    load.v.push_back(timed(world, [&] { ck.load(sync_dir, loaded, world_ptr, lo); }));
    load_ok &= max_over(world, same_values(b, state, loaded) ? 0 : 1) == 0;

    // 4. save_async: blocked time, then until committed.
    const std::string async_dir = dir + "/async";
    {
      world.barrier().wait();
      Stopwatch w;
      tessera::ckpt::SaveHandle h = ck.save_async(async_dir, state, world_ptr, so);
      const double b_s = w.seconds();
      h.wait();
      const double t_s = w.seconds();
      blocked.v.push_back(max_over(world, b_s));
      async_total.v.push_back(max_over(world, t_s));
    }

    // 4b. save_async with defer_copy around a compute phase; the same
    //     compute phase alone right before, for the slowdown.
    const std::string deferred_dir = dir + "/deferred";
    {
      compute_alone.v.push_back(timed(world, [&] { compute_phase(step_mms); }));
      tessera::ckpt::SaveOptions dso = so;
      dso.defer_copy = true;
      world.barrier().wait();
      Stopwatch w;
      tessera::ckpt::SaveHandle h = ck.save_async(deferred_dir, state, world_ptr, dso);
      const double in_save = w.seconds();
      const double c_s = compute_phase(step_mms);
      Stopwatch r;
      h.release_tensors();
      const double in_release = r.seconds();
      h.wait();
      const double t_s = w.seconds();
      deferred_blocked.v.push_back(max_over(world, in_save + in_release));
      deferred_total.v.push_back(max_over(world, t_s));
      compute_saving.v.push_back(max_over(world, c_s));
      const double copied = static_cast<double>(h.stats().bytes_copied) /
                            std::max<uint64_t>(1, h.stats().bytes_written);
      deferred_copied.v.push_back(max_over(world, copied));
    }

    // 5. Baseline: gather to rank 0, one file; read back and scatter.
    const std::string one_file = dir + "/one_file.bin";
    base_save.v.push_back(timed(world, [&] { one_bytes = baseline_save(one_file, b, state, world); }));
    if (rank == 0) one_resident = std::max(one_resident, drop_cache(one_file));
    for (auto& [name, e] : loaded.entries) e.local.zero_();
    base_load.v.push_back(timed(world, [&] { baseline_load(one_file, b, loaded, world); }));
    base_ok &= max_over(world, same_values(b, state, loaded) ? 0 : 1) == 0;

    world.barrier().wait();
    if (rank == 0) {
      fs::remove_all(sync_dir);
      fs::remove_all(async_dir);
      fs::remove_all(deferred_dir);
      fs::remove(one_file);
    }
    world.barrier().wait();
  }

  if (rank == 0) {
    struct sysinfo si {};
    ::sysinfo(&si);
    const double seq_w = gb / seq_write.median(), seq_r = gb / seq_read.median();
    auto pct = [](double f) {
      char s[32];
      if (f < 0) return std::string("unknown");
      std::snprintf(s, sizeof(s), "%.0f%%", f * 100);
      return std::string(s);
    };
    // "| what | median s | min–max s | GB/s | vs sequential |"
    auto row = [&](const std::string& what, const Samples& x, double bytes_gb, double reference) {
      const double m = x.median();
      std::printf("| %s | %.3f | %.3f–%.3f | %.2f | ", what.c_str(), m, x.min(), x.max(), bytes_gb / m);
      if (reference > 0) {
        std::printf("%.2f |\n", bytes_gb / m / reference);
      } else {
        std::printf("— |\n");
      }
    };
    std::printf("\n### ckpt_bench: %d ranks, %.2f GiB state (%d float32 tensors [%lld, %lld], "
                "rows sharded), %zu I/O threads per rank, median of %d rounds\n\n",
                n, total / double(1 << 30), o.tensors, static_cast<long long>(b.shapes[0][0]),
                static_cast<long long>(kCols), o.io_threads, o.repeat);
    std::printf("Machine: %u CPU cores online, %.1f GiB RAM, %s at %s. GB = 1e9 bytes; times are "
                "the slowest rank's. Page cache after posix_fadvise(DONTNEED), worst round: "
                "sequential file %s, checkpoint files %s, baseline file %s still cached.\n\n",
                std::thread::hardware_concurrency(), si.totalram * double(si.mem_unit) / (1 << 30),
                fs_type(dir).c_str(), dir.c_str(), pct(seq_resident).c_str(),
                pct(ckpt_resident).c_str(), pct(one_resident).c_str());
    std::printf("| operation | median s | range s | GB/s | vs sequential |\n|---|---:|---:|---:|---:|\n");
    row("sequential write: 1 file, 16 MiB writes + fsync (rank 0 alone)", seq_write, gb, seq_w);
    row("sequential read: same file, page cache dropped, 16 MiB reads", seq_read, gb, seq_r);
    row("ckpt::save, synchronous (" + std::to_string(n) + " files in parallel, CRC-32C, fsync, commit)",
        save, gb, seq_w);
    row(std::string("ckpt::load, page cache dropped, checksums verified (values ") +
            (load_ok ? "equal" : "DIFFER") + ")",
        load, gb, seq_r);
    row("ckpt::save_async: caller blocked (plan + snapshot to staging)", blocked, gb, 0);
    row("ckpt::save_async: until committed", async_total, gb, seq_w);
    row("ckpt::save_async, defer_copy: caller blocked (save_async + release_tensors after the "
        "compute phase)",
        deferred_blocked, gb, 0);
    row("ckpt::save_async, defer_copy: until committed", deferred_total, gb, seq_w);
    row("baseline save: each tensor gathered to rank 0, torch::save, fsync",
        base_save, one_bytes / 1e9, seq_w);
    row(std::string("baseline load: rank 0 torch::load (cache dropped), sends each rank its rows (values ") +
            (base_ok ? "equal" : "DIFFER") + ")",
        base_load, one_bytes / 1e9, seq_r);
    std::printf("\nsave_async blocks the training step for %.1f%% of the synchronous save time; "
                "with defer_copy, %.1f%% (medians).\n",
                100.0 * blocked.median() / save.median(),
                100.0 * deferred_blocked.median() / save.median());
    std::printf("defer_copy: compute phase of %lld matmuls (384x384 fp32) on every rank: %.3f s "
                "alone, %.3f s while the save was writing (+%.0f%%, medians); release_tensors "
                "copied %.0f%% of a rank's bytes (median; %.0f–%.0f%%).\n",
                static_cast<long long>(step_mms), compute_alone.median(), compute_saving.median(),
                100.0 * (compute_saving.median() / compute_alone.median() - 1),
                100.0 * deferred_copied.median(), 100.0 * deferred_copied.min(),
                100.0 * deferred_copied.max());
    std::fflush(stdout);
  }
  world.barrier().wait();
  if (rank == 0 && !o.keep) fs::remove_all(dir);
  return load_ok && base_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (auto code = parse(argc, argv, &options)) return *code;
  tessera::init_runtime();
  try {
    return run(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ckpt_bench: %s\n", e.what());
    return 1;
  }
}
