// src/ckpt/checkpoint_internal.cpp — the helpers the checkpoint stages
// share (see checkpoint_internal.h).
#include "checkpoint_internal.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <iomanip>
#include <sstream>

#include "tessera/core/error.h"
#include "tessera/core/log.h"

namespace tessera::ckpt::detail {

namespace {

constexpr double kProgressSeconds = 10.0;

}  // namespace

void wait_all(std::vector<std::future<void>>& tasks) {
  std::exception_ptr first_error;
  for (auto& f : tasks) {
    try {
      f.get();
    } catch (...) {
      if (!first_error) first_error = std::current_exception();
    }
  }
  if (first_error) std::rethrow_exception(first_error);
}

std::string mib(uint64_t bytes) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << static_cast<double>(bytes) / (1 << 20) << " MiB";
  return out.str();
}

std::string rank_file_name(int rank) {
  std::ostringstream out;
  out << "rank_" << std::setw(5) << std::setfill('0') << rank << ".bin";
  return out.str();
}

std::string strip_slash(std::string d) {
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}

std::string join_ranks(const std::vector<int>& ranks) {
  std::ostringstream out;
  for (size_t i = 0; i < ranks.size(); ++i) out << (i ? ", " : "") << ranks[i];
  return out.str();
}

int rank_of(const std::shared_ptr<dist::ProcessGroup>& g) { return g ? g->rank() : 0; }
int size_of(const std::shared_ptr<dist::ProcessGroup>& g) { return g ? g->size() : 1; }

std::vector<int64_t> all_gather_ints(const std::shared_ptr<dist::ProcessGroup>& g,
                                     const std::vector<int64_t>& mine) {
  if (!g || g->size() == 1) return mine;
  at::Tensor in = at::from_blob(const_cast<int64_t*>(mine.data()),
                                {static_cast<int64_t>(mine.size())}, at::kLong)
                      .clone();
  at::Tensor out = at::empty({static_cast<int64_t>(mine.size()) * g->size()}, at::kLong);
  g->all_gather(out, in).wait();
  return std::vector<int64_t>(out.data_ptr<int64_t>(), out.data_ptr<int64_t>() + out.numel());
}

std::string encode_blob(const std::map<std::string, std::string>& rng) {
  std::string out;
  auto put = [&out](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  uint32_t count = static_cast<uint32_t>(rng.size());
  put(&count, 4);
  for (const auto& [name, bytes] : rng) {
    uint32_t n = static_cast<uint32_t>(name.size());
    uint64_t b = bytes.size();
    put(&n, 4);
    put(name.data(), n);
    put(&b, 8);
    put(bytes.data(), bytes.size());
  }
  return out;
}

std::map<std::string, std::string> decode_blob(const std::string& blob, const std::string& where) {
  std::map<std::string, std::string> rng;
  size_t pos = 0;
  auto take = [&](void* p, size_t n) {
    TESSERA_CHECK(pos + n <= blob.size(), DataLoss, where, ": RNG state blob is truncated");
    std::memcpy(p, blob.data() + pos, n);
    pos += n;
  };
  uint32_t count = 0;
  take(&count, 4);
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t n = 0;
    take(&n, 4);
    std::string name(n, '\0');
    take(name.data(), n);
    uint64_t b = 0;
    take(&b, 8);
    TESSERA_CHECK(b <= blob.size() - pos, DataLoss, where, ": RNG state blob is truncated");
    std::string bytes(b, '\0');
    take(bytes.data(), b);
    rng.emplace(std::move(name), std::move(bytes));
  }
  return rng;
}

void Progress::add(uint64_t bytes) {
  uint64_t done = done_.fetch_add(bytes) + bytes;
  std::lock_guard<std::mutex> lock(mu_);
  if (last_.seconds() < kProgressSeconds) return;
  last_.reset();
  TESSERA_LOG(Info, "ckpt") << what_ << ": " << mib(done) << " of " << mib(total_) << " ("
                            << static_cast<int>(100.0 * done / std::max<uint64_t>(total_, 1))
                            << "%, " << mib(static_cast<uint64_t>(done / watch_.seconds()))
                            << "/s)";
}

}  // namespace tessera::ckpt::detail
