// Internal to src/sim: how much of the host's CPU time other processes
// used while something was measured (the validation runs and the host
// calibration repeat a measurement that others disturbed).
#pragma once

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <string>
#include <vector>

namespace tessera::sim::detail {

// CPU time of the whole host and of this process and its reaped children.
struct CpuSnapshot {
  double host_busy_s = 0;  // all CPUs, all processes (and the hypervisor's steal)
  double mine_s = 0;       // this process + reaped children
  std::chrono::steady_clock::time_point at;

  static CpuSnapshot take() {
    CpuSnapshot s;
    s.at = std::chrono::steady_clock::now();
    std::ifstream stat("/proc/stat");
    std::string cpu;
    stat >> cpu;
    std::vector<double> fields;
    double v = 0;
    while (fields.size() < 8 && stat >> v) fields.push_back(v);
    const double hz = static_cast<double>(sysconf(_SC_CLK_TCK));
    if (fields.size() >= 5 && hz > 0) {
      double total = 0;
      for (double f : fields) total += f;
      s.host_busy_s = (total - fields[3] - fields[4]) / hz;  // minus idle and iowait
    }
    auto seconds = [](const rusage& u) {
      return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
             1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
    };
    rusage self{}, children{};
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &children);
    s.mine_s = seconds(self) + seconds(children);
    return s;
  }
};

inline int host_cpus() { return static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN))); }

// Share of the host's CPU time between two snapshots used by processes
// other than this one and its children.
inline double foreign_share(const CpuSnapshot& a, const CpuSnapshot& b) {
  const double wall = std::chrono::duration<double>(b.at - a.at).count();
  if (wall <= 0) return 0;
  const double foreign = (b.host_busy_s - a.host_busy_s) - (b.mine_s - a.mine_s);
  return std::max(0.0, foreign / (wall * host_cpus()));
}

}  // namespace tessera::sim::detail
