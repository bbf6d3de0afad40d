// Checkpoint throughput next to this machine's disk and next to PyTorch's
// distributed checkpoint (DCP), measured in one run. Run under tessera-launch:
//
//   build/release/bin/tessera-launch --nproc 4 -- build/release/bin/ckpt_bench --gib 2
//       --dcp-python build/bench-venv/bin/python --json ckpt_np4.json   (one line)
//
// Options (--help lists them with their defaults):
//   --gib G           total state over all ranks, GiB (default 2; --quick: 1/32)
//   --tensors K       tensors in the state, each [rows, 4096] float32 sharded by
//                     rows over the ranks (default 16; --quick: 4)
//   --dir PATH        scratch directory, removed afterwards; put it on the file
//                     system to measure
//   --io-threads T    I/O threads per rank for save and load (default 4)
//   --reps R          timed rounds (default 5); --warmup W untimed rounds first
//   --step-seconds S  the compute phase standing in for a training step's
//                     forward and backward pass (default 1.0: a 2 GiB state
//                     with AdamW moments is a ~170M-parameter model, whose
//                     forward and backward over 256 tokens take longer than
//                     that on 2 cores)
//   --fio PATH        fio, the disk anchor (default: "fio" on PATH; absent: no
//                     anchor, said so in the report)
//   --dcp-python PY   a Python with torch >= 2.0 that runs benchmarks/dcp_bench.py
//                     in every round (default: none, no DCP rows)
//   --json FILE       every round's numbers, the configuration and the machine
//
// Every round, in this order, with the page cache out of the way:
//   * fio, the disk anchor (rank 0 alone): sequential write then read of the
//     state's size with direct I/O, as many streams as our save and load use
//     (ranks x I/O threads, one file each) and the same request sizes (1 MiB
//     writes: the synchronous save's bounce chunks; 4 MiB reads: the load's
//     pieces), psync engine, fsync at the end of the writes.
//   * ckpt::save: synchronous save (every rank writes its own file with its
//     I/O threads, CRC-32C per MiB, fsync, commit).
//   * ckpt::load: load into zeroed tensors of the same layout after the
//     checkpoint's files were dropped from the page cache (posix_fadvise
//     DONTNEED, residency checked with mincore); values compared.
//   * a training step alone: the compute phase (fp32 matmuls 384x384 on every
//     rank, calibrated once to take --step-seconds with every rank computing).
//   * save_async, default (snapshot copy before returning): the time the
//     caller is blocked; the step time with the save overlapping the compute
//     phase (save_async call to the end of the compute phase); until committed.
//   * save_async with defer_copy: the same, the step ending with
//     release_tensors() (which copies what the writes have not reached yet);
//     also the share of the bytes that copy took.
//   * baseline: each tensor gathered whole to rank 0 (send/recv), which writes
//     them all with torch::save into one file and fsyncs it; then rank 0
//     reads it with torch::load (cold cache) and sends each rank its rows.
//   * DCP (with --dcp-python): benchmarks/dcp_bench.py on the same state
//     (DTensor Shard(0)), as many ranks, FileSystemWriter with as many
//     threads, its own warm-up round, then one timed round of the same
//     measurements (dcp.save, dcp.load, dcp.async_save around the same
//     compute phase); rank 0 starts it while the other ranks wait.
// Times are the slowest rank's, between barriers. The cost of a save to a
// training step is (step time with the save) - (step time alone), per round.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <torch/serialize.h>  // the baseline's torch::save / torch::load
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_report.h"
#include "command_line.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/core/subprocess.h"
#include "tessera/dist/rendezvous.h"

namespace fs = std::filesystem;
namespace td = tessera::dist;
using tessera::Stopwatch;

