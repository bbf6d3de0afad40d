// bench_report.h — the results file every benchmark program writes with --json.
//
// One JSON document per run (schema "tessera-bench/1", described in
// benchmarks/README.md): the benchmark's name, the command line, the date,
// the commit, the machine, the configuration, every repetition of every
// measured quantity ("series") and single values ("facts").
// benchmarks/run.sh collects these files under benchmarks/results/ and
// benchmarks/render_docs.py turns them into docs/benchmarks.md.
//
//   tessera::bench::RepeatOptions rep{/*reps=*/5, /*warmup=*/1};
//   tessera::bench::add_repeat_options(app, rep);      // --reps --warmup --quick --json
//   ...parse...
//   tessera::bench::Report report("collectives", argc, argv);
//   report.config()["ranks"] = n;
//   report.add_series("all_reduce.busbw", "GB/s", samples, {{"bytes", s}});
//   report.write(rep.json);                             // no-op when --json was not given
//
// Thread-safety: a Report is not thread-safe (one thread fills it).
// Only benchmark programs include this header (it exposes nlohmann::json).
#pragma once

#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysinfo.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/runtime.h"
#include "tessera/core/subprocess.h"

#ifndef TESSERA_SOURCE_DIR
#define TESSERA_SOURCE_DIR "."
#endif

namespace tessera::bench {

inline constexpr const char* kSchema = "tessera-bench/1";

// Repetition settings shared by every benchmark program.
struct RepeatOptions {
  int reps = 5;        // timed repetitions of every measurement (>= 1)
  int warmup = 1;      // untimed repetitions before them (>= 0)
  bool quick = false;  // tiny sizes: checks that the benchmark runs, measures nothing
  std::string json;    // results file to write; empty: none
};

// Adds --reps, --warmup, --quick and --json to `app`, bound to `o` (whose
// current values are the defaults shown by --help).
inline void add_repeat_options(CLI::App& app, RepeatOptions& o) {
  app.add_option("--reps", o.reps, "timed repetitions of every measurement")
      ->check(tessera::examples::positive());
  app.add_option("--warmup", o.warmup, "untimed repetitions before the timed ones")
      ->check(tessera::examples::at_least(0));
  app.add_flag("--quick", o.quick,
               "tiny sizes and few repetitions: checks that the benchmark runs (smoke test), "
               "its numbers are not measurements");
  app.add_option("--json", o.json,
                 "write every repetition, the configuration and the machine "
                 "to this JSON file");
}

// Median (the upper one of an even count), min and max; 0 for no samples.
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
inline double min_of(const std::vector<double>& v) {
  return v.empty() ? 0 : *std::min_element(v.begin(), v.end());
}
inline double max_of(const std::vector<double>& v) {
  return v.empty() ? 0 : *std::max_element(v.begin(), v.end());
}

namespace detail {

inline std::string first_line(const std::string& s) {
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

// The value after "key:" of the first /proc/cpuinfo line starting with key.
inline std::string cpuinfo_field(const std::string& key) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string v = line.substr(colon + 1);
    v.erase(0, v.find_first_not_of(" \t"));
    return v;
  }
  return "";
}

inline std::string os_name() {
  std::ifstream in("/etc/os-release");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("PRETTY_NAME=", 0) == 0) {
      std::string v = line.substr(12);
      if (v.size() >= 2 && v.front() == '"') v = v.substr(1, v.size() - 2);
      return v;
    }
  }
  return "";
}

inline std::string fs_type_name(unsigned long type) {
  switch (type) {
    case 0xEF53:
      return "ext4";
    case 0x58465342:
      return "xfs";
    case 0x9123683E:
      return "btrfs";
    case 0x01021994:
      return "tmpfs";
    case 0x6969:
      return "nfs";
    case 0x794c7630:
      return "overlayfs";
    default: {
      char hex[32];
      std::snprintf(hex, sizeof(hex), "0x%lx", type);
      return hex;
    }
  }
}

inline std::string read_trimmed(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\n')) s.pop_back();
  return s;
}

// The file system and block device holding `dir`.
inline nlohmann::json disk_json(const std::string& dir) {
  nlohmann::json d = {{"path", dir}};
  struct statfs sf {};
  if (::statfs(dir.c_str(), &sf) == 0) {
    d["filesystem"] = fs_type_name(static_cast<unsigned long>(sf.f_type));
    d["size_gib"] = static_cast<double>(sf.f_blocks) * sf.f_bsize / (1ull << 30);
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) == 0) {
    const std::string sys = "/sys/dev/block/" + std::to_string(major(st.st_dev)) + ":" +
                            std::to_string(minor(st.st_dev));
    std::ifstream uevent(sys + "/uevent");
    std::string line;
    while (std::getline(uevent, line)) {
      if (line.rfind("DEVNAME=", 0) == 0) d["device"] = line.substr(8);
    }
    // A partition has no queue/ or device/ of its own: its parent (the
    // whole disk) has them.
    std::string queue = sys + "/queue";
    if (read_trimmed(queue + "/rotational").empty()) queue = sys + "/../queue";
    const std::string rot = read_trimmed(queue + "/rotational");
    if (!rot.empty()) d["rotational"] = rot == "1";
    std::string model = read_trimmed(sys + "/device/model");
    if (model.empty()) model = read_trimmed(sys + "/../device/model");
    if (!model.empty()) d["model"] = model;
  }
  return d;
}

// `git` in the source tree; empty on any failure (no git, not a checkout).
inline std::string git(const std::vector<std::string>& args) {
  try {
    std::vector<std::string> argv = {"git", "-C", TESSERA_SOURCE_DIR};
    argv.insert(argv.end(), args.begin(), args.end());
    CommandResult r = run_command(argv, std::chrono::seconds(20), /*merge_stderr=*/false);
    return r.status.success() ? r.output : "";
  } catch (const std::exception&) {
    return "";
  }
}

}  // namespace detail

// UTC time as "2026-12-02T09:41:00Z".
inline std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// The commit the programs were built from: TESSERA_BENCH_COMMIT when set
// (benchmarks/run.sh sets it once for all), else `git rev-parse HEAD` in the
// source tree, else "unknown". `dirty`: tracked files differ from it.
inline nlohmann::json commit_json() {
  if (const char* c = std::getenv("TESSERA_BENCH_COMMIT"); c && *c) {
    const char* d = std::getenv("TESSERA_BENCH_DIRTY");
    return {{"commit", c}, {"dirty", d && std::string(d) == "1"}};
  }
  std::string head = detail::first_line(detail::git({"rev-parse", "HEAD"}));
  if (head.empty()) return {{"commit", "unknown"}, {"dirty", false}};
  const std::string status = detail::git({"status", "--porcelain", "--untracked-files=no"});
  return {{"commit", head}, {"dirty", !status.empty()}};
}

// What the numbers were measured on. `disk_dir`: also describe the file
// system and device holding it (benchmarks that write files).
inline nlohmann::json machine_json(const std::string& disk_dir = "") {
  const RuntimeInfo info = runtime_info();
  struct sysinfo si {};
  ::sysinfo(&si);
  struct utsname un {};
  ::uname(&un);
  std::string flags = " " + detail::cpuinfo_field("flags") + " ";
  nlohmann::json isa = nlohmann::json::array();
  for (const char* f : {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"}) {
    if (flags.find(std::string(" ") + f + " ") != std::string::npos) isa.push_back(f);
  }
  nlohmann::json m = {
      {"cpu_model", detail::cpuinfo_field("model name")},
      {"cpu_isa", isa},
      {"online_cores", static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN))},
      {"usable_cores", usable_cores()},
      {"memory_gib", static_cast<double>(si.totalram) * si.mem_unit / (1ull << 30)},
      {"kernel", std::string(un.sysname) + " " + un.release},
      {"os", detail::os_name()},
      {"compiler", std::string("g++ ") + __VERSION__},
      {"libtorch", info.torch_version},
      {"blas", info.blas_name},
      {"blas_library", info.blas_library},
      {"intra_op_threads", info.num_threads},
      {"cuda", info.cuda},
  };
  if (!disk_dir.empty()) m["disk"] = detail::disk_json(disk_dir);
  return m;
}

class Report {
 public:
  // `benchmark`: the results file's name without ".json" ("ckpt").
  Report(std::string benchmark, int argc, char** argv, bool quick)
      : doc_({{"schema", kSchema},
              {"benchmark", std::move(benchmark)},
              {"date", utc_now()},
              {"quick", quick}}) {
    doc_["command"] = relative_to_source(argc, argv);
    doc_["config"] = nlohmann::json::object();
    doc_["series"] = nlohmann::json::array();
    doc_["facts"] = nlohmann::json::object();
  }

  // Free-form settings of the run (sizes, thread counts, peers' versions).
  nlohmann::json& config() { return doc_["config"]; }
  // Single values that are not repeated measurements (byte counts, the
  // acceptance of a run, a peer's absence and why).
  nlohmann::json& facts() { return doc_["facts"]; }

  // One measured quantity, every timed repetition in order. `id` is unique
  // within the document (InvalidArgument otherwise); `labels` say what was
  // measured (side, ranks, batch, ...).
  void add_series(const std::string& id, const std::string& unit, const std::vector<double>& values,
                  nlohmann::json labels = nlohmann::json::object()) {
    for (const auto& s : doc_["series"]) {
      TESSERA_CHECK(s["id"] != id, InvalidArgument, "benchmark report '",
                    doc_["benchmark"].get<std::string>(), "': series '", id, "' added twice");
    }
    doc_["series"].push_back(
        {{"id", id}, {"unit", unit}, {"values", values}, {"labels", std::move(labels)}});
  }

  // Writes the document to `path` atomically, with the machine (and the
  // disk holding `disk_dir` when given) and the commit; no-op for an empty
  // path. Errors from the file system propagate (naming the file).
  void write(const std::string& path, const std::string& disk_dir = "") {
    if (path.empty()) return;
    doc_["machine"] = machine_json(disk_dir);
    const nlohmann::json c = commit_json();
    doc_["commit"] = c["commit"];
    doc_["dirty"] = c["dirty"];
    const std::string text = doc_.dump(1) + "\n";
    AtomicFileWriter w(path);
    w.append(text.data(), text.size());
    w.commit();
  }

  const nlohmann::json& document() const { return doc_; }

  // The command line with the source tree's path removed from every
  // argument ("build/release/bin/ckpt_bench ..."), so results files do not
  // depend on where the tree was checked out.
  static std::string relative_to_source(int argc, char** argv) {
    const std::string root = std::string(TESSERA_SOURCE_DIR) + "/";
    std::string cmd;
    for (int i = 0; i < argc; ++i) {
      std::string a = argv[i];
      for (auto p = a.find(root); p != std::string::npos; p = a.find(root, p))
        a.erase(p, root.size());
      cmd += (i ? " " : "") + a;
    }
    return cmd;
  }

 private:
  nlohmann::json doc_;
};

}  // namespace tessera::bench