namespace {

constexpr int64_t kCols = 4096;
// Request sizes of our save and load (src/ckpt: a synchronous or deferred
// save writes 1 MiB bounce chunks, a load reads 4 MiB pieces); fio uses
// the same.
constexpr int64_t kSaveRequestBytes = int64_t{1} << 20;
constexpr int64_t kLoadRequestBytes = int64_t{4} << 20;

struct Options {
  double gib = 2;
  int tensors = 16;
  std::string dir = "/tmp/tessera_ckpt_bench";
  size_t io_threads = 4;
  double step_seconds = 1.0;
  std::string fio = "fio";
  std::string dcp_python;
  bool keep = false;
  tessera::bench::RepeatOptions rep;
};

// Reads the command line into `o`; returns main()'s code when it should
// stop (0 after --help, 2 after a bad command line).
std::optional<int> parse(int argc, char** argv, Options* o) {
  CLI::App app{
      "Checkpoint throughput next to this machine's disk (fio) and PyTorch's DCP "
      "(run under tessera-launch).",
      "ckpt_bench"};
  app.option_defaults()->always_capture_default();
  auto* gib = app.add_option("--gib", o->gib, "total state over all ranks, GiB")
                  ->check(tessera::examples::positive());
  auto* tensors = app.add_option("--tensors", o->tensors,
                                 "tensors in the state, each [rows, 4096] float32 sharded by rows "
                                 "over the ranks")
                      ->check(tessera::examples::positive());
  app.add_option("--dir", o->dir, "scratch directory, removed afterwards");
  app.add_option("--io-threads", o->io_threads, "I/O threads per rank for save and load")
      ->check(tessera::examples::positive());
  auto* step = app.add_option("--step-seconds", o->step_seconds,
                              "the compute phase standing in for a training step, seconds")
                   ->check(tessera::examples::positive());
  app.add_option("--fio", o->fio, "fio program, the disk anchor (not found: no anchor)");
  app.add_option("--dcp-python", o->dcp_python,
                 "Python with torch >= 2.0 running benchmarks/dcp_bench.py each round (empty: no "
                 "DCP rows)");
  app.add_flag("--keep", o->keep, "leave the files in --dir");
  tessera::bench::add_repeat_options(app, o->rep);
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return code;
  if (o->rep.quick) {
    if (gib->count() == 0) o->gib = 1.0 / 32;
    if (tensors->count() == 0) o->tensors = 4;
    if (step->count() == 0) o->step_seconds = 0.05;
  }
  return std::nullopt;
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
uint64_t baseline_save(const std::string& path, const BenchState& b, const tessera::ckpt::State& st,
                       td::ProcessGroup& world) {
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

bool same_values(const BenchState& b, const tessera::ckpt::State& x,
                 const tessera::ckpt::State& y) {
  for (const auto& name : b.names) {
    if (!at::equal(x.entries.at(name).local, y.entries.at(name).local)) return false;
  }
  return true;
}

// One fio job over `jobs` files of `bytes_per_job` in `dir` (rank 0 alone);
// returns the aggregate seconds (bytes moved / fio's aggregate bandwidth).
struct FioResult {
  double seconds = 0;
  uint64_t bytes = 0;
};

FioResult run_fio(const std::string& fio, const std::string& dir, const std::string& rw,
                  int64_t block, int jobs, int64_t bytes_per_job) {
  const std::vector<std::string> argv = {fio,
                                         "--name=anchor",
                                         "--directory=" + dir,
                                         "--rw=" + rw,
                                         "--bs=" + std::to_string(block),
                                         "--direct=1",
                                         "--ioengine=psync",
                                         "--numjobs=" + std::to_string(jobs),
                                         "--size=" + std::to_string(bytes_per_job),
                                         "--end_fsync=1",
                                         "--group_reporting",
                                         "--output-format=json"};
  const tessera::CommandResult r = tessera::run_command(argv, std::chrono::minutes(30), false);
  TESSERA_CHECK(r.status.success(), Unavailable, "fio ", rw, " in ", dir, " ", r.status.describe(),
                ":\n", r.output);
  // fio may print warnings before the JSON document.
  const auto brace = r.output.find('{');
  TESSERA_CHECK(brace != std::string::npos, DataLoss, "fio ", rw, " printed no JSON:\n", r.output);
  const nlohmann::json doc = nlohmann::json::parse(r.output.substr(brace));
  const nlohmann::json& side = doc.at("jobs").at(0).at(rw == "write" ? "write" : "read");
  FioResult out;
  out.bytes = side.at("io_bytes").get<uint64_t>();
  const double bw = side.at("bw_bytes").get<double>();
  TESSERA_CHECK(bw > 0 && out.bytes > 0, DataLoss, "fio ", rw, " moved no bytes:\n", r.output);
  out.seconds = static_cast<double>(out.bytes) / bw;
  return out;
}

std::string fio_version(const std::string& fio) {
  try {
    const tessera::CommandResult r =
        tessera::run_command({fio, "--version"}, std::chrono::seconds(20), false);
    if (!r.status.success()) return "";
    std::string v = r.output;
    while (!v.empty() && (v.back() == '\n' || v.back() == ' ')) v.pop_back();
    return v;
  } catch (const std::exception&) {
    return "";  // not installed
  }
}

// Seconds of one round of each DCP measurement, from dcp_bench.py's JSON.
struct DcpRound {
  std::map<std::string, std::vector<double>> series;
  nlohmann::json config;
  std::string skipped;  // non-empty: the script did not run DCP, and why
};

DcpRound run_dcp(const Options& o, int ranks, int64_t step_matmuls, const std::string& dir,
                 int warmup) {
  const std::string json = dir + "/dcp_round.json";
  // Without this rank's launcher variables, dcp_bench.py spawns its own
  // ranks instead of taking itself for one rank of a torchrun job.
  const std::vector<std::string> argv = {
      "/usr/bin/env",
      "-u",
      "RANK",
      "-u",
      "WORLD_SIZE",
      "-u",
      "LOCAL_RANK",
      "-u",
      "LOCAL_WORLD_SIZE",
      "-u",
      "MASTER_ADDR",
      "-u",
      "MASTER_PORT",
      "-u",
      "TORCHELASTIC_RUN_ID",
      o.dcp_python,
      std::string(TESSERA_SOURCE_DIR) + "/benchmarks/dcp_bench.py",
      "--nproc",
      std::to_string(ranks),
      "--gib",
      std::to_string(o.gib),
      "--tensors",
      std::to_string(o.tensors),
      "--io-threads",
      std::to_string(o.io_threads),
      "--reps",
      "1",
      "--warmup",
      std::to_string(warmup),
      "--step-matmuls",
      std::to_string(step_matmuls),
      "--dir",
      dir + "/dcp",
      "--json",
      json};
  const tessera::CommandResult r = tessera::run_command(argv, std::chrono::minutes(30));
  TESSERA_CHECK(r.status.success(), Unavailable, "benchmarks/dcp_bench.py ", r.status.describe(),
                ":\n", r.output);
  DcpRound out;
  // A Python without torch >= 2.0: the script says why and writes nothing.
  if (const auto skipped = r.output.find("dcp_bench: SKIPPED: "); skipped != std::string::npos) {
    out.skipped = r.output.substr(skipped + 20);
    out.skipped = out.skipped.substr(0, out.skipped.find('\n'));
    return out;
  }
  std::ifstream in(json);
  TESSERA_CHECK(in.good(), NotFound, "benchmarks/dcp_bench.py wrote no ", json, ":\n", r.output);
  const nlohmann::json doc = nlohmann::json::parse(in);
  out.config = doc.at("config");
  for (const auto& s : doc.at("series")) {
    out.series[s.at("id").get<std::string>()] = s.at("values").get<std::vector<double>>();
  }
  fs::remove(json);
  return out;
}

// Every measured quantity's samples, in round order, keyed by series id.
using Series = std::map<std::string, std::vector<double>>;

int run(const Options& o, int argc, char** argv) {
  auto world_ptr = td::init_process_group();
  td::ProcessGroup& world = *world_ptr;
  const int rank = world.rank(), n = world.size();
  const std::string dir = o.dir;
  if (rank == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir + "/fio");
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

  // fio: as many streams as our save/load (ranks x I/O threads), each its
  // own file; sizes rounded to whole requests.
  const std::string fio_version_text = rank == 0 ? fio_version(o.fio) : "";
  const bool have_fio = max_over(world, fio_version_text.empty() ? 0 : 1) > 0;
  const int fio_jobs = n * static_cast<int>(o.io_threads);
  const int64_t fio_job_bytes =
      std::max<int64_t>(kLoadRequestBytes, static_cast<int64_t>(total) / fio_jobs /
                                               kLoadRequestBytes * kLoadRequestBytes);
  bool have_dcp = !o.dcp_python.empty();
  std::string dcp_skipped = have_dcp ? "" : "no --dcp-python given";

  Series s;
  double ckpt_resident = 0, one_resident = 0;  // worst over rounds
  bool load_ok = true, base_ok = true;
  uint64_t one_bytes = 0;
  nlohmann::json dcp_config;
  for (int round = 0; round < o.rep.warmup + o.rep.reps; ++round) {
    const bool timed_round = round >= o.rep.warmup;
    Series r;  // this round's samples
    // 1. The disk anchor.
    if (have_fio && rank == 0) {
      const std::string fio_dir = dir + "/fio";
      const FioResult w =
          run_fio(o.fio, fio_dir, "write", kSaveRequestBytes, fio_jobs, fio_job_bytes);
      const FioResult rd =
          run_fio(o.fio, fio_dir, "read", kLoadRequestBytes, fio_jobs, fio_job_bytes);
      // Seconds to move the state's bytes at fio's rate.
      r["fio.write"].push_back(w.seconds * static_cast<double>(total) / w.bytes);
      r["fio.read"].push_back(rd.seconds * static_cast<double>(total) / rd.bytes);
      for (const auto& e : fs::directory_iterator(fio_dir)) fs::remove(e.path());
    }
    world.barrier().wait();

    // 2. Synchronous save.
    const std::string sync_dir = dir + "/sync";
    r["save"].push_back(timed(world, [&] { ck.save(sync_dir, state, world_ptr, so); }));

    // 3. Load, cold cache, into zeroed tensors.
    if (rank == 0) ckpt_resident = std::max(ckpt_resident, drop_dir(sync_dir));
    for (auto& [name, e] : loaded.entries) e.local.zero_();
    r["load"].push_back(timed(world, [&] { ck.load(sync_dir, loaded, world_ptr, lo); }));
    load_ok &= max_over(world, same_values(b, state, loaded) ? 0 : 1) == 0;

    // 4. A training step alone, then with each kind of asynchronous save.
    r["step.alone"].push_back(timed(world, [&] { compute_phase(step_mms); }));
    for (const bool defer : {false, true}) {
      const std::string prefix = defer ? "defer." : "async.";
      const std::string async_dir = dir + (defer ? "/deferred" : "/async");
      tessera::ckpt::SaveOptions aso = so;
      aso.defer_copy = defer;
      world.barrier().wait();
      Stopwatch w;
      tessera::ckpt::SaveHandle h = ck.save_async(async_dir, state, world_ptr, aso);
      double blocked = w.seconds();
      compute_phase(step_mms);
      if (defer) {
        Stopwatch rel;
        h.release_tensors();
        blocked += rel.seconds();
      }
      const double step_s = w.seconds();
      h.wait();
      const double total_s = w.seconds();
      r[prefix + "blocked"].push_back(max_over(world, blocked));
      r[prefix + "step"].push_back(max_over(world, step_s));
      r[prefix + "total"].push_back(max_over(world, total_s));
      if (defer) {
        const double copied = static_cast<double>(h.stats().bytes_copied) /
                              std::max<uint64_t>(1, h.stats().bytes_written);
        r["defer.copied_fraction"].push_back(max_over(world, copied));
      }
    }

    // 5. Baseline: gather to rank 0, one file; read back and scatter.
    const std::string one_file = dir + "/one_file.bin";
    r["baseline.save"].push_back(
        timed(world, [&] { one_bytes = baseline_save(one_file, b, state, world); }));
    if (rank == 0) one_resident = std::max(one_resident, drop_cache(one_file));
    for (auto& [name, e] : loaded.entries) e.local.zero_();
    r["baseline.load"].push_back(timed(world, [&] { baseline_load(one_file, b, loaded, world); }));
    base_ok &= max_over(world, same_values(b, state, loaded) ? 0 : 1) == 0;

    world.barrier().wait();
    if (rank == 0) {
      fs::remove_all(sync_dir);
      fs::remove_all(dir + "/async");
      fs::remove_all(dir + "/deferred");
      fs::remove(one_file);
    }
    world.barrier().wait();

    // 6. DCP, same state and ranks, started by rank 0 (the others wait):
    //    its own warm-up round in its first process, one timed round each.
    if (have_dcp && timed_round) {
      if (rank == 0) {
        DcpRound d = run_dcp(o, n, step_mms, dir, /*warmup=*/1);
        for (auto& [id, v] : d.series) r["dcp." + id] = v;
        dcp_config = d.config;
        dcp_skipped = d.skipped;
      }
      // Rank 0 tells the others whether DCP can run at all.
      have_dcp = max_over(world, dcp_skipped.empty() ? 0 : 1) == 0;
      world.barrier().wait();
    }
    if (timed_round) {
      for (auto& [id, v] : r) s[id].insert(s[id].end(), v.begin(), v.end());
    }
  }

  if (rank == 0) {
    auto med = [&](const std::string& id) { return tessera::bench::median(s[id]); };
    auto pct = [](double f) {
      char t[32];
      std::snprintf(t, sizeof(t), "%.0f%%", f * 100);
      return std::string(t);
    };
    // "| what | median s | min–max s | GB/s | vs fio |"
    auto row = [&](const std::string& what, const std::string& id, double bytes_gb,
                   const std::string& ref) {
      if (s[id].empty()) return;
      const double m = med(id);
      std::printf("| %s | %.3f | %.3f–%.3f | %.2f | ", what.c_str(), m,
                  tessera::bench::min_of(s[id]), tessera::bench::max_of(s[id]), bytes_gb / m);
      if (!ref.empty() && !s[ref].empty()) {
        std::printf("%.2f |\n", med(ref) / m);
      } else {
        std::printf("— |\n");
      }
    };
    std::printf(
        "\n### ckpt_bench: %d ranks, %.3f GiB state (%d float32 tensors [%lld, %lld], "
        "rows sharded), %zu I/O threads per rank, median of %d rounds (after %d warm-up)\n\n",
        n, total / double(1 << 30), o.tensors, static_cast<long long>(b.shapes[0][0]),
        static_cast<long long>(kCols), o.io_threads, o.rep.reps, o.rep.warmup);
    std::printf(
        "Page cache after posix_fadvise(DONTNEED), worst round: checkpoint files %s, "
        "baseline file %s still cached. fio: %s, %d streams, 1 MiB writes / 4 MiB reads, "
        "direct I/O.\n\n",
        pct(ckpt_resident).c_str(), pct(one_resident).c_str(),
        have_fio ? fio_version_text.c_str() : "not found (no anchor)", fio_jobs);
    std::printf("| operation | median s | range s | GB/s | vs fio |\n|---|---:|---:|---:|---:|\n");
    row("fio sequential write (anchor)", "fio.write", gb, "fio.write");
    row("fio sequential read (anchor)", "fio.read", gb, "fio.read");
    row("ckpt::save, synchronous", "save", gb, "fio.write");
    row(std::string("ckpt::load, cold cache (values ") + (load_ok ? "equal" : "DIFFER") + ")",
        "load", gb, "fio.read");
    row("ckpt::save_async: caller blocked", "async.blocked", gb, "");
    row("ckpt::save_async: until committed (compute phase overlapping)", "async.total", gb,
        "fio.write");
    row("ckpt::save_async, defer_copy: caller blocked (incl. release_tensors)", "defer.blocked", gb,
        "");
    row("ckpt::save_async, defer_copy: until committed", "defer.total", gb, "fio.write");
    row("baseline save: gather to rank 0, torch::save, fsync", "baseline.save", one_bytes / 1e9,
        "fio.write");
    row(std::string("baseline load: rank 0 torch::load, scatter (values ") +
            (base_ok ? "equal" : "DIFFER") + ")",
        "baseline.load", one_bytes / 1e9, "fio.read");
    row("dcp.save (FileSystemWriter)", "dcp.save", gb, "fio.write");
    row("dcp.load (FileSystemReader), cold cache", "dcp.load", gb, "fio.read");
    row("dcp.async_save: caller blocked", "dcp.async.blocked", gb, "");
    row("dcp.async_save: until the future completes", "dcp.async.total", gb, "fio.write");
    std::printf(
        "\nTraining step (%lld matmuls 384x384 fp32 per rank): %.3f s alone; with save_async "
        "%.3f s, with defer_copy %.3f s (medians)",
        static_cast<long long>(step_mms), med("step.alone"), med("async.step"), med("defer.step"));
    if (!s["dcp.async.step"].empty()) {
      std::printf("; DCP: %.3f s alone, %.3f s with dcp.async_save", med("dcp.step.alone"),
                  med("dcp.async.step"));
    }
    std::printf(".\n");
    std::fflush(stdout);

    tessera::bench::Report report("ckpt_np" + std::to_string(n), argc, argv, o.rep.quick);
    report.config() = {{"ranks", n},
                       {"state_bytes", total},
                       {"tensors", o.tensors},
                       {"tensor_shape", b.shapes[0]},
                       {"io_threads", o.io_threads},
                       {"reps", o.rep.reps},
                       {"warmup", o.rep.warmup},
                       {"step_seconds_target", o.step_seconds},
                       {"step_matmuls", step_mms},
                       {"save_request_bytes", kSaveRequestBytes},
                       {"load_request_bytes", kLoadRequestBytes},
                       {"fio", have_fio ? nlohmann::json{{"version", fio_version_text},
                                                         {"jobs", fio_jobs},
                                                         {"bytes_per_job", fio_job_bytes},
                                                         {"direct", true},
                                                         {"ioengine", "psync"},
                                                         {"write_bs", kSaveRequestBytes},
                                                         {"read_bs", kLoadRequestBytes}}
                                        : nlohmann::json(nullptr)},
                       {"dcp", have_dcp ? dcp_config : nlohmann::json(nullptr)},
                       {"dcp_skipped", dcp_skipped}};
    report.facts() = {{"load_values_equal", load_ok},
                      {"baseline_values_equal", base_ok},
                      {"baseline_file_bytes", one_bytes},
                      {"ckpt_resident_after_drop", ckpt_resident},
                      {"baseline_resident_after_drop", one_resident}};
    for (const auto& [id, v] : s) {
      // Peers that did not run (no DCP, no fio) leave no series; the
      // configuration says why (dcp_skipped, fio null).
      if (v.empty()) continue;
      report.add_series(id, id == "defer.copied_fraction" ? "fraction" : "s", v,
                        {{"side", id.rfind("dcp.", 0) == 0       ? "dcp"
                                  : id.rfind("fio.", 0) == 0     ? "fio"
                                  : id.rfind("baseline", 0) == 0 ? "baseline"
                                                                 : "tessera"}});
    }
    report.write(o.rep.json, dir);
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
    return run(options, argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ckpt_bench: %s\n", e.what());
    return 1;
  }
}
